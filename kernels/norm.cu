// Norm kernels, bf16 in and out, f32 math. CPU reference: engine/cpu/norm.rs.
#include "common/reel_cuda.cuh"

typedef __nv_bfloat16 bf16;

// Sums v over the block (blockDim.x a power of two ≤ 1024) through shared memory; every
// thread gets the total. `red` holds blockDim.x floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
  int t = threadIdx.x;
  red[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) red[t] += red[t + s];
    __syncthreads();
  }
  float total = red[0];
  __syncthreads();  // red is reused by the next reduction
  return total;
}

// LayerNorm over the last dimension (biased variance, two passes) followed by the adaLN
// modulation y = LN(x)·mul[g] + add[g], g = row / rows_per_group (mul = 1 + scale, add =
// shift, f32 as diffusers keeps modulation). One block per row. x, y: [rows, d] bf16.
extern "C" __global__ void layernorm_modulate_bf16(const bf16* __restrict__ x, bf16* __restrict__ y,
                                                   const float* __restrict__ mul, const float* __restrict__ add,
                                                   int rows, int d, int rows_per_group, float eps) {
  __shared__ float red[1024];
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
struct LayerNormArgs {
  const bf16* x;
  bf16* y;
  const float* mul;
  const float* add;
  int rows;
  int d;
  int rows_per_group;
  float eps;
};
REEL_EMU_EXPORT(layernorm_modulate_bf16, LayerNormArgs, a.x, a.y, a.mul, a.add, a.rows, a.d, a.rows_per_group,
                a.eps)

// bf16 ↔ f32, grid-stride.
extern "C" __global__ void bf16_to_f32(const bf16* __restrict__ x, float* __restrict__ y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    y[i] = __bfloat162float(x[i]);
}
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, bf16* __restrict__ y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    y[i] = __float2bfloat16(x[i]);
}
struct ToF32Args {
  const bf16* x;
  float* y;
  int n;
};
struct ToBf16Args {
  const float* x;
  bf16* y;
  int n;
};
REEL_EMU_EXPORT(bf16_to_f32, ToF32Args, a.x, a.y, a.n)
REEL_EMU_EXPORT(f32_to_bf16, ToBf16Args, a.x, a.y, a.n)
