// Self-test kernels for the emulator's warp operations and the kernels/common wrappers
// (mma, ldmatrix, cp.async). On emu they are checked against host references; on a GPU
// (tools/gpu-check.sh) the hardware must agree with the emulation bit for bit on
// integer-valued inputs, which proves the emulated fragment layouts.
#include "common/reel_cuda.cuh"
#include "common/reel_mma.cuh"

// Per thread, 8 outputs of warp operations on x (one int per thread of the launch):
//   0 warp sum (xor butterfly)        1 inclusive prefix sum (shfl_up)
//   2 x of lane + 3 (shfl_down)       3 x of lane 5 of the thread's group of 8 (shfl, width 8)
//   4 ballot(x > 0)                   5 any(x > 10)      6 all(x > -50)
//   7 xor-butterfly sum within groups of 16 (width 16)
struct WarpOpsArgs {
  const int* x;
  int* out;
};
extern "C" __global__ void warp_ops_selftest(const int* x, int* out) {
  const WarpOpsArgs a{x, out};
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const unsigned full = 0xffffffffu;
  const int v = a.x[t];
  int sum = v;
  for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync(full, sum, m);
  int scan = v;
  for (int d = 1; d < 32; d <<= 1) {
    int o = __shfl_up_sync(full, scan, d);
    if (lane >= d) scan += o;
  }
  int* o = a.out + 8 * t;
  o[0] = sum;
  o[1] = scan;
  o[2] = __shfl_down_sync(full, v, 3);
  o[3] = __shfl_sync(full, v, 5, 8);
  o[4] = static_cast<int>(__ballot_sync(full, v > 0));
  o[5] = __any_sync(full, v > 10);
  o[6] = __all_sync(full, v > -50);
  int s16 = v;
  for (int m = 8; m > 0; m >>= 1) s16 += __shfl_xor_sync(full, s16, m, 16);
  o[7] = s16;
}
REEL_EMU_EXPORT(warp_ops_selftest, WarpOpsArgs, a.x, a.out)

// One warp, one 16x8 tile: d = A·B + C (bf16 in, f32 out) with the fragments brought in
// five ways, so every wrapper is exercised:
//   mode 0: fragments read from global memory by the documented layout
//   mode 1: A and B^T staged with cp.async, then ldmatrix x4 (A) and x2 (B from B^T)
//   mode 2: A^T and B staged with plain stores, then ldmatrix x4.trans (A from A^T) and
//           x2.trans (B)
//   mode 3: as mode 1 with two ldmatrix x1 for B's halves, and A from A^T through x1.trans
//           four times
//   mode 4: as mode 1 without the cp.async wait (a deliberately broken kernel: on emu the
//           copies have not landed, so the result is wrong; never run on hardware)
// a: [16][16] row-major, at: [16][16] = A^T, bt: [8][16] = B^T, bkn: [16][8] = B, c: [16][8].
struct MmaArgs {
  const __nv_bfloat16* a;
  const __nv_bfloat16* at;
  const __nv_bfloat16* bt;
  const __nv_bfloat16* bkn;
  const float* c;
  float* d;
  int mode;
};
__device__ __forceinline__ uint32_t pack2(const __nv_bfloat16* p) {
  uint16_t lo, hi;
  memcpy(&lo, p, 2);
  memcpy(&hi, p + 1, 2);
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}
extern "C" __global__ void mma_selftest(const __nv_bfloat16* a_, const __nv_bfloat16* at,
                                         const __nv_bfloat16* bt, const __nv_bfloat16* bkn, const float* c_,
                                         float* d_, int mode) {
  const MmaArgs p{a_, at, bt, bkn, c_, d_, mode};
  __shared__ __align__(16) __nv_bfloat16 sa[16 * 16];
  __shared__ __align__(16) __nv_bfloat16 sb[16 * 16];
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  if (p.mode == 0) {
    a[0] = pack2(p.a + g * 16 + 2 * t);
    a[1] = pack2(p.a + (g + 8) * 16 + 2 * t);
    a[2] = pack2(p.a + g * 16 + 2 * t + 8);
    a[3] = pack2(p.a + (g + 8) * 16 + 2 * t + 8);
    // b[i] = B[2t + 8i .. +1][g] = B^T[g][2t + 8i .. +1]
    b[0] = pack2(p.bt + g * 16 + 2 * t);
    b[1] = pack2(p.bt + g * 16 + 2 * t + 8);
  } else if (p.mode == 1 || p.mode == 3 || p.mode == 4) {
    // 512 bytes of A and 256 of B^T: 32 + 16 chunks of 16 bytes.
    cp_async_16(sa + lane * 8, p.a + lane * 8);
    if (lane < 16) cp_async_16(sb + lane * 8, p.bt + lane * 8);
    cp_async_commit();
    if (p.mode != 4) cp_async_wait<0>();
    __syncthreads();
    if (p.mode != 3) {
      // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
      ldmatrix<4, false>(a, sa + (lane % 16) * 16 + (lane / 16) * 8);
      // B^T: (n 0-7, k 0-7), (n 0-7, k 8-15).
      ldmatrix<2, false>(b, sb + (lane % 8) * 16 + ((lane / 8) % 2) * 8);
    } else {
      ldmatrix<1, false>(&b[0], sb + (lane % 8) * 16);
      ldmatrix<1, false>(&b[1], sb + (lane % 8) * 16 + 8);
    }
  } else {
    for (int i = lane; i < 256; i += 32) sa[i] = p.at[i];
    for (int i = lane; i < 128; i += 32) sb[i] = p.bkn[i];
    __syncthreads();
    // A^T[k][m]: matrix j covers k rows 8(j/2).., m cols 8(j%2)..; .trans hands out A's layout.
    ldmatrix<4, true>(a, sa + ((lane / 16) * 8 + lane % 8) * 16 + ((lane / 8) % 2) * 8);
    // B[k][n] rows of 8: matrix 0 k 0-7, matrix 1 k 8-15.
    ldmatrix<2, true>(b, sb + (lane % 16) * 8);
  }
  if (p.mode == 3) {
    // A from A^T (staged now), one 8x8 matrix at a time through x1.trans.
    for (int i = lane; i < 256; i += 32) sa[i] = p.at[i];
    __syncthreads();
    for (int j = 0; j < 4; ++j) {
      const int k0 = (j / 2) * 8, m0 = (j % 2) * 8;
      ldmatrix<1, true>(&a[j], sa + (k0 + lane % 8) * 16 + m0);
    }
  }
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = p.c[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
  mma_m16n8k16_bf16(d, a, b, c);
  for (int i = 0; i < 4; ++i) p.d[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = d[i];
}
REEL_EMU_EXPORT(mma_selftest, MmaArgs, a.a, a.at, a.bt, a.bkn, a.c, a.d, a.mode)

// f32 -> f16 -> f32 through the f16 host type (emu) or cuda_fp16 (hardware).
extern "C" __global__ void f16_roundtrip_selftest(const float* x, __half* h, float* back, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    h[i] = __float2half(x[i]);
    back[i] = __half2float(h[i]);
  }
}
struct F16Args {
  const float* x;
  __half* h;
  float* back;
  int n;
};
REEL_EMU_EXPORT(f16_roundtrip_selftest, F16Args, a.x, a.h, a.back, a.n)
