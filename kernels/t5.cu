// umT5's row kernels (the text encoder on a device: engine/models/umt5_gpu.rs). The residual
// stream stays f32 from the embedding to the last norm, as transformers keeps it in f32
// checkpoints (T5's activations grow large through the layers: bf16 would round the
// stream itself, not only the GEMM inputs). CPU references: engine/cpu/norm.rs
// (rms_norm_rope without bias or rotation) and cpu::gelu_mul; launchers: engine/kernels/t5.rs.
#include "common/reel_cuda.cuh"

typedef __nv_bfloat16 bf16;

// Sum over the block (blockDim.x a power of two from 32 to 256): warp butterflies, then the
// warp sums through shared memory. `red` holds 32 floats.
__device__ __forceinline__ float t5_block_sum(float v, float* red) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < (int)blockDim.x / 32; ++w) total += red[w];
  __syncthreads();
  return total;
}

// The residual add and the T5 layer norm of the next sub-layer in one pass over a row:
// x += y (when y is not null; x written back), then out = x / √(mean(x²) + eps) · weight
// (no mean subtraction, no bias). x, y: [rows, d] f32; weight: [d] f32; out: [rows, d] of T
// (bf16: the next GEMM's input; f32: the final norm). One block per row.
template <class T>
__device__ __forceinline__ void add_norm(float* __restrict__ x, const float* __restrict__ y,
                                         const float* __restrict__ weight, T* __restrict__ out, int rows, int d,
                                         float eps) {
  REEL_SHARED(float, red, [32]);
  const int row = blockIdx.x;
  if (row >= rows) return;
  float* xr = x + (size_t)row * d;
  const float* yr = y ? y + (size_t)row * d : nullptr;
  T* orow = out + (size_t)row * d;
  float q = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = xr[i];
    if (yr) {
      v += yr[i];
      xr[i] = v;
    }
    q += v * v;
  }
  const float r = rsqrtf(t5_block_sum(q, red) / d + eps);
  // Each thread reads back only the elements it wrote.
  for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = Num<T>::from(xr[i] * r * weight[i]);
}
extern "C" __global__ void t5_add_norm_bf16(float* x, const float* y, const float* weight, bf16* out, int rows,
                                            int d, float eps) {
  add_norm(x, y, weight, out, rows, d, eps);
}
extern "C" __global__ void t5_add_norm_f32(float* x, const float* y, const float* weight, float* out, int rows, int d,
                                           float eps) {
  add_norm(x, y, weight, out, rows, d, eps);
}
extern "C" __global__ void t5_add_norm_f16(float* x, const float* y, const float* weight, __half* out, int rows,
                                           int d, float eps) {
  add_norm(x, y, weight, out, rows, d, eps);
}
REEL_EMU_EXPORT(t5_add_norm_bf16)
REEL_EMU_EXPORT(t5_add_norm_f32)
REEL_EMU_EXPORT(t5_add_norm_f16)

// The gated-GELU of T5's feed-forward on one GEMM's output against the concatenated
// [wi_0; wi_1] weights: h: [rows, 2f] f32 (columns 0..f: x·wi_0ᵀ, f..2f: x·wi_1ᵀ) →
// out: [rows, f] of T (the next GEMM's input) = gelu_new(h[:, :f]) ⊙ h[:, f:] (gelu_new: the
// tanh approximation, f32 math). Grid-stride over rows·f.
template <class T>
__device__ __forceinline__ void gated_gelu(const float* __restrict__ h, T* __restrict__ out, long long rows, int f) {
  const long long n = rows * f;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / f;
    const int c = (int)(i - r * f);
    const float a = h[r * 2 * f + c], b = h[r * 2 * f + f + c];
    const float u = 0.7978845608f * (a + 0.044715f * a * a * a);
    out[i] = Num<T>::from(0.5f * a * (1.0f + tanhf(u)) * b);
  }
}
extern "C" __global__ void t5_gated_gelu_bf16(const float* h, bf16* out, long long rows, int f) {
  gated_gelu(h, out, rows, f);
}
extern "C" __global__ void t5_gated_gelu_f16(const float* h, __half* out, long long rows, int f) {
  gated_gelu(h, out, rows, f);
}
REEL_EMU_EXPORT(t5_gated_gelu_bf16)
REEL_EMU_EXPORT(t5_gated_gelu_f16)
