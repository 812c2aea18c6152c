// Flash attention forward for Hopper (sm_90a): the FlashAttention-3 schedule on wgmma, TMA and
// mbarriers. Same operation, operand layout and log-sum-exp as kernels/attention.cu (the
// mma.sync kernel, which runs everywhere else and on what this one does not take): bf16
// Q, K, V, O in the projections' layout (row and batch strides, head h at columns
// h·head_dim..), f32 accumulation, non-causal, no mask, head_dim 64 or 128. Launcher:
// engine/kernels/attention.rs, which picks this kernel on sm_90 when the operands suit TMA.
// Primitives: kernels/common/reel_hopper.cuh (each with its emulated body).
//
// Block: BM = 128 query rows of one (batch, head), three warpgroups (384 threads):
//   warpgroup 0, the producer: gives its registers back (setmaxnreg.dec 24) and one thread
//     issues every load: the Q tile once, then K and V tiles of BN = 128 keys into a ring
//     of STAGES stages. Each stage has a "full" mbarrier (the producer's arrive.expect_tx
//     plus the TMA transaction bytes) and an "empty" one (one arrival per consumer warp when
//     its wgmmas have read the tile).
//   warpgroups 1 and 2, the consumers: take 240 registers (setmaxnreg.inc) and 64 query rows
//     each (the M of wgmma m64nNk16). Per K/V tile j:
//       S_j = Q·K_jᵀ          wgmma, A (Q) and B (K) from shared memory, N = BN
//       O  += P_{j−1}·V_{j−1}  wgmma, A (P) from registers, B (V) N-major from shared memory
//     issued together; then, while P·V runs, the online softmax of S_j (log2 domain, one FFMA
//     and one exp2 per score; rows shared by a quad's four lanes as in the mma.sync kernel);
//     then O is rescaled and P_j rounded to bf16 straight from the accumulators (the
//     accumulator layout of S is the A-register layout of the next wgmma:
//     a[i] = pack(S[8k + 2i], S[8k + 2i + 1]) for k-step k). Keys past Lk (TMA zero-fills
//     the rows past the end) are masked to −∞ in the last tile.
//   Ping-pong: the consumers take turns issuing their wgmmas (named barriers 1 and 2, each
//     synced by one consumer and arrived at by the other), so one warpgroup's softmax runs
//     while the other's GEMMs hold the tensor cores.
// Shared memory (1024-byte aligned, every tile in 128-byte-swizzled boxes of 64 columns,
// the layout wgmma reads with a 128B-swizzle descriptor): Q [HD/64][BM][64], then STAGES ×
// K [HD/64][BN][64], then STAGES × V [HD/64][BN][64]. hd128: 32 KiB + 2 × 2 × 32 KiB =
// 160 KiB; hd64: 16 KiB + 3 × 2 × 16 KiB = 112 KiB (+ 1 KiB for the alignment).
// Tensor maps (encoded by the launcher, rank 4, innermost first): (head_dim, heads, rows,
// batch) with strides (2·head_dim, 2·row_stride, 2·batch_stride) bytes and boxes
// (64, 1, BM or BN, 1): rows past L read as zeros and never bleed into the next sample.
// O is written from the accumulators with 4-byte stores (rows past Lq skipped), normalised
// once; the LSE as in the mma.sync kernel.
#include "common/reel_cuda.cuh"
#include "common/reel_hopper.cuh"

typedef __nv_bfloat16 bf16;

namespace fa3 {

template <int HD_, int STAGES_>
struct Config {
  static constexpr int HD = HD_;
  static constexpr int BN = 128;
  static constexpr int STAGES = STAGES_;
  static constexpr int CONSUMERS = 2;  // warpgroups of 64 query rows
  static constexpr int BM = 64 * CONSUMERS;
  static constexpr int THREADS = 128 * (CONSUMERS + 1);
  static constexpr int CHUNKS = HD / 64;      // 128-byte swizzle atoms across a row
  static constexpr int Q_CHUNK = BM * 128;    // bytes of one 64-column box of Q
  static constexpr int KV_CHUNK = BN * 128;   // ... of K or V
  static constexpr int Q_BYTES = CHUNKS * Q_CHUNK;
  static constexpr int KV_BYTES = CHUNKS * KV_CHUNK;  // one stage of K (V alike)
  static constexpr int SMEM_BYTES = Q_BYTES + 2 * STAGES * KV_BYTES + 1024;
  static_assert(HD == 64 || HD == 128, "head_dim 64 or 128");
};

template <class C>
__device__ __forceinline__ void producer(const TensorMap& qm, const TensorMap& km, const TensorMap& vm,
                                         unsigned char* sq, unsigned char* sk, unsigned char* sv, uint64_t* q_full,
                                         uint64_t* k_full, uint64_t* v_full, uint64_t* k_empty, uint64_t* v_empty,
                                         int m0, int h, int b, int tiles) {
  mbarrier_arrive_expect_tx(q_full, C::Q_BYTES);
  for (int c = 0; c < C::CHUNKS; ++c) tma_load<4>(sq + c * C::Q_CHUNK, qm, q_full, 64 * c, h, m0, b);
  for (int j = 0; j < tiles; ++j) {
    const int s = j % C::STAGES;
    // Stage s was last used by tile j − STAGES: the consumers' release of it completed phase
    // j / STAGES − 1 of the empty barrier.
    const unsigned parity = ((j / C::STAGES) & 1) ^ 1;
    if (j >= C::STAGES) mbarrier_wait_parity(&k_empty[s], parity);
    mbarrier_arrive_expect_tx(&k_full[s], C::KV_BYTES);
    for (int c = 0; c < C::CHUNKS; ++c)
      tma_load<4>(sk + s * C::KV_BYTES + c * C::KV_CHUNK, km, &k_full[s], 64 * c, h, j * C::BN, b);
    if (j >= C::STAGES) mbarrier_wait_parity(&v_empty[s], parity);
    mbarrier_arrive_expect_tx(&v_full[s], C::KV_BYTES);
    for (int c = 0; c < C::CHUNKS; ++c)
      tma_load<4>(sv + s * C::KV_BYTES + c * C::KV_CHUNK, vm, &v_full[s], 64 * c, h, j * C::BN, b);
  }
}

template <class C>
__device__ __forceinline__ void consumer(int wgc, unsigned char* sq, unsigned char* sk, unsigned char* sv,
                                         uint64_t* q_full, uint64_t* k_full, uint64_t* v_full, uint64_t* k_empty,
                                         uint64_t* v_empty, bf16* __restrict__ o, float* __restrict__ lse,
                                         long long o_row, long long o_batch, int m0, int h, int b, int lq, int lk,
                                         int head_dim, int tiles, float scale_log2) {
  const int i = threadIdx.x % 128, warp = i / 32, lane = i % 32, g = lane / 4, t = lane % 4;
  // Descriptors of the first k-step; later ones add (byte offset) >> 4 to the start field.
  const uint64_t dq = make_smem_desc(sq + wgc * 64 * 128, Swizzle::B128, 16, 1024);
  const uint64_t dk = make_smem_desc(sk, Swizzle::B128, 16, 1024);
  const uint64_t dv = make_smem_desc(sv, Swizzle::B128, C::KV_CHUNK, 1024);

  float acc[C::HD / 2];  // O: this thread's share of 64 × HD
#pragma unroll
  for (int n = 0; n < C::HD / 2; ++n) acc[n] = 0.0f;
  float s[C::BN / 2];                          // S_j
  uint32_t p[C::BN / 16][4];                   // P_{j−1} as bf16 A fragments
  float row_max[2] = {-INFINITY, -INFINITY};   // log2 domain, rows g and g + 8
  float row_sum[2] = {0.0f, 0.0f};             // this thread's part of the denominator

  // Ping-pong: consumer c syncs barrier 1 + c before issuing and arrives at the other's
  // after; consumer 1 pre-arrives at consumer 0's, and skips its last arrival so both
  // barriers end balanced.
  const unsigned mine = 1 + wgc, other = 2 - wgc;
  if (wgc == 1) named_barrier_arrive(1, 256);
  auto issue_begin = [&] {
    named_barrier_sync(mine, 256);
    wgmma_fence();
  };
  auto issue_end = [&](bool last) {
    if (!(last && wgc == 1)) named_barrier_arrive(other, 256);
  };
  auto qk = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < C::HD / 16; ++kk) {
      const uint32_t off_q = (kk / 4) * C::Q_CHUNK + (kk % 4) * 32;
      const uint32_t off_k = stage * C::KV_BYTES + (kk / 4) * C::KV_CHUNK + (kk % 4) * 32;
      wgmma_ss<C::BN, bf16>(s, dq + (off_q >> 4), dk + (off_k >> 4), kk > 0);
    }
    wgmma_commit();
  };
  auto pv = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < C::BN / 16; ++kk) {
      const uint32_t off_v = stage * C::KV_BYTES + kk * 16 * 128;
      wgmma_rs<C::HD, bf16, 1>(acc, p[kk], dv + (off_v >> 4), 1);
    }
    wgmma_commit();
  };
  auto release = [&](uint64_t* bar) {
    if (lane == 0) mbarrier_arrive(bar);
  };
  // The online softmax of S_j in place (P, f32); returns the rescaling of rows g, g + 8.
  auto softmax = [&](int j, float (&corr)[2]) {
    if ((j + 1) * C::BN > lk) {
#pragma unroll
      for (int r = 0; r < C::BN / 2; ++r)
        if (j * C::BN + 8 * (r / 4) + 2 * t + (r & 1) >= lk) s[r] = -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < C::BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // Every tile holds a key below Lk, so m_new is finite.
      const float m_new = fmaxf(row_max[r], mx * scale_log2);
      corr[r] = exp2f(row_max[r] - m_new);  // 0 on the first tile (−∞)
      row_max[r] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < C::BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[4 * n + 2 * r + e];
          x = exp2f(fmaf(x, scale_log2, -m_new));
          sum += x;
        }
      row_sum[r] = row_sum[r] * corr[r] + sum;
    }
  };
  auto to_p = [&] {
#pragma unroll
    for (int kk = 0; kk < C::BN / 16; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
        memcpy(&p[kk][e], &v, 4);
      }
  };

  mbarrier_wait_parity(q_full, 0);
  // Tile 0: S_0 alone.
  mbarrier_wait_parity(&k_full[0], 0);
  issue_begin();
  qk(0);
  issue_end(false);
  wgmma_wait<0>();
  release(&k_empty[0]);
  {
    float corr[2];
    softmax(0, corr);
  }
  to_p();
  for (int j = 1; j < tiles; ++j) {
    const int st = j % C::STAGES, prev = (j - 1) % C::STAGES;
    // V_{j−1} was loaded before K_j: both are waited for before the turn to issue.
    mbarrier_wait_parity(&k_full[st], (j / C::STAGES) & 1);
    mbarrier_wait_parity(&v_full[prev], ((j - 1) / C::STAGES) & 1);
    issue_begin();
    qk(st);
    pv(prev);
    issue_end(false);
    wgmma_wait<1>();  // S_j
    release(&k_empty[st]);
    float corr[2];
    softmax(j, corr);
    wgmma_wait<0>();  // O += P_{j−1}·V_{j−1}
    release(&v_empty[prev]);
#pragma unroll
    for (int n = 0; n < C::HD / 8; ++n) {
      acc[4 * n] *= corr[0];
      acc[4 * n + 1] *= corr[0];
      acc[4 * n + 2] *= corr[1];
      acc[4 * n + 3] *= corr[1];
    }
    to_p();
  }
  const int last = (tiles - 1) % C::STAGES;
  mbarrier_wait_parity(&v_full[last], ((tiles - 1) / C::STAGES) & 1);
  issue_begin();
  pv(last);
  issue_end(true);
  wgmma_wait<0>();

  // The denominators: the quad's partial sums; then O / l, once.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + wgc * 64 + warp * 16 + g + 8 * r;
    if (row >= lq) continue;
    const float inv = 1.0f / row_sum[r];
    bf16* orow = o + b * o_batch + row * o_row + h * head_dim;
#pragma unroll
    for (int n = 0; n < C::HD / 8; ++n) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * n + 2 * r] * inv, acc[4 * n + 2 * r + 1] * inv);
      memcpy(orow + 8 * n + 2 * t, &v, 4);
    }
    if (lse != nullptr && t == 0)
      lse[(static_cast<long long>(b) * gridDim.y + h) * lq + row] = (row_max[r] + log2f(row_sum[r])) * 0.69314718f;
  }
}

template <class C>
__device__ __forceinline__ void forward(const TensorMap& qm, const TensorMap& km, const TensorMap& vm, bf16* o,
                                        float* lse, long long o_row, long long o_batch, int lq, int lk, int head_dim,
                                        float scale_log2) {
  REEL_DYNAMIC_SHARED(unsigned char, dyn);
  REEL_SHARED_ALIGNED(8, uint64_t, bars, [1 + 4 * C::STAGES]);
  unsigned char* const sq = aligned_1k(dyn);
  unsigned char* const sk = sq + C::Q_BYTES;
  unsigned char* const sv = sk + C::STAGES * C::KV_BYTES;
  uint64_t* const q_full = bars;
  uint64_t* const k_full = bars + 1;
  uint64_t* const v_full = k_full + C::STAGES;
  uint64_t* const k_empty = v_full + C::STAGES;
  uint64_t* const v_empty = k_empty + C::STAGES;
  const int m0 = blockIdx.x * C::BM, h = blockIdx.y, b = blockIdx.z;
  const int tiles = (lk + C::BN - 1) / C::BN;
  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < C::STAGES; ++s) {
      mbarrier_init(&k_full[s], 1);
      mbarrier_init(&v_full[s], 1);
      mbarrier_init(&k_empty[s], 4 * C::CONSUMERS);  // one arrival per consumer warp
      mbarrier_init(&v_empty[s], 4 * C::CONSUMERS);
    }
    fence_mbarrier_init();
  }
  __syncthreads();
  if (wg == 0) {
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0)
      producer<C>(qm, km, vm, sq, sk, sv, q_full, k_full, v_full, k_empty, v_empty, m0, h, b, tiles);
  } else {
    setmaxnreg_inc<240>();
    consumer<C>(wg - 1, sq, sk, sv, q_full, k_full, v_full, k_empty, v_empty, o, lse, o_row, o_batch, m0, h, b, lq,
                lk, head_dim, tiles, scale_log2);
  }
}

}  // namespace fa3

// Parameters: the tensor maps of Q, K and V (see the header), O, lse (may be null), O's row
// and batch strides (elements), lq, lk, head_dim and scale·log2(e). Grid (⌈Lq/128⌉, heads,
// batch), 384 threads, Config::SMEM_BYTES of dynamic shared memory.
#define REEL_FA3_KERNEL(name, HD, STAGES)                                                                       \
  extern "C" __global__ void __launch_bounds__(384, 1)                                                          \
      name(const __grid_constant__ TensorMap q_map, const __grid_constant__ TensorMap k_map,                    \
           const __grid_constant__ TensorMap v_map, bf16* o, float* lse, long long o_row, long long o_batch,     \
           int lq, int lk, int head_dim, float scale_log2) {                                                    \
    fa3::forward<fa3::Config<HD, STAGES>>(q_map, k_map, v_map, o, lse, o_row, o_batch, lq, lk, head_dim,        \
                                          scale_log2);                                                          \
  }

REEL_FA3_KERNEL(flash_attn_sm90_hd128, 128, 2)
REEL_EMU_EXPORT(flash_attn_sm90_hd128)
REEL_FA3_KERNEL(flash_attn_sm90_hd64, 64, 3)
REEL_EMU_EXPORT(flash_attn_sm90_hd64)
