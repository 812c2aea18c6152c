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

// Benchmark inputs made on the device, reproducible by any other program (bench/
// attention_gpu.py builds the same tensors in torch): x[i] = bf16((u·2 − 1)·scale) with
// u = (h(i ⊕ h(seed)) >> 8)·2⁻²⁴ and h the lowbias32 integer hash (x ^= x >> 16;
// x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16), i < 2³².
__device__ __forceinline__ unsigned lowbias32(unsigned x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
extern "C" __global__ void fill_hash_bf16(__nv_bfloat16* x, long long n, unsigned seed, float scale) {
  const unsigned hs = lowbias32(seed);
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float u = static_cast<float>(lowbias32(static_cast<unsigned>(i) ^ hs) >> 8) * (1.0f / 16777216.0f);
    x[i] = __float2bfloat16((u * 2.0f - 1.0f) * scale);
  }
}
REEL_EMU_EXPORT(fill_hash_bf16)
