//! Launchers of kernels/norm.cu: bf16 norms (f32 math), the gated residual, GELU and the
//! bf16 ↔ f32 conversions. CPU references: engine/cpu/norm.rs.

use super::{
    addr_or_null, grid_for, kernels, len_i32, row_block, rows_of, same_len, DevPtr, DevSlice,
    Kernel, KernelDevice, Launch,
};
use crate::error::{Error, Result};

type Bf = half::bf16;

kernels! {
    module "norm";
    @args ChannelRmsArgs { x: DevPtr, y: DevPtr, gamma: DevPtr, rows: i32, c: i32, silu: i32 }
    @args UnaryArgs { x: DevPtr, y: DevPtr, n: i32 }
    /// LayerNorm + adaLN modulation, one block per row.
    LAYERNORM = layernorm_modulate_bf16(LayerNormArgs {
        x: DevPtr, y: DevPtr, mul: DevPtr, add: DevPtr, rows: i32, d: i32, rows_per_group: i32, eps: f32,
    });
    TO_F32 = bf16_to_f32(UnaryArgs);
    TO_BF16 = f32_to_bf16(UnaryArgs);
    /// QK RMSNorm across heads + bias + 3D RoPE, in place, one block per row.
    RMS_ROPE = rms_norm_rope_bf16(RmsRopeArgs {
        x: DevPtr, bias: DevPtr, weight: DevPtr, cos_t: DevPtr, sin_t: DevPtr,
        rows: i32, d: i32, head_dim: i32, tokens: i32, eps: f32, row_stride: i64,
    });
    /// The VAE's channel RMS norm (+ SiLU), a warp per row.
    CHANNEL_RMS = channel_rms_silu_bf16(ChannelRmsArgs);
    CHANNEL_RMS_F16 = channel_rms_silu_f16(ChannelRmsArgs);
    RESIDUAL = residual_gate_bf16(ResidualArgs {
        x: DevPtr, y: DevPtr, bias: DevPtr, gate: DevPtr, rows: i32, d: i32, rows_per_group: i32,
    });
    GELU_BF16 = gelu_tanh_bf16(UnaryArgs);
}

/// LayerNorm of each row of x: [rows, d] (bf16) with the adaLN modulation
/// y = LN(x)·mul[g] + add[g], g = row / rows_per_group; mul, add: [groups, d] f32.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_modulate_bf16<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, Bf>>,
    y: impl Into<DevSlice<'a, Bf>>,
    d: usize,
    mul: impl Into<DevSlice<'a, f32>>,
    add: impl Into<DevSlice<'a, f32>>,
    rows_per_group: usize,
    eps: f32,
) -> Result<()> {
    let x = x.into();
    let y = y.into();
    let mul = mul.into();
    let add = add.into();
    const K: &str = "layernorm_modulate_bf16";
    if d == 0 || x.len() % d != 0 || y.len() != x.len() || rows_per_group == 0 {
        return Err(Error::invalid(format!(
            "{K}: x {} and y {} must be [rows, {d}], rows_per_group > 0",
            x.len(),
            y.len()
        )));
    }
    let (rows, grid) = rows_of(x.len(), d, K)?;
    let groups = rows.div_ceil(rows_per_group);
    if mul.len() < groups * d || add.len() < groups * d {
        return Err(Error::invalid(format!(
            "{K}: mul/add need [{groups}, {d}] for {rows} rows"
        )));
    }
    let mut a = LayerNormArgs {
        x: x.addr(dev, K)?,
        y: y.addr(dev, K)?,
        mul: mul.addr(dev, K)?,
        add: add.addr(dev, K)?,
        rows: len_i32(rows, "rows")?,
        d: len_i32(d, "d")?,
        rows_per_group: len_i32(rows_per_group.min(rows.max(1)), "rows_per_group")?,
        eps,
    };
    // SAFETY: every buffer covers what the kernel reads or writes (checked above): row r of
    // x and y, group r / rows_per_group of mul and add; one block per row.
    unsafe { dev.launch(&LAYERNORM, Launch::x(grid, row_block(d)), &mut a) }
}

/// y = x as f32.
pub fn bf16_to_f32<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, Bf>>,
    y: impl Into<DevSlice<'a, f32>>,
) -> Result<()> {
    // SAFETY: bf16_to_f32 reads bf16 and writes f32, the slices' element types.
    unsafe { elementwise(dev, &TO_F32, x.into(), y.into()) }
}

/// y = x rounded to bf16 (nearest even).
pub fn f32_to_bf16<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, f32>>,
    y: impl Into<DevSlice<'a, Bf>>,
) -> Result<()> {
    // SAFETY: f32_to_bf16 reads f32 and writes bf16, the slices' element types.
    unsafe { elementwise(dev, &TO_BF16, x.into(), y.into()) }
}

/// Launches a kernel of one thread an element that reads x[i] and writes y[i], i < n: the
/// lengths checked equal and the addresses on `dev` (errors name the kernel).
///
/// # Safety
/// X and Y are the element types the kernel reads and writes (a kernel that reads f32 from
/// a bf16 slice of n elements reads past its end).
unsafe fn elementwise<X, Y>(
    dev: &KernelDevice,
    kernel: &Kernel<UnaryArgs>,
    x: DevSlice<'_, X>,
    y: DevSlice<'_, Y>,
) -> Result<()> {
    let k = kernel.name;
    same_len(k, x.len(), y.len())?;
    let mut a = UnaryArgs {
        x: x.addr(dev, k)?,
        y: y.addr(dev, k)?,
        n: len_i32(x.len(), k)?,
    };
    // SAFETY: both hold n elements of the kernel's types (the caller's promise); the kernel
    // touches indices < n.
    unsafe { dev.launch(kernel, grid_for(x.len()), &mut a) }
}

/// 3D-RoPE tables on a kernel device: cos/sin [tokens, head_dim / 2].
pub struct Rope<'a> {
    pub cos: DevSlice<'a, f32>,
    pub sin: DevSlice<'a, f32>,
    pub head_dim: usize,
    pub tokens: usize,
}

/// In place on x: [rows, d] bf16: (x + bias) RMS-normalised across the whole row, times
/// `weight`, then each head's pairs rotated by the row's token angles (token = row mod
/// rope.tokens). The bf16 twin of [`crate::cpu::rms_norm_rope`].
pub fn rms_norm_rope_bf16<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, Bf>>,
    d: usize,
    bias: Option<DevSlice<'a, f32>>,
    weight: impl Into<DevSlice<'a, f32>>,
    eps: f32,
    rope: Option<Rope<'_>>,
) -> Result<()> {
    let x = x.into();
    let (rows, _) = rows_of(x.len(), d, "rms_norm_rope_bf16")?;
    rms_norm_rope_rows_bf16(dev, x, (rows, d, d), bias, weight, eps, rope)
}

/// [`rms_norm_rope_bf16`] on `rows` rows of `d` at a row stride (Q or K inside a fused QKV
/// buffer: stride 3·D): `shape` = (rows, d, row_stride).
pub fn rms_norm_rope_rows_bf16<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, Bf>>,
    (rows, d, row_stride): (usize, usize, usize),
    bias: Option<DevSlice<'a, f32>>,
    weight: impl Into<DevSlice<'a, f32>>,
    eps: f32,
    rope: Option<Rope<'_>>,
) -> Result<()> {
    let x = x.into();
    let weight = weight.into();
    const K: &str = "rms_norm_rope_bf16";
    if d == 0 || rows == 0 || row_stride < d || (rows - 1) * row_stride + d > x.len() {
        return Err(Error::invalid(format!(
            "{K}: {rows} rows of {d} at stride {row_stride} do not fit {} elements",
            x.len()
        )));
    }
    let grid = u32::try_from(rows).map_err(|_| Error::invalid(format!("{K}: too many rows")))?;
    if weight.len() != d || bias.is_some_and(|b| b.len() != d) || d % 2 != 0 {
        return Err(Error::invalid(format!(
            "{K}: weight/bias must have {d} (even) entries"
        )));
    }
    let (cos_t, sin_t, hd, tokens) = match &rope {
        Some(t) => {
            if t.head_dim == 0
                || t.tokens == 0
                || d % t.head_dim != 0
                || t.head_dim % 2 != 0
                || t.cos.len() != t.tokens * t.head_dim / 2
                || t.sin.len() != t.cos.len()
            {
                return Err(Error::invalid(format!(
                    "{K}: rope tables do not fit the rows"
                )));
            }
            (
                t.cos.addr(dev, K)?,
                t.sin.addr(dev, K)?,
                t.head_dim,
                t.tokens,
            )
        }
        None => (DevPtr::NULL, DevPtr::NULL, d, 1),
    };
    let mut a = RmsRopeArgs {
        x: x.addr(dev, K)?,
        bias: addr_or_null(bias, dev, K)?,
        weight: weight.addr(dev, K)?,
        cos_t,
        sin_t,
        rows: len_i32(rows, "rows")?,
        d: len_i32(d, "d")?,
        head_dim: len_i32(hd, "head_dim")?,
        tokens: len_i32(tokens, "tokens")?,
        eps,
        row_stride: row_stride as i64,
    };
    // SAFETY: x holds (rows − 1)·row_stride + d elements, weight/bias d, the tables
    // tokens·head_dim/2 (all checked above); one block per row touches that row only.
    unsafe { dev.launch(&RMS_ROPE, Launch::x(grid, row_block(d / 2)), &mut a) }
}

/// The VAE's channel RMS norm of x: [rows, c] into y (which may be x), with SiLU when
/// `silu`; bf16 or f16. The twin of [`crate::cpu::channel_rms_norm`].
pub fn channel_rms_silu<'a, T: super::Half>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, T>>,
    y: impl Into<DevSlice<'a, T>>,
    c: usize,
    gamma: impl Into<DevSlice<'a, f32>>,
    silu: bool,
) -> Result<()> {
    let (x, y, gamma) = (x.into(), y.into(), gamma.into());
    const K: &str = "channel_rms_silu";
    let (rows, _) = rows_of(x.len(), c, K)?;
    same_len(K, x.len(), y.len())?;
    if gamma.len() != c {
        return Err(Error::invalid(format!("{K}: gamma must have {c} entries")));
    }
    let mut a = ChannelRmsArgs {
        x: x.addr(dev, K)?,
        y: y.addr(dev, K)?,
        gamma: gamma.addr(dev, K)?,
        rows: len_i32(rows, "rows")?,
        c: len_i32(c, "c")?,
        silu: silu as i32,
    };
    let grid = u32::try_from(rows.div_ceil(8).max(1))
        .map_err(|_| Error::invalid(format!("{K}: too many rows")))?;
    // SAFETY: x and y hold rows·c elements and gamma c (checked); warp w of block b owns
    // row 8b + w, rows past `rows` return.
    unsafe {
        dev.launch_counted(
            if T::F16 {
                &CHANNEL_RMS_F16
            } else {
                &CHANNEL_RMS
            },
            Launch::x(grid, 256),
            &mut a,
            crate::profile::Op::Elementwise,
            0,
        )
    }
}

/// x += (y + bias)·gate[row / rows_per_group] on [rows, d] bf16. The bf16 twin of
/// [`crate::cpu::residual_add`].
pub fn residual_gate_bf16<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, Bf>>,
    y: impl Into<DevSlice<'a, Bf>>,
    d: usize,
    bias: Option<DevSlice<'a, f32>>,
    gate: Option<DevSlice<'a, f32>>,
    rows_per_group: usize,
) -> Result<()> {
    let x = x.into();
    let y = y.into();
    const K: &str = "residual_gate_bf16";
    let (rows, _) = rows_of(x.len(), d, K)?;
    let groups = rows.div_ceil(rows_per_group.max(1));
    if y.len() != x.len()
        || bias.is_some_and(|b| b.len() != d)
        || gate.is_some_and(|g| g.len() < groups * d)
    {
        return Err(Error::invalid(format!(
            "{K}: y like x, bias [d], gate [groups, d]"
        )));
    }
    let mut a = ResidualArgs {
        x: x.addr(dev, K)?,
        y: y.addr(dev, K)?,
        bias: addr_or_null(bias, dev, K)?,
        gate: addr_or_null(gate, dev, K)?,
        rows: len_i32(rows, "rows")?,
        d: len_i32(d, "d")?,
        rows_per_group: len_i32(rows_per_group.clamp(1, rows.max(1)), "rows_per_group")?,
    };
    // SAFETY: x, y hold rows·d elements, bias d, gate groups·d (checked).
    unsafe { dev.launch(&RESIDUAL, grid_for(x.len()), &mut a) }
}

/// y = gelu_tanh(x) on bf16.
pub fn gelu_tanh_bf16<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, Bf>>,
    y: impl Into<DevSlice<'a, Bf>>,
) -> Result<()> {
    // SAFETY: gelu_tanh_bf16 reads and writes bf16, the slices' element types.
    unsafe { elementwise(dev, &GELU_BF16, x.into(), y.into()) }
}
