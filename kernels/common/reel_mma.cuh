// Tensor-core, ldmatrix and async-copy wrappers. Kernels use these, never the PTX directly:
// each has a PTX body (nvcc) and an emulated body (REEL_EMU) that follows the PTX ISA
// fragment layouts (PTX ISA 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating
// point type"; 9.7.14.5.15 ldmatrix). The hardware self-test (tools/gpu-check.sh) runs both
// on the same inputs: bit-exact on integer-valued inputs proves the layouts.
//
// Fragments (groupID g = lane / 4, t = lane % 4; bf16 pairs packed low element first):
//   A 16x16 row-major: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
//                      a[3] = A[g+8][2t+8..]
//   B 16x8 (k x n):    b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C/D 16x8 f32:      c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
#pragma once
#include "reel_cuda.cuh"

#ifdef REEL_EMU
namespace reel_emu_detail {
inline float bf16_lo(uint32_t r) { return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(r & 0xffffu)}); }
inline float bf16_hi(uint32_t r) { return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(r >> 16)}); }
struct MmaSlot {
  uint32_t a[4];
  uint32_t b[2];
};
// Element (row, k) of A and (k, col) of B from the warp's deposited fragments.
inline float mma_a(const unsigned char* slots, int row, int k) {
  MmaSlot s;
  std::memcpy(&s, slots + ((row % 8) * 4 + (k % 8) / 2) * reel_emu::kSlotBytes, sizeof s);
  uint32_t r = s.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
  return (k & 1) ? bf16_hi(r) : bf16_lo(r);
}
inline float mma_b(const unsigned char* slots, int k, int col) {
  MmaSlot s;
  std::memcpy(&s, slots + (col * 4 + (k % 8) / 2) * reel_emu::kSlotBytes, sizeof s);
  uint32_t r = s.b[k >= 8 ? 1 : 0];
  return (k & 1) ? bf16_hi(r) : bf16_lo(r);
}
}  // namespace reel_emu_detail
#endif

// D = A·B + C for one warp: m16n8k16, bf16 inputs, f32 accumulation. All 32 lanes call it.
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
#ifdef REEL_EMU
  reel_emu_detail::MmaSlot mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  const unsigned char* slots = reel_emu::warp_exchange(&mine, sizeof mine, 0xffffffffu);
  const int lane = static_cast<int>(reel_emu::lane_id()), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += reel_emu_detail::mma_a(slots, row, k) * reel_emu_detail::mma_b(slots, k, col);
    d[i] = acc;
  }
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16: lanes 8i..8i+7 give the row addresses
// (16 bytes each, 16-byte aligned, shared memory) of 8x8 matrix i; lane l receives in r[i]
// the elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of matrix i, or with .trans the elements
// (2(l%4), l/4) and (2(l%4)+1, l/4). All 32 lanes call it (for x1/x2 the other lanes'
// addresses are ignored, as on hardware).
template <int N, bool Trans>
__device__ __forceinline__ void ldmatrix(uint32_t r[N], const void* row_address) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix takes 1, 2 or 4 matrices");
#ifdef REEL_EMU
  const unsigned char* slots = reel_emu::warp_exchange(&row_address, sizeof row_address, 0xffffffffu);
  const int lane = static_cast<int>(reel_emu::lane_id());
  auto row_of = [&](int m, int row) {
    const unsigned char* p;
    std::memcpy(&p, slots + (8 * m + row) * reel_emu::kSlotBytes, sizeof p);
    return p;
  };
  for (int m = 0; m < N; ++m) {
    uint16_t e[2];
    for (int j = 0; j < 2; ++j) {
      if (Trans)
        std::memcpy(&e[j], row_of(m, 2 * (lane % 4) + j) + 2 * (lane / 4), 2);
      else
        std::memcpy(&e[j], row_of(m, lane / 4) + 2 * (2 * (lane % 4) + j), 2);
    }
    r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
  if constexpr (N == 1) {
    if constexpr (Trans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  } else if constexpr (N == 2) {
    if constexpr (Trans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                   : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
  } else {
    if constexpr (Trans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  }
#endif
}

// 16-byte asynchronous copy global -> shared (cp.async.cg: bypasses L1), both addresses
// 16-byte aligned. Copies issued since the last commit form a group; cp_async_wait<N>()
// waits until at most N groups are still in flight (N = 0: all done). A __syncthreads()
// is still needed before other threads read what arrived.
__device__ __forceinline__ void cp_async_16(void* dst_shared, const void* src_global) {
#ifdef REEL_EMU
  reel_emu::cp_async(dst_shared, src_global, 16);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst_shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(src_global));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef REEL_EMU
  reel_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef REEL_EMU
  reel_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
