// The Wan VAE's convolutions as an implicit GEMM on tensor cores: causal Conv3d (3×3×3,
// 3×1×1, 1×1×1) and Conv2d (kt = 1), stride 1 or 2, bf16 in and out, f32 accumulation, bias
// fused. CPU reference: engine/cpu/conv.rs (conv3d); launcher: engine/kernels/conv3d.rs.
//
// Activations are channel-last frames, [h][w][ci] bf16 each. The input sequence is a table
// of up to 8 frame pointers (null = a frame of zeros: the causal padding; the previous
// chunk's cached frames are just other pointers), so nothing is concatenated. Output frame t
// reads input frames t·st .. t·st + kt − 1:
//   out[t][y][x][o] = bias[o] + Σ_{dt,dy,dx,i} W[o][dt][dy][dx][i] ·
//                     in_{t·st+dt}[y·sh + dy − pad_top][x·sw + dx − pad_left][i]
// with zeros outside the frame, plus an optional residual (the resnet's shortcut, the
// attention block's input) read in the output's layout. Two reads are folded into the
// loads: the decoder's nearest 2× upsampling (`up`: in_t[y][x] is the stored frame's
// pixel [y/2][x/2], so the 4× larger upsampled frames never exist) and the temporal
// upsample's frame shuffle (`ld`: the elements between pixels; the time conv's
// [T][h][w][2·c] output is read as 2T frames of c channels at pointers base + t·frame +
// half·c with ld = 2·c). W is [co][kt·kh·kw·ci] (tap-major, channels inner; the
// launcher's device layout). Per output frame this is a GEMM with M = h_out·w_out pixels,
// N = co, K = kt·kh·kw·ci, walked tap by tap in steps of BK channels: the A tile is BM
// pixels' channels c0..c0+BK at one tap (gathered from the input with zero fill for the
// padding, the tail channels and the null frames), the B tile BN output channels' weights at
// the same (tap, c0). The pipeline, fragments and tiles are gemm.cu's (3 cp.async stages,
// ldmatrix, m16n8k16 mma; rows padded by 16 bytes).
//
// Variants (input channels ci): conv3d_bf16_c8 (ci % 8 == 0: 16-byte copies), conv3d_bf16_c2
// (even ci: 4-byte copies; the tiny models' 12 and 24), conv3d_bf16_c1 (any ci, e.g. the
// encoder's first conv on 3 RGB channels: plain loads, no cp.async). Tiles BM 64 × BN 64 ×
// BK 32, 4 warps of 32 × 32. Not yet measured on a GPU.
#include "common/reel_cuda.cuh"
#include "common/reel_mma.cuh"

typedef __nv_bfloat16 bf16;

namespace conv {

constexpr int BM = 64, BN = 64, BK = 32, WM = 2, WN = 2, STAGES = 3;
constexpr int THREADS = 32 * WM * WN, WTM = BM / WM, WTN = BN / WN, MT = WTM / 16, NT = WTN / 8;
constexpr int LD = BK + 8;
constexpr int STAGE_ELEMS = (BM + BN) * LD;
constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * 2;

struct Geometry {
  int h, w, ci, co;            // input frame size (after the upsampling), channels
  int ld;                      // elements from one input pixel to the next (≥ ci)
  int up;                      // 1: the frames hold (h/2)·(w/2) pixels, read 2× upsampled
  int kt, kh, kw, st, sh, sw;  // kernel and strides
  int pad_top, pad_left;
  int h_out, w_out;
  int csteps;  // ⌈ci / BK⌉: K steps per tap
};

// The (at most 3) input frames one output frame reads, held in registers: the launch's 8
// pointers are selected once per block with compile-time indices (an array indexed at run
// time would live in local memory).
template <class T>
struct Window {
  const T *f0, *f1, *f2;
  __device__ __forceinline__ const T* at(int dt) const { return dt == 0 ? f0 : (dt == 1 ? f1 : f2); }
};

template <class T>
__device__ __forceinline__ const T* pick(const T* const (&all)[8], int i) {
  const T* r = nullptr;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (i == j) r = all[j];
  return r;
}

// Copies `bytes` (2, 4 or 16) of which the first `src_bytes` from src, zeros after. CHUNK 2:
// a plain synchronous copy (no alignment beyond 2 bytes).
template <class T, int CHUNK>
__device__ __forceinline__ void copy(T* dst, const T* src, int src_elems) {
  if constexpr (CHUNK == 2) {
    *dst = src_elems > 0 ? *src : Num<T>::from(0.0f);
  } else {
    cp_async_zfill<CHUNK>(dst, src, static_cast<unsigned>(src_elems * 2));
  }
}

// K step s (tap s / csteps, channels (s % csteps)·BK ..) of output frame t into a stage.
template <class T, int CHUNK>
__device__ __forceinline__ void load_step(T* sa, T* sw, const Window<T>& win, const T* w,
                                          const Geometry& g, int m0, int n0, int s) {
  constexpr int EPC = CHUNK / 2;
  constexpr int CPR = BK / EPC;
  const int tap = s / g.csteps, c0 = (s % g.csteps) * BK;
  const int dt = tap / (g.kh * g.kw), dy = (tap / g.kw) % g.kh, dx = tap % g.kw;
  const T* frame = win.at(dt);
  const int m = g.h_out * g.w_out;
  for (int i = threadIdx.x; i < BM * CPR; i += THREADS) {
    const int r = i / CPR, c = (i % CPR) * EPC;
    const int p = m0 + r;
    const int y = p / g.w_out, x = p % g.w_out;
    const int yy = y * g.sh + dy - g.pad_top, xx = x * g.sw + dx - g.pad_left;
    const bool inside = p < m && frame != nullptr && yy >= 0 && yy < g.h && xx >= 0 && xx < g.w;
    const int valid = inside ? max(0, min(EPC, g.ci - (c0 + c))) : 0;
    const long long pix = static_cast<long long>(yy >> g.up) * (g.w >> g.up) + (xx >> g.up);
    const T* src = valid > 0 ? frame + pix * g.ld + c0 + c : w;
    copy<T, CHUNK>(sa + r * LD + c, src, valid);
  }
  const long long kall = static_cast<long long>(g.kt) * g.kh * g.kw * g.ci;
  for (int i = threadIdx.x; i < BN * CPR; i += THREADS) {
    const int r = i / CPR, c = (i % CPR) * EPC;
    const int valid = n0 + r < g.co ? max(0, min(EPC, g.ci - (c0 + c))) : 0;
    const T* src = valid > 0 ? w + (n0 + r) * kall + static_cast<long long>(tap) * g.ci + c0 + c : w;
    copy<T, CHUNK>(sw + r * LD + c, src, valid);
  }
}

template <class T, int CHUNK>
__device__ __forceinline__ void run(const Window<T>& win, const T* __restrict__ w,
                                    const float* __restrict__ bias, const T* res, T* __restrict__ out,
                                    long long out_frame, const Geometry& g) {
  REEL_DYNAMIC_SHARED(unsigned char, smem_bytes);  // one declaration for every storage type
  T* const smem = reinterpret_cast<T*>(smem_bytes);
  const int t = blockIdx.z, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
  const int wm = (warp / WN) * WTM, wn = (warp % WN) * WTN;
  const int ksteps = g.kt * g.kh * g.kw * g.csteps;
  const int m = g.h_out * g.w_out;
  auto stage_a = [&](int s) { return smem + s * STAGE_ELEMS; };
  auto stage_w = [&](int s) { return smem + s * STAGE_ELEMS + BM * LD; };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ksteps) load_step<T, CHUNK>(stage_a(s), stage_w(s), win, w, g, m0, n0, s);
    cp_async_commit();
  }
  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  for (int ks = 0; ks < ksteps; ++ks) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = ks + STAGES - 1;
    if (next < ksteps)
      load_step<T, CHUNK>(stage_a(next % STAGES), stage_w(next % STAGES), win, w, g, m0, n0, next);
    cp_async_commit();
    const T* sa = stage_a(ks % STAGES);
    const T* sw = stage_w(ks % STAGES);
    const int kc = (ks % g.csteps) * BK;
    // Work on zero fill is skipped: a 16-channel half of the step past ci (the tiny models'
    // 12 and 24 channels), and a warp's 8-column fragments past co or 16-row fragments past
    // the frame's pixels. The conditions are uniform over the block or the warp, and what is
    // skipped would have added exact zeros or fed outputs never stored.
    const bool warp_live = n0 + wn < g.co && m0 + wm < m;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      if (!warp_live || kc + kk >= g.ci) continue;
      uint32_t af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
        ldmatrix<4, false>(af[i], sa + (wm + i * 16 + lane % 16) * LD + kk + (lane / 16) * 8);
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        if (n0 + wn + j * 8 >= g.co) continue;
        const bool second = n0 + wn + (j + 1) * 8 < g.co;
        uint32_t bf[4];
        ldmatrix<4, false>(bf, sw + (wn + j * 8 + lane % 8 + (lane / 16) * 8) * LD + kk + ((lane / 8) % 2) * 8);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          if (m0 + wm + i * 16 >= m) continue;
          mma_m16n8k16<T>(acc[i][j], af[i], b0, acc[i][j]);
          if (second) mma_m16n8k16<T>(acc[i][j + 1], af[i], b1, acc[i][j + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();
  T* o = out + t * out_frame;
  const T* rt = res != nullptr ? res + t * out_frame : nullptr;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = m0 + wm + i * 16 + gq + (e >= 2 ? 8 : 0);
        const int col = n0 + wn + j * 8 + 2 * tq + (e & 1);
        if (row < m && col < g.co) {
          const long long at = static_cast<long long>(row) * g.co + col;
          float v = acc[i][j][e] + bias[col];
          if (rt != nullptr) v += Num<T>::to(rt[at]);
          o[at] = Num<T>::from(v);
        }
      }
}

}  // namespace conv

// Parameters: 8 input frame pointers (null: zeros; those past the sequence unused), the
// weights [co][kt·kh·kw·ci], bias [co] f32, res (null, or a residual added to the output, in
// out's layout), out (frame t at out + t·out_frame), then the geometry. Grid (⌈co/64⌉,
// ⌈h_out·w_out/64⌉, t_out), 128 threads, conv::SMEM_BYTES.
#define REEL_CONV_VARIANT(name, T, CHUNK)                                                                         \
  extern "C" __global__ void __launch_bounds__(conv::THREADS, 1)                                                 \
      name(const T* f0, const T* f1, const T* f2, const T* f3, const T* f4, const T* f5, const T* f6, const T* f7, \
           const T* w, const float* bias, const T* res, T* out, long long out_frame, int h, int wd, int ci, int co, \
           int ld, int up, int kt, int kh, int kw, int st, int sh, int sw, int pad_top, int pad_left, int h_out,    \
           int w_out) {                                                                                          \
    const T* frames[8] = {f0, f1, f2, f3, f4, f5, f6, f7};                                                       \
    const conv::Geometry g{h, wd, ci, co, ld, up, kt, kh, kw, st, sh, sw, pad_top, pad_left,                      \
                           h_out, w_out, (ci + conv::BK - 1) / conv::BK};                                        \
    const int t0 = blockIdx.z * st;                                                                              \
    const conv::Window<T> win{conv::pick(frames, t0), conv::pick(frames, t0 + 1), conv::pick(frames, t0 + 2)};  \
    conv::run<T, CHUNK>(win, w, bias, res, out, out_frame, g);                                                   \
  }

REEL_CONV_VARIANT(conv3d_bf16_c8, bf16, 16)
REEL_EMU_EXPORT(conv3d_bf16_c8)
REEL_CONV_VARIANT(conv3d_bf16_c2, bf16, 4)
REEL_EMU_EXPORT(conv3d_bf16_c2)
REEL_CONV_VARIANT(conv3d_bf16_c1, bf16, 2)
REEL_EMU_EXPORT(conv3d_bf16_c1)
REEL_CONV_VARIANT(conv3d_f16_c8, __half, 16)
REEL_EMU_EXPORT(conv3d_f16_c8)
REEL_CONV_VARIANT(conv3d_f16_c2, __half, 4)
REEL_EMU_EXPORT(conv3d_f16_c2)
REEL_CONV_VARIANT(conv3d_f16_c1, __half, 2)
REEL_EMU_EXPORT(conv3d_f16_c1)
