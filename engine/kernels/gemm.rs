//! Launcher of kernels/gemm.cu: reel's tensor-core GEMM, C = act(A·Wᵀ + bias) with A
//! [M, K] and W [N, K] bf16 or f16 (a linear layer's layout), f32 accumulation, C f32 or of
//! the inputs' type. The
//! GEMM of the emu device and the fallback of the cuda device without cuBLASLt. CPU
//! reference: [`crate::cpu::linear`].

use super::{kernels, DevPtr, DevSlice, Half, Kernel, KernelDevice, Launch};
use crate::error::{Error, Result};

type Bf = half::bf16;

/// Shared memory of a variant: `stages` × (bm + bn) rows of bk + 8 bf16.
const fn smem(bm: u32, bn: u32, stages: u32) -> u32 {
    stages * (bm + bn) * (32 + 8) * 2
}

kernels! {
    module "gemm";
    @args GemmBf16Args {
        a: DevPtr, w: DevPtr, bias: DevPtr, c: DevPtr, m: i32, n: i32, k: i32,
        lda: i64, ldw: i64, ldc: i64, act: i32,
    }
    BF16_128 = gemm_bf16_128x128 [opt_in = smem(128, 128, 3)] (GemmBf16Args);
    F32_128 = gemm_f32_128x128 [opt_in = smem(128, 128, 3)] (GemmBf16Args);
    BF16_64 = gemm_bf16_64x64 (GemmBf16Args);
    F32_64 = gemm_f32_64x64 (GemmBf16Args);
    BF16_ANY = gemm_bf16_any (GemmBf16Args);
    F32_ANY = gemm_f32_any (GemmBf16Args);
    F16_128 = gemm_f16_128x128 [opt_in = smem(128, 128, 3)] (GemmBf16Args);
    F16F32_128 = gemm_f16f32_128x128 [opt_in = smem(128, 128, 3)] (GemmBf16Args);
    F16_64 = gemm_f16_64x64 (GemmBf16Args);
    F16F32_64 = gemm_f16f32_64x64 (GemmBf16Args);
    F16_ANY = gemm_f16_any (GemmBf16Args);
    F16F32_ANY = gemm_f16f32_any (GemmBf16Args);
}

/// What follows the product (in f32, after the bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    /// GELU with the tanh approximation (Wan's FFN and text embedder).
    GeluTanh,
}

/// Output element types of the GEMM: f32, or the inputs' 16-bit type.
pub trait GemmOut: super::Elem {
    #[doc(hidden)]
    const F32: bool;
    #[doc(hidden)]
    const F16: bool;
}
impl GemmOut for f32 {
    const F32: bool = true;
    const F16: bool = false;
}
impl GemmOut for Bf {
    const F32: bool = false;
    const F16: bool = false;
}
impl GemmOut for half::f16 {
    const F32: bool = false;
    const F16: bool = true;
}

/// One operand: a slice and its row stride in elements (rows of K for A and W, of N for C).
pub type Mat<'a, T> = (DevSlice<'a, T>, usize);

/// C[M, N] = act(A[M, K]·W[N, K]ᵀ + bias[N]). Row strides may exceed the row length (A a
/// slice of a fused buffer, C the K part of a QKV output). Returns the variant that ran.
#[allow(clippy::too_many_arguments)]
pub fn gemm<'a, T: Half, O: GemmOut>(
    dev: &KernelDevice,
    a: Mat<'a, T>,
    w: Mat<'a, T>,
    bias: Option<DevSlice<'a, f32>>,
    c: Mat<'a, O>,
    (m, n, k): (usize, usize, usize),
    act: Act,
) -> Result<&'static str> {
    const K: &str = "gemm";
    let (ap, wp, cp) = check(dev, a, w, bias, c, (m, n, k))?;
    let ((_, lda), (_, ldw), (_, ldc)) = (a, w, c);
    let aligned16 = ap.0 % 16 == 0 && wp.0 % 16 == 0 && lda % 8 == 0 && ldw % 8 == 0 && k % 8 == 0;
    // 128 × 128 tiles when there are enough of them to fill a GPU's SMs; else 64 × 64 (less
    // padding for small M or N; and on emu every padded row costs emulated mma).
    let big = aligned16 && m >= 128 && n >= 128 && m.div_ceil(128) * n.div_ceil(128) >= 64;
    let (kernel, tile): (&Kernel<GemmBf16Args>, u32) = match (T::F16, O::F32, aligned16, big) {
        (false, false, true, true) => (&BF16_128, 128),
        (false, true, true, true) => (&F32_128, 128),
        (false, false, true, false) => (&BF16_64, 64),
        (false, true, true, false) => (&F32_64, 64),
        (false, false, false, _) => (&BF16_ANY, 64),
        (false, true, false, _) => (&F32_ANY, 64),
        (true, false, true, true) => (&F16_128, 128),
        (true, true, true, true) => (&F16F32_128, 128),
        (true, false, true, false) => (&F16_64, 64),
        (true, true, true, false) => (&F16F32_64, 64),
        (true, false, false, _) => (&F16_ANY, 64),
        (true, true, false, _) => (&F16F32_ANY, 64),
    };
    let i32_of = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::invalid(format!("{K}: {what} = {v} too large")))
    };
    let mut args = GemmBf16Args {
        a: ap,
        w: wp,
        bias: match bias {
            Some(b) => b.addr(dev, K)?,
            None => DevPtr::NULL,
        },
        c: cp,
        m: i32_of(m, "M")?,
        n: i32_of(n, "N")?,
        k: i32_of(k, "K")?,
        lda: lda as i64,
        ldw: ldw as i64,
        ldc: ldc as i64,
        act: (act == Act::GeluTanh) as i32,
    };
    let grid_y = u32::try_from(m.div_ceil(tile as usize))
        .map_err(|_| Error::invalid(format!("{K}: M = {m} too large")))?;
    let l = Launch {
        grid: super::Dim3::new(n.div_ceil(tile as usize) as u32, grid_y, 1),
        block: super::Dim3::x(if tile == 128 { 256 } else { 128 }),
        shared: smem(tile, tile, 3),
    };
    let flops = 2 * (m * n * k) as u64;
    // SAFETY: A, W and C cover rows × row strides (checked), bias N entries (checked); the
    // copies' alignment holds for the variant chosen.
    unsafe { dev.launch_counted(kernel, l, &mut args, crate::profile::Op::Gemm, flops)? };
    Ok(kernel.name)
}

/// The operand checks of [`gemm`] (shared with the cuBLASLt path): returns the addresses of
/// A, W and C on `dev`.
pub fn check<T: Half, O: GemmOut>(
    dev: &KernelDevice,
    a: Mat<'_, T>,
    w: Mat<'_, T>,
    bias: Option<DevSlice<'_, f32>>,
    c: Mat<'_, O>,
    (m, n, k): (usize, usize, usize),
) -> Result<(DevPtr, DevPtr, DevPtr)> {
    const K: &str = "gemm";
    let bad = |msg: String| Err(Error::invalid(format!("{K} {m}x{n}x{k}: {msg}")));
    if m == 0 || n == 0 || k == 0 {
        return bad("empty".into());
    }
    if k % 2 != 0 {
        return bad("K must be even (pairs of bf16 are copied)".into());
    }
    if !O::F32 && O::F16 != T::F16 {
        return bad("a 16-bit C must have the inputs' type (bf16 with bf16, f16 with f16)".into());
    }
    let ((a, lda), (w, ldw), (c, ldc)) = (a, w, c);
    let need = |rows: usize, ld: usize, cols: usize| (rows - 1).checked_mul(ld)?.checked_add(cols);
    for (name, len, rows, ld, cols) in [
        ("a", a.len(), m, lda, k),
        ("w", w.len(), n, ldw, k),
        ("c", c.len(), m, ldc, n),
    ] {
        if ld < cols || need(rows, ld, cols).is_none_or(|nd| nd > len) {
            return bad(format!(
                "{name}: {rows} rows of {cols} with row stride {ld} do not fit {len} elements"
            ));
        }
    }
    if bias.is_some_and(|b| b.len() < n) {
        return bad("bias needs N entries".into());
    }
    let (ap, wp, cp) = (a.addr(dev, K)?, w.addr(dev, K)?, c.addr(dev, K)?);
    if ap.0 % 4 != 0 || wp.0 % 4 != 0 || lda % 2 != 0 || ldw % 2 != 0 {
        return bad("A and W rows must be 4-byte aligned (even strides)".into());
    }
    Ok((ap, wp, cp))
}
