//! The GPU kernels of kernels/*.cu: their fatbins (embedded by build.rs when nvcc was
//! found) and the emulator's entry points, one typed launcher per kernel. Launchers check
//! shapes before any unsafe call. The emu device runs the same .cu sources on the host.

use crate::error::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// A CUDA launch geometry.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl Dim3 {
    pub const fn x(x: u32) -> Self {
        Dim3 { x, y: 1, z: 1 }
    }
}

/// Arguments of gelu_tanh_f32 (mirrors `GeluArgs` in kernels/elementwise.cu).
#[repr(C)]
struct GeluArgs {
    y: *mut f32,
    x: *const f32,
    n: i32,
}

/// Arguments of shift_shared (mirrors `ShiftArgs`).
#[repr(C)]
struct ShiftArgs {
    y: *mut f32,
    x: *const f32,
    n: i32,
}

/// Arguments of layernorm_modulate_bf16 (mirrors `LayerNormArgs` in kernels/norm.cu).
#[repr(C)]
struct LayerNormArgs {
    x: *const half::bf16,
    y: *mut half::bf16,
    mul: *const f32,
    add: *const f32,
    rows: i32,
    d: i32,
    rows_per_group: i32,
    eps: f32,
}

#[repr(C)]
struct ToF32Args {
    x: *const half::bf16,
    y: *mut f32,
    n: i32,
}

#[repr(C)]
struct ToBf16Args {
    x: *const f32,
    y: *mut half::bf16,
    n: i32,
}

#[repr(C)]
struct RmsRopeArgs {
    x: *mut half::bf16,
    bias: *const f32,
    weight: *const f32,
    cos_t: *const f32,
    sin_t: *const f32,
    rows: i32,
    d: i32,
    head_dim: i32,
    tokens: i32,
    eps: f32,
}

#[repr(C)]
struct ChannelRmsArgs {
    x: *mut half::bf16,
    gamma: *const f32,
    rows: i32,
    c: i32,
    silu: i32,
}

#[repr(C)]
struct ResidualArgs {
    x: *mut half::bf16,
    y: *const half::bf16,
    bias: *const f32,
    gate: *const f32,
    rows: i32,
    d: i32,
    rows_per_group: i32,
}

#[repr(C)]
struct GeluBf16Args {
    x: *const half::bf16,
    y: *mut half::bf16,
    n: i32,
}

extern "C" {
    fn reel_emu_rms_norm_rope_bf16(grid: Dim3, block: Dim3, shared: usize, a: *const RmsRopeArgs);
    fn reel_emu_channel_rms_silu_bf16(
        grid: Dim3,
        block: Dim3,
        shared: usize,
        a: *const ChannelRmsArgs,
    );
    fn reel_emu_residual_gate_bf16(grid: Dim3, block: Dim3, shared: usize, a: *const ResidualArgs);
    fn reel_emu_gelu_tanh_bf16(grid: Dim3, block: Dim3, shared: usize, a: *const GeluBf16Args);
    fn reel_emu_layernorm_modulate_bf16(
        grid: Dim3,
        block: Dim3,
        shared: usize,
        a: *const LayerNormArgs,
    );
    fn reel_emu_bf16_to_f32(grid: Dim3, block: Dim3, shared: usize, a: *const ToF32Args);
    fn reel_emu_f32_to_bf16(grid: Dim3, block: Dim3, shared: usize, a: *const ToBf16Args);
    fn reel_emu_set_shuffle(mode: i32, seed: u64);
    fn reel_emu_gelu_tanh_f32(grid: Dim3, block: Dim3, shared: usize, a: *const GeluArgs);
    fn reel_emu_shift_shared(grid: Dim3, block: Dim3, shared: usize, a: *const ShiftArgs);
    fn reel_emu_shift_shared_nosync(grid: Dim3, block: Dim3, shared: usize, a: *const ShiftArgs);
}

/// Launchers on the emu device (host memory).
pub mod emu {
    use super::*;

    /// Blocks of 256 threads for a grid-stride loop over n elements (at most 1024).
    fn grid_for(n: usize) -> u32 {
        (n as u64).div_ceil(256).clamp(1, 1024) as u32
    }

    fn len_i32(n: usize, what: &str) -> Result<i32> {
        i32::try_from(n)
            .map_err(|_| Error::invalid(format!("{what}: {n} elements do not fit a kernel's int")))
    }

    /// Overrides REEL_EMU_SHUFFLE for launches from this thread: None restores the
    /// environment's setting, Some(None) turns shuffling off, Some(Some(seed)) on.
    pub fn set_shuffle(mode: Option<Option<u64>>) {
        let (m, seed) = match mode {
            None => (-1, 0),
            Some(None) => (0, 0),
            Some(Some(s)) => (1, s),
        };
        // SAFETY: sets two thread-local variables of the emulator.
        unsafe { reel_emu_set_shuffle(m, seed) }
    }

    /// y = gelu_tanh(x) elementwise.
    pub fn gelu_tanh_f32(x: &[f32], y: &mut [f32]) -> Result<()> {
        if x.len() != y.len() {
            return Err(Error::invalid(format!(
                "gelu_tanh_f32: x has {} elements, y {}",
                x.len(),
                y.len()
            )));
        }
        let n = len_i32(x.len(), "gelu_tanh_f32")?;
        let grid = grid_for(x.len());
        let a = GeluArgs {
            y: y.as_mut_ptr(),
            x: x.as_ptr(),
            n,
        };
        // SAFETY: x and y are live for the call and hold n elements each (checked above);
        // the kernel reads x[i] and writes y[i] for i < n only; the emulator runs it to
        // completion before returning.
        unsafe { reel_emu_gelu_tanh_f32(Dim3::x(grid), Dim3::x(256), 0, &a) };
        Ok(())
    }

    /// LayerNorm of each row of x: [rows, d] (bf16) with the adaLN modulation
    /// y = LN(x)·mul[g] + add[g], g = row / rows_per_group; mul, add: [groups, d] f32.
    pub fn layernorm_modulate_bf16(
        x: &[half::bf16],
        y: &mut [half::bf16],
        d: usize,
        mul: &[f32],
        add: &[f32],
        rows_per_group: usize,
        eps: f32,
    ) -> Result<()> {
        if d == 0 || x.len() % d != 0 || y.len() != x.len() || rows_per_group == 0 {
            return Err(Error::invalid(format!(
                "layernorm_modulate_bf16: x {} and y {} must be [rows, {d}], rows_per_group > 0",
                x.len(),
                y.len()
            )));
        }
        let rows = x.len() / d;
        let groups = rows.div_ceil(rows_per_group);
        if mul.len() < groups * d || add.len() < groups * d {
            return Err(Error::invalid(format!(
                "layernorm_modulate_bf16: mul/add need [{groups}, {d}] for {rows} rows"
            )));
        }
        let a = LayerNormArgs {
            x: x.as_ptr(),
            y: y.as_mut_ptr(),
            mul: mul.as_ptr(),
            add: add.as_ptr(),
            rows: len_i32(rows, "layernorm_modulate_bf16 rows")?,
            d: len_i32(d, "layernorm_modulate_bf16 d")?,
            rows_per_group: len_i32(rows_per_group.min(rows.max(1)), "rows_per_group")?,
            eps,
        };
        let grid = u32::try_from(rows)
            .map_err(|_| Error::invalid("layernorm_modulate_bf16: too many rows"))?;
        // SAFETY: every pointer covers what the kernel reads or writes (checked above): row r
        // of x and y, and group r / rows_per_group of mul and add; one block per row.
        unsafe { reel_emu_layernorm_modulate_bf16(Dim3::x(grid.max(1)), Dim3::x(256), 0, &a) };
        Ok(())
    }

    fn rows_of(len: usize, d: usize, what: &str) -> Result<(usize, u32)> {
        if d == 0 || len % d != 0 {
            return Err(Error::invalid(format!(
                "{what}: {len} elements are not rows of {d}"
            )));
        }
        let rows = len / d;
        let grid = u32::try_from(rows.max(1))
            .map_err(|_| Error::invalid(format!("{what}: too many rows")))?;
        Ok((rows, grid))
    }

    fn ptr_or_null(p: Option<&[f32]>) -> *const f32 {
        p.map(|s| s.as_ptr()).unwrap_or(std::ptr::null())
    }

    /// In place on x: [rows, d] bf16: (x + bias) RMS-normalised across the whole row, times
    /// `weight`, then each head's pairs rotated by the row's token angles (token = row mod
    /// rope.tokens). The bf16 twin of [`crate::cpu::rms_norm_rope`].
    pub fn rms_norm_rope_bf16(
        x: &mut [half::bf16],
        d: usize,
        bias: Option<&[f32]>,
        weight: &[f32],
        eps: f32,
        rope: Option<&crate::cpu::RopeTables>,
    ) -> Result<()> {
        let (rows, grid) = rows_of(x.len(), d, "rms_norm_rope_bf16")?;
        if weight.len() != d || bias.is_some_and(|b| b.len() != d) || d % 2 != 0 {
            return Err(Error::invalid(format!(
                "rms_norm_rope_bf16: weight/bias must have {d} (even) entries"
            )));
        }
        let (cos_t, sin_t, hd, tokens) = match rope {
            Some(t) => {
                if t.head_dim == 0
                    || d % t.head_dim != 0
                    || t.cos.len() != t.tokens * t.head_dim / 2
                {
                    return Err(Error::invalid(
                        "rms_norm_rope_bf16: rope tables do not fit the rows",
                    ));
                }
                (t.cos.as_ptr(), t.sin.as_ptr(), t.head_dim, t.tokens)
            }
            None => (std::ptr::null(), std::ptr::null(), d, 1),
        };
        let a = RmsRopeArgs {
            x: x.as_mut_ptr(),
            bias: ptr_or_null(bias),
            weight: weight.as_ptr(),
            cos_t,
            sin_t,
            rows: len_i32(rows, "rows")?,
            d: len_i32(d, "d")?,
            head_dim: len_i32(hd, "head_dim")?,
            tokens: len_i32(tokens, "tokens")?,
            eps,
        };
        // SAFETY: x holds rows·d elements, weight/bias d, the tables tokens·head_dim/2 (all
        // checked above); one block per row touches that row only.
        unsafe { reel_emu_rms_norm_rope_bf16(Dim3::x(grid), Dim3::x(256), 0, &a) };
        Ok(())
    }

    /// In place on channel-last x: [rows, c] bf16: x / max(‖x‖, 1e-12)·√c·γ, then SiLU when
    /// `silu`. The bf16 twin of [`crate::cpu::channel_rms_norm`].
    pub fn channel_rms_silu_bf16(
        x: &mut [half::bf16],
        c: usize,
        gamma: &[f32],
        silu: bool,
    ) -> Result<()> {
        let (rows, grid) = rows_of(x.len(), c, "channel_rms_silu_bf16")?;
        if gamma.len() != c {
            return Err(Error::invalid(format!(
                "channel_rms_silu_bf16: gamma must have {c} entries"
            )));
        }
        let a = ChannelRmsArgs {
            x: x.as_mut_ptr(),
            gamma: gamma.as_ptr(),
            rows: len_i32(rows, "rows")?,
            c: len_i32(c, "c")?,
            silu: silu as i32,
        };
        // SAFETY: x holds rows·c elements and gamma c (checked); one block per row.
        unsafe { reel_emu_channel_rms_silu_bf16(Dim3::x(grid), Dim3::x(256), 0, &a) };
        Ok(())
    }

    /// x += (y + bias)·gate[row / rows_per_group] on [rows, d] bf16. The bf16 twin of
    /// [`crate::cpu::residual_add`].
    pub fn residual_gate_bf16(
        x: &mut [half::bf16],
        y: &[half::bf16],
        d: usize,
        bias: Option<&[f32]>,
        gate: Option<&[f32]>,
        rows_per_group: usize,
    ) -> Result<()> {
        let (rows, _) = rows_of(x.len(), d, "residual_gate_bf16")?;
        let groups = rows.div_ceil(rows_per_group.max(1));
        if y.len() != x.len()
            || bias.is_some_and(|b| b.len() != d)
            || gate.is_some_and(|g| g.len() < groups * d)
        {
            return Err(Error::invalid(
                "residual_gate_bf16: y like x, bias [d], gate [groups, d]",
            ));
        }
        let a = ResidualArgs {
            x: x.as_mut_ptr(),
            y: y.as_ptr(),
            bias: ptr_or_null(bias),
            gate: ptr_or_null(gate),
            rows: len_i32(rows, "rows")?,
            d: len_i32(d, "d")?,
            rows_per_group: len_i32(rows_per_group.clamp(1, rows.max(1)), "rows_per_group")?,
        };
        let grid = grid_for(x.len());
        // SAFETY: x, y hold rows·d elements, bias d, gate groups·d (checked).
        unsafe { reel_emu_residual_gate_bf16(Dim3::x(grid), Dim3::x(256), 0, &a) };
        Ok(())
    }

    /// y = gelu_tanh(x) on bf16.
    pub fn gelu_tanh_bf16(x: &[half::bf16], y: &mut [half::bf16]) -> Result<()> {
        if x.len() != y.len() {
            return Err(Error::invalid("gelu_tanh_bf16: x and y differ in length"));
        }
        let a = GeluBf16Args {
            x: x.as_ptr(),
            y: y.as_mut_ptr(),
            n: len_i32(x.len(), "gelu_tanh_bf16")?,
        };
        let grid = grid_for(x.len());
        // SAFETY: both slices hold n elements.
        unsafe { reel_emu_gelu_tanh_bf16(Dim3::x(grid), Dim3::x(256), 0, &a) };
        Ok(())
    }

    /// y = x as f32.
    pub fn bf16_to_f32(x: &[half::bf16], y: &mut [f32]) -> Result<()> {
        if x.len() != y.len() {
            return Err(Error::invalid("bf16_to_f32: x and y differ in length"));
        }
        let a = ToF32Args {
            x: x.as_ptr(),
            y: y.as_mut_ptr(),
            n: len_i32(x.len(), "bf16_to_f32")?,
        };
        let grid = grid_for(x.len());
        // SAFETY: both slices hold n elements; the kernel touches indices < n.
        unsafe { reel_emu_bf16_to_f32(Dim3::x(grid), Dim3::x(256), 0, &a) };
        Ok(())
    }

    /// y = x rounded to bf16 (nearest even).
    pub fn f32_to_bf16(x: &[f32], y: &mut [half::bf16]) -> Result<()> {
        if x.len() != y.len() {
            return Err(Error::invalid("f32_to_bf16: x and y differ in length"));
        }
        let a = ToBf16Args {
            x: x.as_ptr(),
            y: y.as_mut_ptr(),
            n: len_i32(x.len(), "f32_to_bf16")?,
        };
        let grid = grid_for(x.len());
        // SAFETY: both slices hold n elements; the kernel touches indices < n.
        unsafe { reel_emu_f32_to_bf16(Dim3::x(grid), Dim3::x(256), 0, &a) };
        Ok(())
    }

    /// y[t] = x[t − 1] (y[0] = x[0]) through shared memory, one block of x.len() ≤ 1024
    /// threads; `sync` false runs the variant that omits its barrier (a test of the
    /// emulator's shuffle mode).
    pub fn shift_shared(x: &[f32], y: &mut [f32], sync: bool) -> Result<()> {
        if x.len() != y.len() || x.is_empty() || x.len() > 1024 {
            return Err(Error::invalid(
                "shift_shared: 1..=1024 elements, x and y alike",
            ));
        }
        let n = x.len() as u32;
        let a = ShiftArgs {
            y: y.as_mut_ptr(),
            x: x.as_ptr(),
            n: n as i32,
        };
        // SAFETY: as above; one block of n threads touches indices < n.
        unsafe {
            if sync {
                reel_emu_shift_shared(Dim3::x(1), Dim3::x(n), 0, &a)
            } else {
                reel_emu_shift_shared_nosync(Dim3::x(1), Dim3::x(n), 0, &a)
            }
        };
        Ok(())
    }
}
