//! Launchers of kernels/elementwise.cu: f32 GELU-tanh and the emulator's barrier test.

use super::{grid_for, kernels, len_i32, same_len, Buf, DevPtr, KernelDevice, Launch};
use crate::error::{Error, Result};

kernels! {
    module "elementwise";
    /// y = gelu_tanh(x), f32.
    GELU_F32 = gelu_tanh_f32(GeluArgs { y: DevPtr, x: DevPtr, n: i32 });
    /// y[t] = x[t − 1] through shared memory, with its barrier.
    SHIFT = shift_shared(ShiftArgs { y: DevPtr, x: DevPtr, n: i32 });
    /// The same without the barrier (racy on purpose).
    SHIFT_NOSYNC = shift_shared_nosync(ShiftNosyncArgs { y: DevPtr, x: DevPtr, n: i32 });
}

/// y = gelu_tanh(x) elementwise (f32).
pub fn gelu_tanh_f32(dev: &KernelDevice, x: &Buf<f32>, y: &mut Buf<f32>) -> Result<()> {
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

/// y[t] = x[t − 1] (y[0] = x[0]) through shared memory, one block of x.len() ≤ 1024
/// threads; `sync` false runs the variant that omits its barrier (the test of the
/// emulator's shuffle mode; racy on hardware too).
pub fn shift_shared(dev: &KernelDevice, x: &Buf<f32>, y: &mut Buf<f32>, sync: bool) -> Result<()> {
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
