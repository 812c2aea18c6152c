// Norm kernels, bf16 in and out, f32 math. CPU reference: engine/cpu/norm.rs; launchers:
// engine/kernels/norm.rs.
#include "common/reel_cuda.cuh"

typedef __nv_bfloat16 bf16;

// Sums v over the block (blockDim.x a multiple of 32, at most 1024; the launchers pick a
// power of two from 32 to 256 by row length): a butterfly within each warp, the warp sums
// through shared memory, every thread adds them up (at most 32 broadcast reads). Two block
// barriers instead of the log2(blockDim) of a shared-memory tree. `red` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  const int warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += red[w];
  __syncthreads();  // red is reused by the next reduction
  return total;
}

// LayerNorm over the last dimension (biased variance, two passes) followed by the adaLN
// modulation y = LN(x)·mul[g] + add[g], g = row / rows_per_group (mul = 1 + scale, add =
// shift, f32 as diffusers keeps modulation). One block per row. x, y: [rows, d] bf16.
extern "C" __global__ void layernorm_modulate_bf16(const bf16* __restrict__ x, bf16* __restrict__ y,
                                                   const float* __restrict__ mul, const float* __restrict__ add,
                                                   int rows, int d, int rows_per_group, float eps) {
  REEL_SHARED(float, red, [32]);
  int row = blockIdx.x;
  if (row >= rows) return;
  const bf16* xr = x + (size_t)row * d;
  bf16* yr = y + (size_t)row * d;
  int g = row / rows_per_group;
  float s = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += __bfloat162float(xr[i]);
  float mean = block_sum(s, red) / d;
  float q = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float c = __bfloat162float(xr[i]) - mean;
    q += c * c;
  }
  float rstd = rsqrtf(block_sum(q, red) / d + eps);
  const float* m = mul + (size_t)g * d;
  const float* a = add + (size_t)g * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = (__bfloat162float(xr[i]) - mean) * rstd * m[i] + a[i];
    yr[i] = __float2bfloat16(v);
  }
}
REEL_EMU_EXPORT(layernorm_modulate_bf16)

// bf16 ↔ f32, grid-stride.
extern "C" __global__ void bf16_to_f32(const bf16* __restrict__ x, float* __restrict__ y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    y[i] = __bfloat162float(x[i]);
}
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, bf16* __restrict__ y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    y[i] = __float2bfloat16(x[i]);
}
REEL_EMU_EXPORT(bf16_to_f32)
REEL_EMU_EXPORT(f32_to_bf16)

// Wan's QK norm: RMSNorm over the whole row (all heads, "rms_norm_across_heads") of
// x + bias, times weight, then the 3D RoPE rotation of each head's pairs (2p, 2p+1) by the
// angle table of the row's token (token = row mod tokens). In place on x: [rows, d] bf16;
// bias may be null; cos, sin: [tokens, head_dim/2] f32. One block per row.
extern "C" __global__ void rms_norm_rope_bf16(bf16* __restrict__ x, const float* __restrict__ bias,
                                              const float* __restrict__ weight, const float* __restrict__ cos_t,
                                              const float* __restrict__ sin_t, int rows, int d, int head_dim,
                                              int tokens, float eps, long long row_stride) {
  REEL_SHARED(float, red, [32]);
  int row = blockIdx.x;
  if (row >= rows) return;
  bf16* xr = x + row * row_stride;
  float q = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = __bfloat162float(xr[i]) + (bias ? bias[i] : 0.0f);
    q += v * v;
  }
  float r = rsqrtf(block_sum(q, red) / d + eps);
  int half = head_dim / 2;
  int tok = row % tokens;
  // Each thread owns whole pairs, so the rotation reads only what it normalised.
  for (int p = threadIdx.x; p < d / 2; p += blockDim.x) {
    int i = 2 * p;
    float a = (__bfloat162float(xr[i]) + (bias ? bias[i] : 0.0f)) * r * weight[i];
    float b = (__bfloat162float(xr[i + 1]) + (bias ? bias[i + 1] : 0.0f)) * r * weight[i + 1];
    if (cos_t) {
      int k = p % half;
      float c = cos_t[(size_t)tok * half + k], s = sin_t[(size_t)tok * half + k];
      float ra = a * c - b * s, rb = a * s + b * c;
      a = ra;
      b = rb;
    }
    xr[i] = __float2bfloat16(a);
    xr[i + 1] = __float2bfloat16(b);
  }
}
REEL_EMU_EXPORT(rms_norm_rope_bf16)

// The VAE's channel RMS norm, y = x / max(‖x‖₂, 1e-12)·√c·γ, fused with SiLU when `silu`,
// on channel-last [rows, c] (bf16 or f16; y may be x). A row is c ≤ a few hundred channels
// (96 to 384 in Wan's VAE, 400K rows per frame at 480p), so one warp per row, 8 rows per
// block: the sum of squares is a shuffle reduction, with no shared memory and no block
// barrier. Rows of even c on 4-byte boundaries are read and written as pairs.
template <class T>
__device__ __forceinline__ void channel_rms_silu(const T* x, T* y, const float* __restrict__ gamma, int rows, int c,
                                                 int silu) {
  typedef typename Num<T>::T2 T2;
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + (size_t)row * c;
  T* yr = y + (size_t)row * c;
  const bool pairs = c % 2 == 0 && (reinterpret_cast<uintptr_t>(x) % 4) == 0 && (reinterpret_cast<uintptr_t>(y) % 4) == 0;
  float q = 0.0f;
  if (pairs) {
    for (int i = 2 * lane; i < c; i += 64) {
      const float2 v = Num<T>::unpair(*reinterpret_cast<const T2*>(xr + i));
      q += v.x * v.x + v.y * v.y;
    }
  } else {
    for (int i = lane; i < c; i += 32) {
      const float v = Num<T>::to(xr[i]);
      q += v * v;
    }
  }
  for (int o = 16; o > 0; o /= 2) q += __shfl_xor_sync(0xffffffffu, q, o);
  const float k = sqrtf((float)c) / fmaxf(sqrtf(q), 1e-12f);
  auto f = [&](float v, int i) {
    float r = v * k * gamma[i];
    return silu ? r / (1.0f + __expf(-r)) : r;
  };
  if (pairs) {
    for (int i = 2 * lane; i < c; i += 64) {
      const float2 v = Num<T>::unpair(*reinterpret_cast<const T2*>(xr + i));
      *reinterpret_cast<T2*>(yr + i) = Num<T>::pair(f(v.x, i), f(v.y, i + 1));
    }
  } else {
    for (int i = lane; i < c; i += 32) yr[i] = Num<T>::from(f(Num<T>::to(xr[i]), i));
  }
}
extern "C" __global__ void channel_rms_silu_bf16(const bf16* x, bf16* y, const float* __restrict__ gamma, int rows,
                                                 int c, int silu) {
  channel_rms_silu(x, y, gamma, rows, c, silu);
}
extern "C" __global__ void channel_rms_silu_f16(const __half* x, __half* y, const float* __restrict__ gamma, int rows,
                                                int c, int silu) {
  channel_rms_silu(x, y, gamma, rows, c, silu);
}
REEL_EMU_EXPORT(channel_rms_silu_bf16)
REEL_EMU_EXPORT(channel_rms_silu_f16)

// The gated residual of a Wan block: x += (y + bias)·gate[g], g = row / rows_per_group;
// bias and gate may be null. x, y: [rows, d] bf16; bias: [d], gate: [groups, d] f32.
extern "C" __global__ void residual_gate_bf16(bf16* __restrict__ x, const bf16* __restrict__ y,
                                              const float* __restrict__ bias, const float* __restrict__ gate,
                                              int rows, int d, int rows_per_group) {
  size_t n = (size_t)rows * d;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    int col = (int)(i % d);
    int g = (int)(i / d) / rows_per_group;
    float v = __bfloat162float(y[i]) + (bias ? bias[col] : 0.0f);
    if (gate) v *= gate[(size_t)g * d + col];
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + v);
  }
}
REEL_EMU_EXPORT(residual_gate_bf16)

// GELU-tanh on bf16, f32 math.
extern "C" __global__ void gelu_tanh_bf16(const bf16* __restrict__ x, bf16* __restrict__ y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float v = __bfloat162float(x[i]);
    float u = 0.7978845608f * (v + 0.044715f * v * v * v);
    y[i] = __float2bfloat16(0.5f * v * (1.0f + tanhf(u)));
  }
}
REEL_EMU_EXPORT(gelu_tanh_bf16)
