//! The runtime's GEMM: cuBLASLt on cuda when it is there ([`super::cublaslt`]), reel's own
//! tensor-core kernel otherwise and on emu ([`crate::kernels::gemm`]). The same contract
//! either way: C[M, N] = act(A[M, K]·W[N, K]ᵀ + bias), bf16 or f16 in, f32 accumulation,
//! the inputs' type or f32 out. While measuring, reel's kernel records the buffers (the same ones cuBLASLt
//! would touch).

use super::cublaslt::CublasLt;
use crate::error::Result;
use crate::kernels::gemm::{GemmOut, Mat};
use crate::kernels::{self as k, Act, DevSlice, KernelDevice};

/// See the module docs; returns what ran ("cublaslt" or reel's variant).
pub fn gemm<'a, T: k::Half, O: GemmOut>(
    dev: &KernelDevice,
    a: Mat<'a, T>,
    w: Mat<'a, T>,
    bias: Option<DevSlice<'a, f32>>,
    c: Mat<'a, O>,
    mnk: (usize, usize, usize),
    act: Act,
) -> Result<&'static str> {
    if let Some(lt) = CublasLt::for_device(dev) {
        // reel's launcher checks the operands first (shapes, strides, device), so cuBLASLt
        // never sees what reel's kernel would refuse.
        k::gemm::check(dev, a, w, bias, c, mnk)?;
        let (m, n, kk) = mnk;
        let ran = match dev {
            KernelDevice::Cuda(cuda) if crate::profile::enabled() => {
                let (ran, secs) = cuda
                    .timed(|| {
                        lt.gemm(a, w, bias, c, mnk, act, (T::F16, O::F32))
                            .map_err(|e| crate::cuda::CudaError(e.to_string()))
                    })
                    .map_err(|e| crate::Error::Device(e.to_string()))?;
                if ran {
                    crate::profile::record(crate::profile::Op::Gemm, secs, 2 * (m * n * kk) as u64);
                }
                ran
            }
            _ => lt.gemm(a, w, bias, c, mnk, act, (T::F16, O::F32))?,
        };
        if ran {
            return Ok("cublaslt");
        }
    }
    k::gemm(dev, a, w, bias, c, mnk, act)
}
