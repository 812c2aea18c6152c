// Elementwise kernels. Each has a float32 CPU reference in engine/cpu (the oracle its emu
// test compares against). First kernels of the emulator bring-up; the bf16 variants of
// issue 6 follow the same pattern.
#include "common/reel_cuda.cuh"

// y = gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))), grid-stride loop.
// CPU reference: engine/cpu (gelu, simd::gelu_tanh).
extern "C" __global__ void gelu_tanh_f32(float* __restrict__ y, const float* __restrict__ x, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float v = x[i];
    float u = 0.7978845608f * (v + 0.044715f * v * v * v);
    y[i] = 0.5f * v * (1.0f + tanhf(u));
  }
}
REEL_EMU_EXPORT(gelu_tanh_f32)

// y[t] = x[t − 1] within one block (y[0] = x[0]) through shared memory: the emulator's
// barrier test. `shift_shared_nosync` deliberately omits the __syncthreads(): run in thread
// order it happens to give the right answer (each thread's left neighbour has already
// written), and only REEL_EMU_SHUFFLE's reordering exposes the race.
extern "C" __global__ void shift_shared(float* y, const float* x, int n) {
  REEL_SHARED(float, buf, [1024]);
  int t = threadIdx.x;
  if (t < n) buf[t] = x[t];
  __syncthreads();
  if (t < n) y[t] = buf[t == 0 ? 0 : t - 1];
}
extern "C" __global__ void shift_shared_nosync(float* y, const float* x, int n) {
  REEL_SHARED(float, buf, [1024]);
  int t = threadIdx.x;
  if (t < n) buf[t] = x[t];
  if (t < n) y[t] = buf[t == 0 ? 0 : t - 1];
}
REEL_EMU_EXPORT(shift_shared)
REEL_EMU_EXPORT(shift_shared_nosync)
