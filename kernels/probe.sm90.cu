// Compiled for sm_90a alone (build.rs: the `.sm90.cu` suffix), like the Hopper kernels to
// come: the module a pre-Hopper GPU cannot load, which Cuda::open must skip. On a GPU it
// writes __CUDA_ARCH__ (900 on an H100/H200); on emu, -1.
#include "common/reel_cuda.cuh"

extern "C" __global__ void arch_probe(int* out) {
#if defined(__CUDA_ARCH__)
  if (threadIdx.x == 0) out[0] = __CUDA_ARCH__;
#else
  if (threadIdx.x == 0) out[0] = -1;
#endif
}
REEL_EMU_EXPORT(arch_probe)
