//! Launcher of kernels/probe.sm90.cu: a module built for sm_90a alone, which a pre-Hopper
//! GPU cannot load (Cuda::open skips it; launching its kernel there is a clear error).

use super::{kernels, Buf, DevPtr, KernelDevice, Launch};
use crate::error::{Error, Result};

kernels! {
    module "probe.sm90";
    ARCH_PROBE = arch_probe(ArchProbeArgs { out: DevPtr });
}

/// The __CUDA_ARCH__ the running code was built for (900 on an H100/H200), -1 on emu.
pub fn arch_probe(dev: &KernelDevice) -> Result<i32> {
    let out = Buf::filled(dev, 1, i32::MIN)?;
    let mut a = ArchProbeArgs {
        out: out.addr(dev, "arch_probe")?,
    };
    // SAFETY: thread 0 writes out[0].
    unsafe { dev.launch(&ARCH_PROBE, Launch::x(1, 32), &mut a)? };
    let v = out.download()?[0];
    if v == i32::MIN {
        return Err(Error::Device("arch_probe: the kernel wrote nothing".into()));
    }
    Ok(v)
}
