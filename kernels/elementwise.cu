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

// Philox4x32-10 (engine/rng.rs documents it; the same counter-to-element mapping): block
// counter ⌊i/4⌋ (64 bits in words 0 and 1), key = seed; its words become uniforms
// u = (x + 1)·2⁻³² and pairs of them normals by Box-Muller, here in f32:
// x[i] = mean + std·√(−2 ln u_a)·(cos, sin)(2π u_b). Random weights made on the device
// (`reel bench --random-weights` on cuda: no host copy of a 14B model).
__device__ __forceinline__ void philox4x32_10(unsigned c[4], unsigned k0, unsigned k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const unsigned long long p0 = 0xD2511F53ull * c[0], p1 = 0xCD9E8D57ull * c[2];
    const unsigned n0 = static_cast<unsigned>(p1 >> 32) ^ c[1] ^ k0;
    const unsigned n2 = static_cast<unsigned>(p0 >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<unsigned>(p1);
    c[3] = static_cast<unsigned>(p0);
    c[0] = n0;
    c[2] = n2;
  }
}
__device__ __forceinline__ void store_value(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_value(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store_value(__half* p, float v) { *p = __float2half_rn(v); }
template <class T>
__device__ __forceinline__ void fill_normal(T* x, long long n, unsigned long long seed, float mean, float std) {
  for (long long blk = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; blk * 4 < n;
       blk += static_cast<long long>(gridDim.x) * blockDim.x) {
    unsigned c[4] = {static_cast<unsigned>(blk), static_cast<unsigned>(static_cast<unsigned long long>(blk) >> 32), 0u,
                     0u};
    philox4x32_10(c, static_cast<unsigned>(seed), static_cast<unsigned>(seed >> 32));
    for (int p = 0; p < 2; ++p) {
      const float ua = (static_cast<float>(c[2 * p]) + 1.0f) * 2.3283064365386963e-10f;
      const float ub = (static_cast<float>(c[2 * p + 1]) + 1.0f) * 2.3283064365386963e-10f;
      const float r = sqrtf(-2.0f * logf(ua)), th = 6.283185307179586f * ub;
      const long long i = blk * 4 + 2 * p;
      if (i < n) store_value(x + i, mean + std * r * cosf(th));
      if (i + 1 < n) store_value(x + i + 1, mean + std * r * sinf(th));
    }
  }
}
extern "C" __global__ void fill_normal_f32(float* x, long long n, unsigned long long seed, float mean, float std) {
  fill_normal(x, n, seed, mean, std);
}
REEL_EMU_EXPORT(fill_normal_f32)
extern "C" __global__ void fill_normal_bf16(__nv_bfloat16* x, long long n, unsigned long long seed, float mean,
                                            float std) {
  fill_normal(x, n, seed, mean, std);
}
REEL_EMU_EXPORT(fill_normal_bf16)
extern "C" __global__ void fill_normal_f16(__half* x, long long n, unsigned long long seed, float mean, float std) {
  fill_normal(x, n, seed, mean, std);
}
REEL_EMU_EXPORT(fill_normal_f16)

// dst[0..n) = src[0..n) in bytes, 16 at a time when both are 16-byte aligned and n is a
// multiple of 16, else 1 at a time; grid-stride. A device-to-device copy that is a kernel
// (so it runs on emu as on cuda, and in a captured graph); the VAE's causal caches are
// refreshed with it. The buffers must not overlap.
extern "C" __global__ void copy_bytes(unsigned char* __restrict__ dst, const unsigned char* __restrict__ src,
                                      long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | (uintptr_t)n) % 16 == 0) {
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    for (long long i = i0; i < n / 16; i += stride) d[i] = s[i];
  } else {
    for (long long i = i0; i < n; i += stride) dst[i] = src[i];
  }
}
REEL_EMU_EXPORT(copy_bytes)
