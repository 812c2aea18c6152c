// reel's own tensor-core GEMM: C[M, N] = act(A[M, K] · W[N, K]ᵀ + bias[N]), bf16 (or f16) A
// and W, f32 accumulation, C of the same 16-bit type or f32. The layout of a linear layer (W is [out, in], row-major, as
// PyTorch stores it), so both operands are read along K. The GEMM of the emu device and the
// fallback on cuda when cuBLASLt is missing. CPU reference: engine/cpu/linear.rs; launcher:
// engine/kernels/gemm.rs.
//
// A block computes a BM × BN tile of C with WM × WN warps, each warp a (BM/WM) × (BN/WN)
// sub-tile of m16n8k16 mma tiles (A fragments by ldmatrix x4 from A's rows, B fragments by
// ldmatrix x4 from W's rows: W[n][k] is B[k][n] in the mma's "col" layout). K advances in
// steps of BK through a STAGES-deep cp.async pipeline (the copies for step kt + STAGES − 1
// are in flight while step kt computes). Shared rows are padded by 16 bytes so ldmatrix's 8
// rows fall in 8 different bank groups. Tails in M, N and K load as zeros (cp.async
// zero-fill) and are not stored. Epilogue in f32: + bias, then GELU-tanh when act = 1.
//
// Variants (CHUNK: bytes per cp.async; 16 needs 16-byte aligned rows and K % 8 == 0, 4
// needs even K and 4-byte alignment):
//   gemm_{bf16,f32}_128x128  BM 128, BN 128, BK 32, 8 warps (2 × 4, 64 × 32 each), 3 stages,
//                            61,440 B of shared memory: large problems
//   gemm_{bf16,f32}_64x64    BM 64, BN 64, BK 32, 4 warps (2 × 2, 32 × 32 each), 3 stages,
//                            30,720 B: small M or N (the timestep MLP, tiny models, emu)
//   gemm_{bf16,f32}_any      the 64 × 64 tiles with 4-byte copies: any even K, any alignment
//   gemm_{f16,f16f32}_*      the same three with f16 A and W (f16 or f32 C)
// Not yet measured on a GPU; cuBLASLt is the GEMM of the cuda device when present.
#include "common/reel_cuda.cuh"
#include "common/reel_mma.cuh"

typedef __nv_bfloat16 bf16;

namespace gemm {

template <int BM_, int BN_, int BK_, int WM_, int WN_, int STAGES_, int CHUNK_>
struct Config {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, STAGES = STAGES_, CHUNK = CHUNK_;
  static constexpr int THREADS = 32 * WM * WN;
  static constexpr int WTM = BM / WM, WTN = BN / WN;  // a warp's tile
  static constexpr int MT = WTM / 16, NT = WTN / 8;   // its mma tiles
  static constexpr int LD = BK + 8;                   // shared row stride (elements)
  static constexpr int STAGE_ELEMS = (BM + BN) * LD;
  static constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * 2;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0 && BK % 16 == 0, "warp tiles of 16");
  static_assert(CHUNK == 4 || CHUNK == 16, "cp.async of 4 or 16 bytes");
};

// Rows r0.. of a [rows, K] bf16 matrix (row stride ld), columns k0..k0+BK, into shared
// [ROWS][LD]; rows past `rows` and columns past `k` are zero-filled.
template <class C, int ROWS, class T>
__device__ __forceinline__ void load_rows(T* s, const T* g, long long ld, int r0, int rows, int k0, int k) {
  constexpr int EPC = C::CHUNK / 2;
  constexpr int CPR = C::BK / EPC;
  for (int i = threadIdx.x; i < ROWS * CPR; i += C::THREADS) {
    const int r = i / CPR, c = (i % CPR) * EPC;
    const int valid = r0 + r < rows ? max(0, min(EPC, k - (k0 + c))) : 0;
    const T* src = valid > 0 ? g + (r0 + r) * ld + k0 + c : g;
    cp_async_zfill<C::CHUNK>(s + r * C::LD + c, src, static_cast<unsigned>(valid * 2));
  }
}

__device__ __forceinline__ float gelu_tanh(float v) {
  const float u = 0.7978845608f * (v + 0.044715f * v * v * v);
  return 0.5f * v * (1.0f + tanhf(u));
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(bf16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

template <class C, class T, class Out>
__device__ __forceinline__ void run(const T* __restrict__ a, const T* __restrict__ w,
                                    const float* __restrict__ bias, Out* __restrict__ c, int m, int n, int k,
                                    long long lda, long long ldw, long long ldc, int act) {
  REEL_DYNAMIC_SHARED(unsigned char, smem_bytes);  // one declaration for every storage type
  T* const smem = reinterpret_cast<T*>(smem_bytes);
  const int m0 = blockIdx.y * C::BM, n0 = blockIdx.x * C::BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wm = (warp / C::WN) * C::WTM, wn = (warp % C::WN) * C::WTN;
  const int ktiles = (k + C::BK - 1) / C::BK;
  auto stage_a = [&](int s) { return smem + s * C::STAGE_ELEMS; };
  auto stage_w = [&](int s) { return smem + s * C::STAGE_ELEMS + C::BM * C::LD; };

  #pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < ktiles) {
      load_rows<C, C::BM>(stage_a(s), a, lda, m0, m, s * C::BK, k);
      load_rows<C, C::BN>(stage_w(s), w, ldw, n0, n, s * C::BK, k);
    }
    cp_async_commit();
  }
  float acc[C::MT][C::NT][4];
  #pragma unroll
  for (int i = 0; i < C::MT; ++i)
    #pragma unroll
    for (int j = 0; j < C::NT; ++j)
      #pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // step kt has landed for every thread; step kt − 1's stage is free
    const int next = kt + C::STAGES - 1;
    if (next < ktiles) {
      load_rows<C, C::BM>(stage_a(next % C::STAGES), a, lda, m0, m, next * C::BK, k);
      load_rows<C, C::BN>(stage_w(next % C::STAGES), w, ldw, n0, n, next * C::BK, k);
    }
    cp_async_commit();  // possibly empty: keeps the group count the wait relies on
    const T* sa = stage_a(kt % C::STAGES);
    const T* sw = stage_w(kt % C::STAGES);
    #pragma unroll
    for (int kk = 0; kk < C::BK; kk += 16) {
      uint32_t af[C::MT][4];
      #pragma unroll
      for (int i = 0; i < C::MT; ++i)
        ldmatrix<4, false>(af[i], sa + (wm + i * 16 + lane % 16) * C::LD + kk + (lane / 16) * 8);
      #pragma unroll
      for (int j = 0; j < C::NT; j += 2) {
        // Matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15):
        // the B fragments of n-tiles j and j + 1.
        uint32_t bf[4];
        ldmatrix<4, false>(bf, sw + (wn + j * 8 + lane % 8 + (lane / 16) * 8) * C::LD + kk + ((lane / 8) % 2) * 8);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        #pragma unroll
        for (int i = 0; i < C::MT; ++i) {
          mma_m16n8k16<T>(acc[i][j], af[i], b0, acc[i][j]);
          mma_m16n8k16<T>(acc[i][j + 1], af[i], b1, acc[i][j + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  #pragma unroll
  for (int i = 0; i < C::MT; ++i)
    #pragma unroll
    for (int j = 0; j < C::NT; ++j)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = m0 + wm + i * 16 + g + (e >= 2 ? 8 : 0);
        const int col = n0 + wn + j * 8 + 2 * t + (e & 1);
        if (row < m && col < n) {
          float v = acc[i][j][e] + (bias != nullptr ? bias[col] : 0.0f);
          if (act == 1) v = gelu_tanh(v);
          store(c + row * ldc + col, v);
        }
      }
}

}  // namespace gemm

// Parameters: a, w, bias (may be null), c, m, n, k, the row strides of a, w, c (elements),
// act (0 none, 1 GELU-tanh). Grid (⌈N/BN⌉, ⌈M/BM⌉), 32·WM·WN threads,
// Config::SMEM_BYTES of dynamic shared memory.
#define REEL_GEMM_KERNEL(name, T, Out, BM, BN, BK, WM, WN, STAGES, CHUNK)                                      \
  extern "C" __global__ void __launch_bounds__(32 * WM * WN, 1)                                                  \
      name(const T* a, const T* w, const float* bias, Out* c, int m, int n, int k, long long lda, long long ldw,  \
           long long ldc, int act) {                                                                             \
    gemm::run<gemm::Config<BM, BN, BK, WM, WN, STAGES, CHUNK>, T, Out>(a, w, bias, c, m, n, k, lda, ldw, ldc,   \
                                                                          act);                                  \
  }
#define REEL_GEMM_VARIANT(name, Out, BM, BN, BK, WM, WN, STAGES, CHUNK) \
  REEL_GEMM_KERNEL(name, bf16, Out, BM, BN, BK, WM, WN, STAGES, CHUNK)

REEL_GEMM_VARIANT(gemm_bf16_128x128, bf16, 128, 128, 32, 2, 4, 3, 16)
REEL_EMU_EXPORT(gemm_bf16_128x128)
REEL_GEMM_VARIANT(gemm_f32_128x128, float, 128, 128, 32, 2, 4, 3, 16)
REEL_EMU_EXPORT(gemm_f32_128x128)
REEL_GEMM_VARIANT(gemm_bf16_64x64, bf16, 64, 64, 32, 2, 2, 3, 16)
REEL_EMU_EXPORT(gemm_bf16_64x64)
REEL_GEMM_VARIANT(gemm_f32_64x64, float, 64, 64, 32, 2, 2, 3, 16)
REEL_EMU_EXPORT(gemm_f32_64x64)
REEL_GEMM_VARIANT(gemm_bf16_any, bf16, 64, 64, 32, 2, 2, 3, 4)
REEL_EMU_EXPORT(gemm_bf16_any)
REEL_GEMM_VARIANT(gemm_f32_any, float, 64, 64, 32, 2, 2, 3, 4)
REEL_EMU_EXPORT(gemm_f32_any)
// f16 A and W (umT5 on a device: see engine/models/umt5/gpu.rs), f16 or f32 C.
REEL_GEMM_KERNEL(gemm_f16_128x128, __half, __half, 128, 128, 32, 2, 4, 3, 16)
REEL_EMU_EXPORT(gemm_f16_128x128)
REEL_GEMM_KERNEL(gemm_f16f32_128x128, __half, float, 128, 128, 32, 2, 4, 3, 16)
REEL_EMU_EXPORT(gemm_f16f32_128x128)
REEL_GEMM_KERNEL(gemm_f16_64x64, __half, __half, 64, 64, 32, 2, 2, 3, 16)
REEL_EMU_EXPORT(gemm_f16_64x64)
REEL_GEMM_KERNEL(gemm_f16f32_64x64, __half, float, 64, 64, 32, 2, 2, 3, 16)
REEL_EMU_EXPORT(gemm_f16f32_64x64)
REEL_GEMM_KERNEL(gemm_f16_any, __half, __half, 64, 64, 32, 2, 2, 3, 4)
REEL_EMU_EXPORT(gemm_f16_any)
REEL_GEMM_KERNEL(gemm_f16f32_any, __half, float, 64, 64, 32, 2, 2, 3, 4)
REEL_EMU_EXPORT(gemm_f16f32_any)
