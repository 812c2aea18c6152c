// The Wan DiT's glue kernels (the heavy ones are gemm.cu, attention.cu, norm.cu): patch
// embedding's im2col, the output head's inverse, the adaLN modulation tables, and f32
// activations feeding a bf16 GEMM. CPU references: engine/cpu/embed.rs (patchify,
// unpatchify), engine/models/wan_dit/cpu.rs (modulation); launchers: engine/kernels/dit.rs.
#include "common/reel_cuda.cuh"

typedef __nv_bfloat16 bf16;

// im2col of the patch Conv3d (kernel = stride = (pt, ph, pw)): x f32 [B, C, T, H, W] →
// out bf16 [B·L, C·pt·ph·pw], tokens in (t, h, w) order, features in the weight's
// (c, kt, kh, kw) order. Grid-stride over the output.
extern "C" __global__ void patchify_bf16(const float* __restrict__ x, bf16* __restrict__ out, int b, int c, int t,
                                         int h, int w, int pt, int ph, int pw) {
  const int tt = t / pt, hh = h / ph, ww = w / pw;
  const long long k = static_cast<long long>(c) * pt * ph * pw;
  const long long n = static_cast<long long>(b) * tt * hh * ww * k;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = i / k;
    int col = static_cast<int>(i % k);
    const int kw = col % pw, kh = (col / pw) % ph, kt = (col / (pw * ph)) % pt, ci = col / (pw * ph * pt);
    const int wi = static_cast<int>(row % ww), hi = static_cast<int>((row / ww) % hh),
              ti = static_cast<int>((row / (static_cast<long long>(ww) * hh)) % tt);
    const long long bi = row / (static_cast<long long>(ww) * hh * tt);
    const long long src = (((bi * c + ci) * t + ti * pt + kt) * h + hi * ph + kh) * static_cast<long long>(w) + wi * pw + kw;
    out[i] = __float2bfloat16(x[src]);
  }
}
REEL_EMU_EXPORT(patchify_bf16)

// The output head's layout back to video: y f32 [B·L, pt·ph·pw·C] (features in (kt, kh, kw,
// c) order, as diffusers reshapes) → out f32 [B, C, T, H, W]. Grid-stride over y.
extern "C" __global__ void unpatchify_f32(const float* __restrict__ y, float* __restrict__ out, int b, int c, int tt,
                                          int hh, int ww, int pt, int ph, int pw) {
  const int t = tt * pt, h = hh * ph, w = ww * pw;
  const long long k = static_cast<long long>(c) * pt * ph * pw;
  const long long n = static_cast<long long>(b) * tt * hh * ww * k;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = i / k;
    const int col = static_cast<int>(i % k);
    const int ci = col % c, kw = (col / c) % pw, kh = (col / (c * pw)) % ph, kt = col / (c * pw * ph);
    const int wi = static_cast<int>(row % ww), hi = static_cast<int>((row / ww) % hh),
              ti = static_cast<int>((row / (static_cast<long long>(ww) * hh)) % tt);
    const long long bi = row / (static_cast<long long>(ww) * hh * tt);
    const long long dst = (((bi * c + ci) * t + ti * pt + kt) * h + hi * ph + kh) * static_cast<long long>(w) + wi * pw + kw;
    out[dst] = y[i];
  }
}
REEL_EMU_EXPORT(unpatchify_f32)

// adaLN modulation in f32 (as diffusers keeps it): out[j][b][i] = table[j][i] +
// proj[b·proj_stride + j·proj_row + i] + (1 if bit j of plus_one), for j < rows, b < batch,
// i < d. A block's six rows (shift, scale, gate ×2; scales get the 1) from its table and the
// timestep projection (proj_row = d); the output head's two from its table and temb
// (proj_row = 0). [rows, batch, d] so that each row is a [batch, d] table for the kernels.
extern "C" __global__ void modulation_f32(const float* __restrict__ table, const float* __restrict__ proj,
                                          float* __restrict__ out, int rows, int batch, int d, int proj_stride,
                                          int proj_row, int plus_one) {
  const long long n = static_cast<long long>(rows) * batch * d;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int col = static_cast<int>(i % d), bi = static_cast<int>((i / d) % batch), j = static_cast<int>(i / (static_cast<long long>(d) * batch));
    float v = table[static_cast<long long>(j) * d + col] + proj[static_cast<long long>(bi) * proj_stride + static_cast<long long>(j) * proj_row + col];
    if ((plus_one >> j) & 1) v = 1.0f + v;
    out[i] = v;
  }
}
REEL_EMU_EXPORT(modulation_f32)

// y = act(x) rounded to bf16: act 0 none, 1 SiLU (x·sigmoid(x)).
extern "C" __global__ void act_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y, int n, int act) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float v = x[i];
    if (act == 1) v = v / (1.0f + __expf(-v));
    y[i] = __float2bfloat16(v);
  }
}
REEL_EMU_EXPORT(act_f32_bf16)
