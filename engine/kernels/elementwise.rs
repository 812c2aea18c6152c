//! Launchers of kernels/elementwise.cu: f32 GELU-tanh and the emulator's barrier test.

use super::{grid_for, kernels, len_i32, same_len, DevPtr, DevSlice, KernelDevice, Launch};
use crate::error::{Error, Result};

kernels! {
    module "elementwise";
    @args FillNormalArgs { x: DevPtr, n: i64, seed: u64, mean: f32, std: f32 }
    /// y = gelu_tanh(x), f32.
    GELU_F32 = gelu_tanh_f32(GeluArgs { y: DevPtr, x: DevPtr, n: i32 });
    /// y[t] = x[t − 1] through shared memory, with its barrier.
    SHIFT = shift_shared(ShiftArgs { y: DevPtr, x: DevPtr, n: i32 });
    /// The same without the barrier (racy on purpose).
    SHIFT_NOSYNC = shift_shared_nosync(ShiftNosyncArgs { y: DevPtr, x: DevPtr, n: i32 });
    /// Reproducible benchmark inputs (see kernels/elementwise.cu).
    FILL_HASH = fill_hash_bf16(FillHashArgs { x: DevPtr, n: i64, seed: u32, scale: f32 });
    /// Philox normals (random weights on the device).
    FILL_NORMAL_F32 = fill_normal_f32(FillNormalArgs);
    FILL_NORMAL_BF16 = fill_normal_bf16(FillNormalArgs);
    FILL_NORMAL_F16 = fill_normal_f16(FillNormalArgs);
    /// Device-to-device copy as a kernel.
    COPY = copy_bytes(CopyArgs { dst: DevPtr, src: DevPtr, n: i64 });
}

/// dst = src (same length, not overlapping), on the device's stream: a kernel, so it runs
/// on emu as on cuda and inside captured graphs.
pub fn copy<'a, T: super::Elem>(
    dev: &KernelDevice,
    src: impl Into<DevSlice<'a, T>>,
    dst: impl Into<DevSlice<'a, T>>,
) -> Result<()> {
    let (src, dst) = (src.into(), dst.into());
    const K: &str = "copy";
    same_len(K, src.len(), dst.len())?;
    if src.is_empty() {
        return Ok(());
    }
    let bytes = src.len() * std::mem::size_of::<T>();
    let (s, d) = (src.addr(dev, K)?, dst.addr(dev, K)?);
    if s.0 < d.0 + bytes as u64 && d.0 < s.0 + bytes as u64 {
        return Err(Error::invalid(format!(
            "{K}: source and destination overlap"
        )));
    }
    let mut a = CopyArgs {
        dst: d,
        src: s,
        n: bytes as i64,
    };
    let l = Launch::x((bytes as u64).div_ceil(16 * 256).clamp(1, 2048) as u32, 256);
    // SAFETY: src and dst hold `bytes` bytes each on dev and do not overlap (checked); the
    // kernel touches bytes < n only.
    unsafe { dev.launch(&COPY, l, &mut a) }
}

/// y = gelu_tanh(x) elementwise (f32).
pub fn gelu_tanh_f32<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, f32>>,
    y: impl Into<DevSlice<'a, f32>>,
) -> Result<()> {
    let x = x.into();
    let y = y.into();
    const K: &str = "gelu_tanh_f32";
    same_len(K, x.len(), y.len())?;
    let mut a = GeluArgs {
        y: y.addr(dev, K)?,
        x: x.addr(dev, K)?,
        n: len_i32(x.len(), K)?,
    };
    // SAFETY: x and y live on dev and hold n elements each (checked); the kernel touches
    // indices < n only.
    unsafe { dev.launch(&GELU_F32, grid_for(x.len()), &mut a) }
}

/// Fills x with the reproducible pattern of `fill_hash_bf16` (values uniform in
/// [−scale, scale), element i from the lowbias32 hash of i and `seed`; see
/// kernels/elementwise.cu and [`hash_value`]). At most 2³² elements.
pub fn fill_hash_bf16<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, half::bf16>>,
    seed: u32,
    scale: f32,
) -> Result<()> {
    let x = x.into();
    const K: &str = "fill_hash_bf16";
    if x.len() as u64 > u32::MAX as u64 + 1 {
        return Err(Error::invalid(format!(
            "{K}: {} elements exceed 2^32",
            x.len()
        )));
    }
    let mut a = FillHashArgs {
        x: x.addr(dev, K)?,
        n: x.len() as i64,
        seed,
        scale,
    };
    let l = Launch::x((x.len() as u64).div_ceil(256).clamp(1, 65535) as u32, 256);
    // SAFETY: the kernel writes x[i] for i < n = x.len().
    unsafe { dev.launch(&FILL_HASH, l, &mut a) }
}

#[doc(hidden)]
pub enum FillKind {
    F32,
    Bf16,
    F16,
}

/// Element types [`fill_normal`] writes.
pub trait Fill: super::Elem {
    #[doc(hidden)]
    const KIND: FillKind;
}
impl Fill for f32 {
    const KIND: FillKind = FillKind::F32;
}
impl Fill for half::bf16 {
    const KIND: FillKind = FillKind::Bf16;
}
impl Fill for half::f16 {
    const KIND: FillKind = FillKind::F16;
}

/// Fills x with mean + std·N(0, 1) from Philox4x32-10 (engine/rng.rs's mapping, Box-Muller
/// in f32 on the device): random weights made where they are used.
pub fn fill_normal<'a, T: Fill>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, T>>,
    seed: u64,
    mean: f32,
    std: f32,
) -> Result<()> {
    let x = x.into();
    const K: &str = "fill_normal";
    let mut a = FillNormalArgs {
        x: x.addr(dev, K)?,
        n: x.len() as i64,
        seed,
        mean,
        std,
    };
    let l = Launch::x(
        (x.len() as u64).div_ceil(4 * 256).clamp(1, 65535) as u32,
        256,
    );
    let k = match T::KIND {
        FillKind::F32 => &FILL_NORMAL_F32,
        FillKind::Bf16 => &FILL_NORMAL_BF16,
        FillKind::F16 => &FILL_NORMAL_F16,
    };
    // SAFETY: the kernel writes x[i] for i < n = x.len().
    unsafe { dev.launch(k, l, &mut a) }
}

/// lowbias32 (Chris Wellons' 32-bit integer hash).
pub fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// Element i of [`fill_hash_bf16`]'s pattern, computed on the host.
pub fn hash_value(i: u32, seed: u32, scale: f32) -> half::bf16 {
    let u = (lowbias32(i ^ lowbias32(seed)) >> 8) as f32 * (1.0 / 16_777_216.0);
    half::bf16::from_f32((u * 2.0 - 1.0) * scale)
}

/// y[t] = x[t − 1] (y[0] = x[0]) through shared memory, one block of x.len() ≤ 1024
/// threads; `sync` false runs the variant that omits its barrier (the test of the
/// emulator's shuffle mode; racy on hardware too).
pub fn shift_shared<'a>(
    dev: &KernelDevice,
    x: impl Into<DevSlice<'a, f32>>,
    y: impl Into<DevSlice<'a, f32>>,
    sync: bool,
) -> Result<()> {
    let x = x.into();
    let y = y.into();
    if x.len() != y.len() || x.is_empty() || x.len() > 1024 {
        return Err(Error::invalid(
            "shift_shared: 1..=1024 elements, x and y alike",
        ));
    }
    let n = x.len() as u32;
    let (y, x) = (
        y.addr(dev, "shift_shared y")?,
        x.addr(dev, "shift_shared x")?,
    );
    let l = Launch::x(1, n);
    // SAFETY: one block of n threads touches indices < n of x and y.
    unsafe {
        if sync {
            let mut a = ShiftArgs { y, x, n: n as i32 };
            dev.launch(&SHIFT, l, &mut a)
        } else {
            let mut a = ShiftNosyncArgs { y, x, n: n as i32 };
            dev.launch(&SHIFT_NOSYNC, l, &mut a)
        }
    }
}
