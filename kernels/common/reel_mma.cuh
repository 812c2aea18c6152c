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
inline float f16_lo(uint32_t r) { return __half2float(__half{static_cast<uint16_t>(r & 0xffffu)}); }
inline float f16_hi(uint32_t r) { return __half2float(__half{static_cast<uint16_t>(r >> 16)}); }
struct MmaSlot {
  uint32_t a[4];
  uint32_t b[2];
};
// Register `reg` (a[0..3], then b[0..1]) that lane `lane` deposited.
inline uint32_t mma_reg(const unsigned char* slots, int lane, int reg) {
  uint32_t r;
  std::memcpy(&r, slots + lane * reel_emu::kSlotBytes + 4 * reg, 4);
  return r;
}
// Row `row` of A and column `col` of B (16 values each) from the warp's fragments, of bf16
// (F16 false) or f16 elements.
template <bool F16>
inline void mma_a_row(const unsigned char* slots, int row, float out[16]) {
  for (int k = 0; k < 16; k += 2) {
    const uint32_t r = mma_reg(slots, (row % 8) * 4 + (k % 8) / 2, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0));
    out[k] = F16 ? f16_lo(r) : bf16_lo(r);
    out[k + 1] = F16 ? f16_hi(r) : bf16_hi(r);
  }
}
template <bool F16>
inline void mma_b_col(const unsigned char* slots, int col, float out[16]) {
  for (int k = 0; k < 16; k += 2) {
    const uint32_t r = mma_reg(slots, col * 4 + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0));
    out[k] = F16 ? f16_lo(r) : bf16_lo(r);
    out[k + 1] = F16 ? f16_hi(r) : bf16_hi(r);
  }
}
// The warp's m16n8k16 product (every lane computes its own four results). The first lane to
// read an exchange decodes the whole of A (16x16) and B (16x8) once into a per-OS-thread
// cache keyed by the exchange's serial; the other lanes of the warp reuse it (the fibers of a
// block share one OS thread, and a lane reads its exchange before its warp can open another).
struct MmaOperands {
  uint64_t serial = ~uint64_t{0};
  float a[16][16];  // a[row][k]
  float b[8][16];   // b[col][k]
};
template <bool F16>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  thread_local MmaOperands cache[2];  // bf16 and f16 apart: one serial, two decodings
  MmaSlot mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  uint64_t serial;
  const unsigned char* slots = reel_emu::warp_exchange(&mine, sizeof mine, 0xffffffffu, &serial);
  MmaOperands& ops = cache[F16 ? 1 : 0];
  if (ops.serial != serial) {
    for (int row = 0; row < 16; ++row) mma_a_row<F16>(slots, row, ops.a[row]);
    for (int col = 0; col < 8; ++col) mma_b_col<F16>(slots, col, ops.b[col]);
    ops.serial = serial;
  }
  const int lane = static_cast<int>(reel_emu::lane_id()), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const float* ar = ops.a[g + (i >= 2 ? 8 : 0)];
    const float* bc = ops.b[2 * t + (i & 1)];
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += ar[k] * bc[k];
    d[i] = acc;
  }
}
}  // namespace reel_emu_detail
#endif

// D = A·B + C for one warp: m16n8k16, bf16 inputs, f32 accumulation. All 32 lanes call it.
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
#ifdef REEL_EMU
  reel_emu_detail::mma_m16n8k16<false>(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// The same with f16 inputs (same fragment layouts).
__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
#ifdef REEL_EMU
  reel_emu_detail::mma_m16n8k16<true>(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// m16n8k16 over storage type T (__nv_bfloat16 or __half).
template <class T>
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                             const float c[4]) {
  if constexpr (std::is_same<T, __half>::value) {
    mma_m16n8k16_f16(d, a, b, c);
  } else {
    mma_m16n8k16_bf16(d, a, b, c);
  }
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
  // Lanes 0..8N-1 give row addresses: each must be 16-byte aligned and in shared memory.
  const int lane = static_cast<int>(reel_emu::lane_id());
  if (lane < 8 * N) {
    if (reinterpret_cast<uintptr_t>(row_address) % 16 != 0)
      reel_emu::fault("ldmatrix row address %p (lane %d) is not 16-byte aligned", row_address, lane);
    if (!reel_emu::in_shared(row_address, 16))
      reel_emu::fault("ldmatrix row address %p (lane %d) is not in the block's shared memory", row_address, lane);
  }
  const unsigned char* slots = reel_emu::warp_exchange(&row_address, sizeof row_address, 0xffffffffu);
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

// Asynchronous copies global -> shared (cp.async). `Bytes` is 4, 8 or 16 (16 bypasses L1:
// .cg; 4 and 8 go through it: .ca); both addresses aligned to Bytes, the destination in
// shared memory. The zero-fill form reads the first `src_bytes` (0..Bytes) of the source and
// writes zeros for the rest: tile tails load with src_bytes = 0 and need no branch around the
// copy (the source address must still be valid-looking and aligned; it is not read).
// Copies issued since the last commit form a group; cp_async_wait<N>() waits until at most N
// groups are still in flight (N = 0: all done). A __syncthreads() is still needed before
// other threads read what arrived.
template <int Bytes>
__device__ __forceinline__ void cp_async_zfill(void* dst_shared, const void* src_global, unsigned src_bytes) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef REEL_EMU
  reel_emu::cp_async(dst_shared, src_global, Bytes, src_bytes);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst_shared));
  if constexpr (Bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src_global), "r"(src_bytes)
                 : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(addr), "l"(src_global), "n"(Bytes),
                 "r"(src_bytes)
                 : "memory");
#endif
}
template <int Bytes>
__device__ __forceinline__ void cp_async(void* dst_shared, const void* src_global) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef REEL_EMU
  reel_emu::cp_async(dst_shared, src_global, Bytes, Bytes);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst_shared));
  if constexpr (Bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(src_global) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(addr), "l"(src_global), "n"(Bytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_16(void* dst_shared, const void* src_global) {
  cp_async<16>(dst_shared, src_global);
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef REEL_EMU
  reel_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef REEL_EMU
  reel_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
