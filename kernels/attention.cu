// Flash attention forward on tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulation):
// the FlashAttention-2 schedule for sm_80 to sm_90. Non-causal, no mask (Wan attends
// zero-padded text without one). CPU reference: engine/cpu/attention.rs; launcher:
// engine/kernels/attention.rs, which picks the variant below.
//
// Layout (what the QKV projection writes; no transpose copy): Q is [B, Lq, ·] with row
// stride q_row and batch stride q_batch (elements), head h occupying columns
// h·head_dim .. (h+1)·head_dim of a row; K and V likewise over Lk rows; O is written the same
// way. So a fused projection output [B·L, 3·D] is read in place with q = base, k = base + D,
// v = base + 2·D and every row stride 3·D. Offsets are 64-bit (376,000 tokens × 3 × 5,120 >
// 2³¹). The optional row log-sum-exp `lse` is f32 [B, H, Lq], natural log of
// Σ_j exp(scale·q·k_j) (what sequence-parallel and KV-cache merges combine).
//
// Algorithm: a block owns BM = 16·WARPS query rows of one (batch, head); each warp owns 16
// rows, its Q fragments in registers (read once through ldmatrix). K and V stream through
// shared memory in tiles of BN keys, double-buffered by cp.async (the next tile loads while
// this one is used). Per tile: S = Q·Kᵀ (mma, K fragments by ldmatrix), the keys past Lk
// masked to −∞, the online softmax in the log2 domain (scores times scale·log2 e, so one
// exp2 per score; running max m and per-thread partial sums l, rows shared by the four lanes
// of a quad), P rounded to bf16 straight from the S accumulators into A fragments (the C
// layout of two n-tiles of 8 keys is the A layout of one k-step of 16), O += P·V (V fragments
// by ldmatrix.trans). O is normalised once at the end. Tails: rows past Lq and keys past Lk
// load as zeros (cp.async zero-fill, no branch around the copy); head_dim below the padded
// HD loads zero columns, which add nothing to Q·Kᵀ and are not written.
//
// QK-RMSNorm + 3D RoPE (Wan normalises Q and K across all heads, so one head's block cannot
// compute it): the choice is (a) the existing rms_norm_rope_bf16 kernel rewriting Q and K in
// place before attention, or (b) a per-row inverse RMS from the projection's epilogue with
// the weight and rotation applied as tiles are loaded. Bytes per token: (a) reads and writes
// Q and K once, 2 × 2·D × 2 B = 8·D B, plus the f32 cos/sin tables (4·head_dim B): 12.8 KB at
// D = 1,536, 41.5 KB at D = 5,120; at 32,760 tokens 0.42 / 1.36 GB per layer, ~0.13 / 0.41 ms
// at 3.3 TB/s, against ~17 / 58 ms of attention (6.6 / 22 TFLOP at 380 TFLOP/s): under 1%.
// (b) saves those bytes but needs a reduction across the GEMM's column tiles for the row RMS
// and repeats the rotation on every K tile load, ⌈Lq/BM⌉ = 256 times per K element at 32,760
// tokens, inside the loop that decides the speed. Chosen: (a). Cross-attention is the same
// kernel with K/V from the text (Lk = 512, zero-padded rows attended like any other) and
// Q, K normalised by rms_norm_rope_bf16 without RoPE.
//
// Variants (HD: head_dim padded to a multiple of 16; shared memory = Q tile + 2 stages of K
// and V, rows padded by 16 bytes so that ldmatrix's 8 rows fall in 8 different bank groups):
//   flash_attn_hd128_bn64   HD 128, 8 warps (BM 128), BN 64, 16-byte cp.async,
//                           34,816 + 69,632 = 104,448 B: sm_80 (163 KB), sm_90 (227 KB)
//   flash_attn_hd128_bn32   the same with BN 32, 69,632 B: sm_86/89 (99 KB)
//   flash_attn_hd64_bn128   HD 64, 8 warps, BN 128, 18,432 + 73,728 = 92,160 B: every arch
//   flash_attn_any_hdN      the generic path for any even head_dim ≤ 256 (the golden and demo
//                           models use 12, 16, 24, 32, 48) and for pointers or strides that
//                           are not 16-byte aligned: N = 16, 32, 64, 128 (4 warps, BN 64,
//                           4-byte cp.async, Q in registers) and 256 (BN 32, Q re-read from
//                           shared memory to stay within the register file)
//   flash_attn_qk384_v192_bn32 / _bn16   head_dim 257..384 (the VAE mid-block's single head of
//                           384 channels): Q·Kᵀ over the whole head, V and O split into two
//                           launches of ≤ 192 columns, so the O accumulator is 96 floats per
//                           thread, not 192 (S is computed twice: 1.5× the FLOPs of one pass);
//                           Q re-read from shared memory, 4 warps, 16-byte copies (aligned
//                           operands only). 50,176 + 2 × (K 25,088 + V 12,800) = 125,952 B
//                           (bn32: sm_80, sm_90) or 88,064 B (bn16: sm_86/89)
// Register budget (255 per thread; per thread: O = HD/2 f32, S = BN/2 f32, Q fragments HD/4
// words), ptxas sm_90a / sm_80: hd128_bn64 198 / 206 (256 threads: 50.7K of the SM's 64K
// registers, one block per SM), hd128_bn32 182 / 184, hd64_bn128 198 / 202, any_hd16 84 / 92,
// any_hd32 102 / 109, any_hd64 142 / 144, any_hd128 198 / 206, any_hd256 233 / 231 (Q not in
// registers: 64 words saved), qk384_v192_bn32 204 / 205, qk384_v192_bn16 180 / 186. No spills and no stack frame (tested). Not yet measured on a
// GPU: the tile choices follow FlashAttention-2's for sm_80 and wait for gpu-check's numbers
// (bench/attention_gpu.py).
#include "common/reel_cuda.cuh"
#include "common/reel_mma.cuh"

typedef __nv_bfloat16 bf16;

namespace flash {

template <class T_, int HD_, int HDV_, int WARPS_, int BN_, int CHUNK_, bool Q_REGS_, bool BIAS_ = false>
struct Config {
  typedef T_ T;                           // storage: __nv_bfloat16 or __half
  static constexpr bool BIAS = BIAS_;     // additive relative-position and key biases (umT5)
  static constexpr int HD = HD_;          // padded head dim of Q and K
  static constexpr int HDV = HDV_;        // padded columns of V and O per launch
  static constexpr int WARPS = WARPS_;
  static constexpr int BM = 16 * WARPS_;  // query rows per block
  static constexpr int BN = BN_;          // keys per tile
  static constexpr int CHUNK = CHUNK_;    // bytes per cp.async
  static constexpr bool Q_REGS = Q_REGS_;
  static constexpr int THREADS = 32 * WARPS_;
  static constexpr int LD = HD + 8;  // shared row stride (elements): rows 16 bytes apart mod 128
  static constexpr int LDV = HDV + 8;
  static constexpr int Q_ELEMS = BM * LD;
  static constexpr int K_ELEMS = BN * LD;
  static constexpr int V_ELEMS = BN * LDV;
  static constexpr int STAGE_ELEMS = K_ELEMS + V_ELEMS;
  static constexpr int SMEM_BYTES = (Q_ELEMS + 2 * STAGE_ELEMS) * 2;
  static_assert(HD % 16 == 0 && HDV % 16 == 0 && BN % 16 == 0 && HDV <= HD && HD <= 384, "tiles of 16");
  static_assert(Q_REGS_ ? HD <= 256 : true, "Q fragments of HD > 256 do not fit in registers");
  static_assert(CHUNK == 4 || CHUNK == 16, "cp.async of 4 or 16 bytes");
};

// Copies `ROWS` rows of `head_dim` elements (row r at g + r·row_stride) into shared memory
// [ROWS][W + 8], zero-filling columns head_dim..W and rows valid_rows..ROWS.
template <class C, int ROWS, int W>
__device__ __forceinline__ void load_tile(typename C::T* s, const typename C::T* g, long long row_stride,
                                          int valid_rows, int head_dim) {
  constexpr int EPC = C::CHUNK / 2;  // elements per copy
  constexpr int CPR = W / EPC;       // copies per row
  for (int i = threadIdx.x; i < ROWS * CPR; i += C::THREADS) {
    const int r = i / CPR, c = (i % CPR) * EPC;
    const int valid = r < valid_rows ? max(0, min(EPC, head_dim - c)) : 0;
    // A zero-fill copy reads nothing, but its source must still be a valid-looking address.
    const typename C::T* src = valid > 0 ? g + r * row_stride + c : g;
    cp_async_zfill<C::CHUNK>(s + r * (W + 8) + c, src, static_cast<unsigned>(valid * 2));
  }
}

template <class T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  const typename Num<T>::T2 p = Num<T>::pair(lo, hi);
  uint32_t u;
  memcpy(&u, &p, 4);
  return u;
}

template <class C, class T = typename C::T>
__device__ __forceinline__ void forward(const T* __restrict__ q, const T* __restrict__ k,
                                        const T* __restrict__ v, T* __restrict__ o,
                                        float* __restrict__ lse, long long q_row, long long k_row,
                                        long long v_row, long long o_row, long long q_batch,
                                        long long k_batch, long long v_batch, long long o_batch, int lq,
                                        int lk, int head_dim, int v_dim, float scale_log2,
                                        const float* __restrict__ rel_bias, const float* __restrict__ key_bias) {
  REEL_DYNAMIC_SHARED(unsigned char, smem_bytes);  // one declaration for every storage type
  T* const smem = reinterpret_cast<T*>(smem_bytes);
  T* const sq = smem;
  T* const skv = smem + C::Q_ELEMS;  // stage s: K at skv + s·STAGE_ELEMS, V after it
  const int m0 = blockIdx.x * C::BM, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const T* qb = q + b * q_batch + m0 * q_row + h * head_dim;
  const T* kb = k + b * k_batch + h * head_dim;
  const T* vb = v + b * v_batch + h * head_dim;
  const int tiles = (lk + C::BN - 1) / C::BN;

  // Q and the first K/V tile: one group.
  load_tile<C, C::BM, C::HD>(sq, qb, q_row, lq - m0, head_dim);
  load_tile<C, C::BN, C::HD>(skv, kb, k_row, lk, head_dim);
  load_tile<C, C::BN, C::HDV>(skv + C::K_ELEMS, vb, v_row, lk, v_dim);
  cp_async_commit();

  float acc[C::HDV / 8][4];  // O: n-tile of 8 columns × (row g: 2 columns, row g+8: 2 columns)
  for (int n = 0; n < C::HDV / 8; ++n)
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, rows g and g+8
  float row_sum[2] = {0.0f, 0.0f};            // this thread's part of the denominator
  uint32_t qf[C::Q_REGS ? C::HD / 16 : 1][4];
  const T* q_warp = sq + (warp * 16 + lane % 16) * C::LD + (lane / 16) * 8;

  for (int j = 0; j < tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < tiles) {
      T* next = skv + (stage ^ 1) * C::STAGE_ELEMS;
      const long long key0 = static_cast<long long>(j + 1) * C::BN;
      load_tile<C, C::BN, C::HD>(next, kb + key0 * k_row, k_row, lk - (j + 1) * C::BN, head_dim);
      load_tile<C, C::BN, C::HDV>(next + C::K_ELEMS, vb + key0 * v_row, v_row, lk - (j + 1) * C::BN, v_dim);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sk = skv + stage * C::STAGE_ELEMS;
    const T* sv = sk + C::K_ELEMS;
    if (C::Q_REGS && j == 0)
      for (int kc = 0; kc < C::HD / 16; ++kc) ldmatrix<4, false>(qf[C::Q_REGS ? kc : 0], q_warp + kc * 16);

    // S = Q·Kᵀ: s[n] is the n-th tile of 8 keys.
    float s[C::BN / 8][4];
    for (int n = 0; n < C::BN / 8; ++n)
      for (int i = 0; i < 4; ++i) s[n][i] = 0.0f;
    for (int kc = 0; kc < C::HD / 16; ++kc) {
      uint32_t a[4];
      if (C::Q_REGS) {
        for (int i = 0; i < 4; ++i) a[i] = qf[C::Q_REGS ? kc : 0][i];
      } else {
        ldmatrix<4, false>(a, q_warp + kc * 16);
      }
      for (int nt = 0; nt < C::BN / 16; ++nt) {
        // Matrices (keys 0-7, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7),
        // (keys 8-15, dims 8-15) of this 16×16 block of K: the B fragments of two n-tiles.
        uint32_t kf[4];
        ldmatrix<4, false>(kf, sk + (nt * 16 + lane % 8 + (lane / 16) * 8) * C::LD + kc * 16 + ((lane / 8) % 2) * 8);
        const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
        mma_m16n8k16<T>(s[2 * nt], a, b0, s[2 * nt]);
        mma_m16n8k16<T>(s[2 * nt + 1], a, b1, s[2 * nt + 1]);
      }
    }
    // Biased variants: s·scale + rel_bias[h][key − query] + key_bias[b][key], into the log2
    // domain here, so the softmax below multiplies by 1.
    float sl = scale_log2;
    if constexpr (C::BIAS) {
      const float* rb = rel_bias + static_cast<long long>(h) * (lq + lk - 1) + (lq - 1);
      const float* kbias = key_bias + static_cast<long long>(b) * lk;
      for (int n = 0; n < C::BN / 8; ++n)
        for (int i = 0; i < 4; ++i) {
          const int row = m0 + warp * 16 + g + 8 * (i >> 1), col = j * C::BN + n * 8 + 2 * t + (i & 1);
          if (col < lk) {
            const float bias = kbias[col] + (row < lq ? rb[col - row] : 0.0f);
            s[n][i] = s[n][i] * scale_log2 + bias * 1.4426950409f;
          }
        }
      sl = 1.0f;
    }
    // Keys past Lk (the last tile's zero rows) take no part.
    if ((j + 1) * C::BN > lk) {
      for (int n = 0; n < C::BN / 8; ++n)
        for (int i = 0; i < 4; ++i)
          if (j * C::BN + n * 8 + 2 * t + (i & 1) >= lk) s[n][i] = -INFINITY;
    }
    // Online softmax, rows g (r = 0: s[·][0..1]) and g + 8 (r = 1: s[·][2..3]).
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
      for (int n = 0; n < C::BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(row_max[r], mx * sl);
      const float corr = exp2f(row_max[r] - m_new);  // 0 on the first tile (−∞)
      row_max[r] = m_new;
      float sum = 0.0f;
      for (int n = 0; n < C::BN / 8; ++n)
        for (int i = 2 * r; i < 2 * r + 2; ++i) {
          s[n][i] = exp2f(s[n][i] * sl - m_new);
          sum += s[n][i];
        }
      row_sum[r] = row_sum[r] * corr + sum;
      for (int n = 0; n < C::HDV / 8; ++n) {
        acc[n][2 * r] *= corr;
        acc[n][2 * r + 1] *= corr;
      }
    }
    // O += P·V: P (bf16) from two n-tiles of S is the A fragment of one k-step of 16 keys.
    for (int kc = 0; kc < C::BN / 16; ++kc) {
      const uint32_t a[4] = {pack<T>(s[2 * kc][0], s[2 * kc][1]), pack<T>(s[2 * kc][2], s[2 * kc][3]),
                             pack<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                             pack<T>(s[2 * kc + 1][2], s[2 * kc + 1][3])};
      for (int nt = 0; nt < C::HDV / 16; ++nt) {
        // Transposed matrices (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7, dims
        // 8-15), (keys 8-15, dims 8-15) of V: the B fragments of two n-tiles of O.
        uint32_t vf[4];
        ldmatrix<4, true>(vf, sv + (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * C::LDV + nt * 16 + (lane / 16) * 8);
        const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
        mma_m16n8k16<T>(acc[2 * nt], a, b0, acc[2 * nt]);
        mma_m16n8k16<T>(acc[2 * nt + 1], a, b1, acc[2 * nt + 1]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's copies
  }

  // The denominators: the quad's partial sums; then O / l, once.
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + 8 * r;
    if (row >= lq) continue;
    const float inv = 1.0f / row_sum[r];
    T* orow = o + b * o_batch + row * o_row + h * head_dim;
    for (int n = 0; n < C::HDV / 8; ++n) {
      const int col = n * 8 + 2 * t;
      if (col < v_dim) {
        const typename Num<T>::T2 p = Num<T>::pair(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
        memcpy(orow + col, &p, 4);
      }
    }
    if (lse != nullptr && t == 0)
      lse[(static_cast<long long>(b) * gridDim.y + h) * lq + row] = (row_max[r] + log2f(row_sum[r])) * 0.69314718f;
  }
}

}  // namespace flash

// The exported variants (see the header). Parameters: q, k, v, o, lse (may be null), the
// row strides and batch strides of q, k, v, o (elements), lq, lk, head_dim (of Q and K; head
// h at columns h·head_dim of every operand), v_dim (the columns of V and O this launch
// covers: head_dim, or half of it for the split variants, v and o then pointing at the
// half), and scale·log2(e). Grid (⌈Lq/BM⌉, heads, batch), 32·WARPS threads,
// Config::SMEM_BYTES of dynamic shared memory.
#define REEL_FLASH_KERNEL(name, T, HD, HDV, WARPS, BN, CHUNK, QREGS, BIAS)                                      \
  extern "C" __global__ void __launch_bounds__(32 * WARPS, 1)                                                    \
      name(const T* q, const T* k, const T* v, T* o, float* lse, long long q_row, long long k_row, long long v_row, \
           long long o_row, long long q_batch, long long k_batch, long long v_batch, long long o_batch, int lq,    \
           int lk, int head_dim, int v_dim, float scale_log2, const float* rel_bias, const float* key_bias) {   \
    flash::forward<flash::Config<T, HD, HDV, WARPS, BN, CHUNK, QREGS, BIAS>>(                                   \
        q, k, v, o, lse, q_row, k_row, v_row, o_row, q_batch, k_batch, v_batch, o_batch, lq, lk, head_dim, v_dim, \
        scale_log2, rel_bias, key_bias);                                                                         \
  }
#define REEL_FLASH_VARIANT_T(name, T, HD, HDV, WARPS, BN, CHUNK, QREGS) \
  REEL_FLASH_KERNEL(name, T, HD, HDV, WARPS, BN, CHUNK, QREGS, false)
#define REEL_FLASH_VARIANT_V(name, HD, HDV, WARPS, BN, CHUNK, QREGS) \
  REEL_FLASH_VARIANT_T(name, bf16, HD, HDV, WARPS, BN, CHUNK, QREGS)
#define REEL_FLASH_VARIANT(name, HD, WARPS, BN, CHUNK, QREGS) REEL_FLASH_VARIANT_V(name, HD, HD, WARPS, BN, CHUNK, QREGS)

REEL_FLASH_VARIANT(flash_attn_hd128_bn64, 128, 8, 64, 16, true)
REEL_EMU_EXPORT(flash_attn_hd128_bn64)
REEL_FLASH_VARIANT(flash_attn_hd128_bn32, 128, 8, 32, 16, true)
REEL_EMU_EXPORT(flash_attn_hd128_bn32)
REEL_FLASH_VARIANT(flash_attn_hd64_bn128, 64, 8, 128, 16, true)
REEL_EMU_EXPORT(flash_attn_hd64_bn128)
REEL_FLASH_VARIANT(flash_attn_any_hd16, 16, 4, 64, 4, true)
REEL_EMU_EXPORT(flash_attn_any_hd16)
REEL_FLASH_VARIANT(flash_attn_any_hd32, 32, 4, 64, 4, true)
REEL_EMU_EXPORT(flash_attn_any_hd32)
REEL_FLASH_VARIANT(flash_attn_any_hd64, 64, 4, 64, 4, true)
REEL_EMU_EXPORT(flash_attn_any_hd64)
REEL_FLASH_VARIANT(flash_attn_any_hd128, 128, 4, 64, 4, true)
REEL_EMU_EXPORT(flash_attn_any_hd128)
REEL_FLASH_VARIANT(flash_attn_any_hd256, 256, 4, 32, 4, false)
REEL_EMU_EXPORT(flash_attn_any_hd256)
REEL_FLASH_VARIANT_V(flash_attn_qk384_v192_bn32, 384, 192, 4, 32, 16, false)
REEL_EMU_EXPORT(flash_attn_qk384_v192_bn32)
REEL_FLASH_VARIANT_V(flash_attn_qk384_v192_bn16, 384, 192, 4, 16, 16, false)
REEL_EMU_EXPORT(flash_attn_qk384_v192_bn16)
// f16 storage (the VAE's mid-block attention runs in f16: see engine/models/wan_vae/gpu.rs).
REEL_FLASH_VARIANT_T(flash_attn_f16_any_hd32, __half, 32, 32, 4, 64, 4, true)
REEL_EMU_EXPORT(flash_attn_f16_any_hd32)
REEL_FLASH_VARIANT_T(flash_attn_f16_any_hd128, __half, 128, 128, 4, 64, 4, true)
REEL_EMU_EXPORT(flash_attn_f16_any_hd128)
REEL_FLASH_VARIANT_T(flash_attn_f16_any_hd256, __half, 256, 256, 4, 32, 4, false)
REEL_EMU_EXPORT(flash_attn_f16_any_hd256)
REEL_FLASH_VARIANT_T(flash_attn_f16_qk384_v192_bn32, __half, 384, 192, 4, 32, 16, false)
REEL_EMU_EXPORT(flash_attn_f16_qk384_v192_bn32)
REEL_FLASH_VARIANT_T(flash_attn_f16_qk384_v192_bn16, __half, 384, 192, 4, 16, 16, false)
REEL_EMU_EXPORT(flash_attn_f16_qk384_v192_bn16)
// Additive biases (umT5's self-attention: a learned bias per head and relative position,
// plus the padding mask as a per-key bias; T5 does not scale its logits), f16 (umT5's
// default storage on a device) and bf16.
#define REEL_FLASH_BIAS(name, T, HD, WARPS, BN, CHUNK) REEL_FLASH_KERNEL(name, T, HD, HD, WARPS, BN, CHUNK, true, true)
REEL_FLASH_BIAS(flash_attn_bias_hd64_bn128, bf16, 64, 8, 128, 16)
REEL_EMU_EXPORT(flash_attn_bias_hd64_bn128)
REEL_FLASH_BIAS(flash_attn_bias_any_hd16, bf16, 16, 4, 64, 4)
REEL_EMU_EXPORT(flash_attn_bias_any_hd16)
REEL_FLASH_BIAS(flash_attn_bias_any_hd32, bf16, 32, 4, 64, 4)
REEL_EMU_EXPORT(flash_attn_bias_any_hd32)
REEL_FLASH_BIAS(flash_attn_bias_any_hd64, bf16, 64, 4, 64, 4)
REEL_EMU_EXPORT(flash_attn_bias_any_hd64)
REEL_FLASH_BIAS(flash_attn_bias_any_hd128, bf16, 128, 4, 64, 4)
REEL_EMU_EXPORT(flash_attn_bias_any_hd128)
REEL_FLASH_BIAS(flash_attn_f16_bias_hd64_bn128, __half, 64, 8, 128, 16)
REEL_EMU_EXPORT(flash_attn_f16_bias_hd64_bn128)
REEL_FLASH_BIAS(flash_attn_f16_bias_any_hd16, __half, 16, 4, 64, 4)
REEL_EMU_EXPORT(flash_attn_f16_bias_any_hd16)
REEL_FLASH_BIAS(flash_attn_f16_bias_any_hd32, __half, 32, 4, 64, 4)
REEL_EMU_EXPORT(flash_attn_f16_bias_any_hd32)
REEL_FLASH_BIAS(flash_attn_f16_bias_any_hd64, __half, 64, 4, 64, 4)
REEL_EMU_EXPORT(flash_attn_f16_bias_any_hd64)
REEL_FLASH_BIAS(flash_attn_f16_bias_any_hd128, __half, 128, 4, 64, 4)
REEL_EMU_EXPORT(flash_attn_f16_bias_any_hd128)
