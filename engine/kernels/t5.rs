//! Launchers of kernels/t5.cu: umT5's fused residual add + T5 layer norm and its gated
//! GELU. CPU references: [`crate::cpu::rms_norm_rope`] (no bias, no rotation) and
//! [`crate::cpu::gelu_mul`].

use super::{
    addr_or_null, grid_for, kernels, len_i32, row_block, rows_of, DevPtr, DevSlice, Elem,
    KernelDevice, Launch,
};
use crate::error::{Error, Result};

kernels! {
    module "t5";
    @args AddNormArgs { x: DevPtr, y: DevPtr, weight: DevPtr, out: DevPtr, rows: i32, d: i32, eps: f32 }
    @args GatedGeluArgs { h: DevPtr, out: DevPtr, rows: i64, f: i32 }
    ADD_NORM_BF16 = t5_add_norm_bf16(AddNormArgs);
    ADD_NORM_F32 = t5_add_norm_f32(AddNormArgs);
    ADD_NORM_F16 = t5_add_norm_f16(AddNormArgs);
    GATED_GELU_BF16 = t5_gated_gelu_bf16(GatedGeluArgs);
    GATED_GELU_F16 = t5_gated_gelu_f16(GatedGeluArgs);
}

/// What [`t5_add_norm`] writes: bf16 or f16 (a GEMM's input) or f32 (the encoder's output).
pub trait NormOut: Elem {
    #[doc(hidden)]
    const NAME: &'static str;
}
impl NormOut for half::bf16 {
    const NAME: &'static str = "bf16";
}
impl NormOut for half::f16 {
    const NAME: &'static str = "f16";
}
impl NormOut for f32 {
    const NAME: &'static str = "f32";
}

/// On rows of d: x += y (when given; x is the f32 residual stream), then
/// out = x / √(mean(x²) + eps) · weight (T5's layer norm: no mean, no bias), as bf16 or f32.
pub fn t5_add_norm<'a, O: NormOut>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, f32>>,
    y: Option<DevSlice<'a, f32>>,
    weight: impl Into<DevSlice<'a, f32>>,
    out: impl Into<DevSlice<'a, O>>,
    d: usize,
    eps: f32,
) -> Result<()> {
    let (x, weight, out) = (x.into(), weight.into(), out.into());
    const K: &str = "t5_add_norm";
    let (rows, grid) = rows_of(x.len(), d, K)?;
    if out.len() != x.len() || y.is_some_and(|y| y.len() != x.len()) || weight.len() != d {
        return Err(Error::invalid(format!(
            "{K}: x has {} elements ([rows, {d}]); y and out must match it, weight has {} (want {d})",
            x.len(),
            weight.len()
        )));
    }
    let mut a = AddNormArgs {
        x: x.addr(dev, K)?,
        y: addr_or_null(y, dev, K)?,
        weight: weight.addr(dev, K)?,
        out: out.addr(dev, K)?,
        rows: len_i32(rows, "rows")?,
        d: len_i32(d, "d")?,
        eps,
    };
    let kernel = match O::NAME {
        "bf16" => &ADD_NORM_BF16,
        "f16" => &ADD_NORM_F16,
        _ => &ADD_NORM_F32,
    };
    // SAFETY: x, y and out hold rows·d elements and weight d (checked); block r touches row
    // r only.
    unsafe {
        dev.launch_counted(
            kernel,
            Launch::x(grid, row_block(d)),
            &mut a,
            crate::profile::Op::Elementwise,
            0,
        )
    }
}

/// out[r, c] = gelu_new(h[r, c]) · h[r, f + c] for h: [rows, 2f] f32 (one GEMM against the
/// concatenated wi_0, wi_1), out: [rows, f] bf16 or f16.
pub fn t5_gated_gelu<'a, T: super::Half>(
    dev: &KernelDevice,
    h: impl Into<DevSlice<'a, f32>>,
    out: impl Into<DevSlice<'a, T>>,
    f: usize,
) -> Result<()> {
    let (h, out) = (h.into(), out.into());
    const K: &str = "t5_gated_gelu";
    let (rows, _) = rows_of(out.len(), f, K)?;
    if h.len() != 2 * out.len() {
        return Err(Error::invalid(format!(
            "{K}: h has {} elements, want [{rows}, {}]",
            h.len(),
            2 * f
        )));
    }
    let mut a = GatedGeluArgs {
        h: h.addr(dev, K)?,
        out: out.addr(dev, K)?,
        rows: rows as i64,
        f: len_i32(f, "f")?,
    };
    // SAFETY: h holds rows·2f and out rows·f elements (checked); the kernel touches
    // indices below those.
    unsafe {
        dev.launch_counted(
            if T::F16 {
                &GATED_GELU_F16
            } else {
                &GATED_GELU_BF16
            },
            grid_for(out.len()),
            &mut a,
            crate::profile::Op::Elementwise,
            0,
        )
    }
}
