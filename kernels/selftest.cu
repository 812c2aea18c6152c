// Self-test kernels for the emulator's warp operations, barriers and the kernels/common
// wrappers (mma, ldmatrix, cp.async). On emu they are checked against host references; on a
// GPU (tools/gpu-check.sh) the hardware must agree with the emulation bit for bit on
// integer-valued inputs, which proves the emulated fragment layouts and semantics.
// Launchers: engine/kernels/selftest.rs.
#include "common/reel_cuda.cuh"
#include "common/reel_mma.cuh"

// Per thread, 12 outputs of warp operations on x (one int per thread of the launch):
//   0 warp sum (xor butterfly)        1 inclusive prefix sum (shfl_up)
//   2 x of lane + 3 (shfl_down)       3 x of lane 5 of the thread's group of 8 (shfl, width 8)
//   4 ballot(x > 0)                   5 any(x > 10)      6 all(x > -50)
//   7 xor-butterfly sum within groups of 16 (width 16)
//   8 shfl_xor by 16 with width 8 (a lane mask >= width: PTX's bfly rule decides)
//   9 shfl of lane 37 with width 16 (a source >= 32: its low 5 bits, within the segment)
//  10 shfl_up by 2 with width 8       11 shfl_down by 5 with width 16
extern "C" __global__ void warp_ops_selftest(const int* x, int* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const unsigned full = 0xffffffffu;
  const int v = x[t];
  int sum = v;
  for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync(full, sum, m);
  int scan = v;
  for (int d = 1; d < 32; d <<= 1) {
    int o = __shfl_up_sync(full, scan, d);
    if (lane >= d) scan += o;
  }
  int* o = out + 12 * t;
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
  o[8] = __shfl_xor_sync(full, v, 16, 8);
  o[9] = __shfl_sync(full, v, 37, 16);
  o[10] = __shfl_up_sync(full, v, 2, 8);
  o[11] = __shfl_down_sync(full, v, 5, 16);
}
REEL_EMU_EXPORT(warp_ops_selftest)

// Warp operations on part of a warp, in one block of 40 threads: warp 0 works as two halves
// with disjoint masks (0x0000ffff, 0xffff0000; their exchanges interleave), warp 1 has 8
// lanes (mask 0xff). Per thread, 5 outputs:
//   0 xor-butterfly sum over the thread's half (width 16) or the 8-lane warp (width 8)
//   1 2·x of the partner lane (lane ^ 1), written to shared memory before a __syncwarp(mask)
//   2 ballot(x > 0) over the mask   3 its popcount   4 __activemask() at the start
extern "C" __global__ void warp_masks_selftest(const int* x, int* out) {
  REEL_SHARED(int, buf, [64]);
  // First, before any lane can have exited: on emu __activemask is the lanes that have not.
  const unsigned active = __activemask();
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const unsigned mask = warp == 1 ? 0xffu : (lane < 16 ? 0x0000ffffu : 0xffff0000u);
  const int width = warp == 1 ? 8 : 16;
  const int v = x[t];
  int s = v;
  for (int m = width / 2; m > 0; m >>= 1) s += __shfl_xor_sync(mask, s, m, width);
  int* o = out + 5 * t;
  o[0] = s;
  buf[t] = 2 * v;
  __syncwarp(mask);
  o[1] = buf[t ^ 1];
  const unsigned b = __ballot_sync(mask, v > 0);
  o[2] = static_cast<int>(b);
  o[3] = __popc(b);
  o[4] = static_cast<int>(active);
}
REEL_EMU_EXPORT(warp_masks_selftest)

// Block barriers with a result, and named barriers, in one block of 256 threads. Per
// thread, 4 outputs: 0 __syncthreads_count(x > 0), 1 __syncthreads_and(x > -50),
// 2 __syncthreads_or(x > 35), 3 3·x of thread 127 − t (t < 128) or 383 − t (t ≥ 128),
// exchanged through shared memory with each half of the block synchronised by its own
// named barrier (1 and 2, 128 threads each).
extern "C" __global__ void __launch_bounds__(256) barrier_selftest(const int* x, int* out) {
  REEL_SHARED(int, buf, [256]);
  const int t = threadIdx.x;
  const int v = x[t];
  int* o = out + 4 * t;
  o[0] = __syncthreads_count(v > 0);
  o[1] = __syncthreads_and(v > -50);
  o[2] = __syncthreads_or(v > 35);
  buf[t] = 3 * v;
  if (t < 128) {
    named_barrier_sync(1, 128);
    o[3] = buf[127 - t];
  } else {
    named_barrier_sync(2, 128);
    o[3] = buf[383 - t];
  }
}
REEL_EMU_EXPORT(barrier_selftest)

// cp.async in every form, one warp: `groups` (1..4) groups, then cp_async_wait<wait>
// (0..3), then every lane writes out the whole staging area. Group g copies 512 bytes of
// src (from float 128·g) to the same place in shared memory: g = 0 as 16-byte copies, 1 as
// 8-byte ones, 2 as 4-byte ones, 3 as 16-byte zero-fill copies reading `zfill` (0..16)
// bytes of each 16. After the wait the oldest groups − wait groups have landed; on emu the
// rest read as poison (0xffffffff). out: [32][512] floats, lane l's copy at 512·l.
extern "C" __global__ void cp_async_selftest(const float* src, float* out, int groups, int wait, int zfill) {
  REEL_SHARED_ALIGNED(16, float, sh, [512]);
  const int lane = threadIdx.x;
  for (int g = 0; g < groups; ++g) {
    const float* s = src + 128 * g + 4 * lane;
    float* d = sh + 128 * g + 4 * lane;
    if (g == 0) cp_async<16>(d, s);
    if (g == 1)
      for (int i = 0; i < 4; i += 2) cp_async<8>(d + i, s + i);
    if (g == 2)
      for (int i = 0; i < 4; ++i) cp_async<4>(d + i, s + i);
    if (g == 3) cp_async_zfill<16>(d, s, static_cast<unsigned>(zfill));
    cp_async_commit();
  }
  if (wait == 0) cp_async_wait<0>();
  if (wait == 1) cp_async_wait<1>();
  if (wait == 2) cp_async_wait<2>();
  if (wait == 3) cp_async_wait<3>();
  __syncwarp();
  for (int i = 0; i < 128 * groups; ++i) out[512 * lane + i] = sh[i];
}
REEL_EMU_EXPORT(cp_async_selftest)

// One warp, one 16x8 tile: d = A·B + C (bf16 in, f32 out) with the fragments brought in
// five ways, so every wrapper is exercised:
//   mode 0: fragments read from global memory by the documented layout
//   mode 1: A and B^T staged with cp.async, then ldmatrix x4 (A) and x2 (B from B^T)
//   mode 2: A^T and B staged with plain stores, then ldmatrix x4.trans (A from A^T) and
//           x2.trans (B)
//   mode 3: as mode 1 with two ldmatrix x1 for B's halves, and A from A^T through x1.trans
//           four times
//   mode 4: as mode 1 without the cp.async wait (a deliberately broken kernel: on emu the
//           destinations read as poison until a wait, so D is NaN; never run on hardware)
// a: [16][16] row-major, at: [16][16] = A^T, bt: [8][16] = B^T, bkn: [16][8] = B, c: [16][8].
__device__ __forceinline__ uint32_t pack2(const __nv_bfloat16* p) {
  uint16_t lo, hi;
  memcpy(&lo, p, 2);
  memcpy(&hi, p + 1, 2);
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}
struct MmaOperands {
  const __nv_bfloat16 *a, *at, *bt, *bkn;
  const float* c;
  float* d;
  int mode;
};
extern "C" __global__ void mma_selftest(const __nv_bfloat16* a_, const __nv_bfloat16* at,
                                         const __nv_bfloat16* bt, const __nv_bfloat16* bkn, const float* c_,
                                         float* d_, int mode) {
  const MmaOperands p{a_, at, bt, bkn, c_, d_, mode};
  REEL_SHARED_ALIGNED(16, __nv_bfloat16, sa, [16 * 16]);
  REEL_SHARED_ALIGNED(16, __nv_bfloat16, sb, [16 * 16]);
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
REEL_EMU_EXPORT(mma_selftest)

// f32 -> f16 -> f32 through the f16 host type (emu) or cuda_fp16 (hardware).
extern "C" __global__ void f16_roundtrip_selftest(const float* x, __half* h, float* back, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    h[i] = __float2half(x[i]);
    back[i] = __half2float(h[i]);
  }
}
REEL_EMU_EXPORT(f16_roundtrip_selftest)

// Vector types, bf16 pairs and integer intrinsics (their host versions against the
// hardware's): per float4 of x, y gets two bf16 pairs (round to nearest even), back the
// pairs as floats, bits the popcount plus the leading zeros of each component's bits.
extern "C" __global__ void vector_types_selftest(const float4* x, __nv_bfloat162* y, float4* back, int* bits, int n4) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += gridDim.x * blockDim.x) {
    const float4 v = x[i];
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y);
    const __nv_bfloat162 hi = __float22bfloat162_rn(make_float2(v.z, v.w));
    y[2 * i] = lo;
    y[2 * i + 1] = hi;
    const float2 a = __bfloat1622float2(lo);
    back[i] = make_float4(a.x, a.y, __low2float(hi), __high2float(hi));
    bits[i] = __popc(__float_as_uint(v.x)) + __clz(__float_as_int(v.y)) + __popc(__float_as_uint(v.z)) +
              __clz(__float_as_int(v.w));
  }
}
REEL_EMU_EXPORT(vector_types_selftest)
