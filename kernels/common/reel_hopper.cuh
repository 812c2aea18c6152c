// Hopper (sm_90a) wrappers: wgmma, TMA, mbarriers, the async-proxy fence, named-barrier
// arrive and setmaxnreg. Kernels use these, never the PTX directly. Each has a PTX body
// (nvcc) and an emulated body (REEL_EMU) in kernels/emu, which follows the PTX ISA
// ("Asynchronous Warpgroup Level Matrix Multiply-Accumulate", "Tensor Copy" under
// cp.async.bulk.tensor, "mbarrier") and completes asynchronous work as late as hardware may:
// wgmma accumulators are poisoned until the wait_group that covers them and read shared
// memory then; a TMA load lands when a thread waits on its mbarrier; shared memory written by
// ordinary stores and read by TMA or wgmma without a fence.proxy.async in between is a fault.
// The hardware self-test (kernels/selftest.sm90.cu, tools/gpu-check.sh) runs every wrapper
// on a GPU and here on the same inputs.
//
// wgmma m64nNk16, f32 accumulators, bf16 or f16 inputs, issued by a warpgroup (128 threads,
// warps 4i..4i+3). Thread i of the warpgroup (warp w = i / 32, lane l, g = l / 4, t = l % 4)
// holds, for j in 0..N/8:
//   d[4j + 0..1] = D[16w + g][8j + 2t + 0..1],  d[4j + 2..3] = D[16w + g + 8][8j + 2t + 0..1]
// and, with A in registers (bf16 pairs, low element first), like mma.m16n8k16's A per warp:
//   a[0] = A[16w + g][2t..2t+1], a[1] = A[16w + g + 8][2t..], a[2] = A[16w + g][2t+8..],
//   a[3] = A[16w + g + 8][2t+8..]
// Shared-memory operands come through 64-bit matrix descriptors (make_smem_desc).
#pragma once
#include "reel_cuda.cuh"

// A TMA tensor map as a kernel parameter (`const __grid_constant__ TensorMap map`): the 128
// bytes of a CUtensorMap, encoded by cuTensorMapEncodeTiled on cuda and by reel on emu
// (engine/kernels/tma.rs).
struct __align__(64) TensorMap {
  unsigned long long w[16];
};

// Swizzle of a shared-memory operand or TMA box: the span in bytes (0: none).
enum class Swizzle : int { None = 0, B32 = 32, B64 = 64, B128 = 128 };

#ifndef REEL_EMU
#include "reel_wgmma.inc"
#endif

// The shared-window address of a shared-memory pointer (what PTX's shared-space operands and
// descriptors take).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
#ifdef REEL_EMU
  return reel_emu::shared_offset(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// Shared memory at `p` rounded up to the next 1024 bytes (a launcher adds 1 KiB to the
// dynamic shared memory for it): the swizzle atoms of TMA and wgmma then start at a multiple
// of their repeat, whatever static shared memory precedes the dynamic part on hardware.
__device__ __forceinline__ unsigned char* aligned_1k(unsigned char* p) {
  return p + ((1024u - (smem_addr(p) & 1023u)) & 1023u);
}

// ---- mbarrier -------------------------------------------------------------------------

// Initialise the mbarrier at `bar` (8 bytes, 8-aligned, shared) for `count` arrivals per
// phase. One thread; then fence_mbarrier_init() and a block barrier before others use it.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned count) {
#ifdef REEL_EMU
  reel_emu::mbarrier_init(bar, count);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}
// Makes mbarrier initialisations visible to the async proxy (TMA completing on them).
__device__ __forceinline__ void fence_mbarrier_init() {
#ifndef REEL_EMU
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbarrier_inval(uint64_t* bar) {
#ifdef REEL_EMU
  reel_emu::mbarrier_inval(bar);
#else
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
// One arrival; returns the state token (the phase arrived on).
__device__ __forceinline__ uint64_t mbarrier_arrive(uint64_t* bar) {
#ifdef REEL_EMU
  return reel_emu::mbarrier_arrive(bar, 1, 0);
#else
  uint64_t state;
  asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n" : "=l"(state) : "r"(smem_addr(bar)) : "memory");
  return state;
#endif
}
// Expect `bytes` more of transactions (TMA loads) in this phase, then arrive once.
__device__ __forceinline__ uint64_t mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef REEL_EMU
  return reel_emu::mbarrier_arrive(bar, 1, bytes);
#else
  uint64_t state;
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 %0, [%1], %2;\n"
               : "=l"(state)
               : "r"(smem_addr(bar)), "r"(bytes)
               : "memory");
  return state;
#endif
}
__device__ __forceinline__ void mbarrier_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef REEL_EMU
  reel_emu::mbarrier_expect_tx(bar, bytes);
#else
  asm volatile("mbarrier.expect_tx.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}
// Whether the phase of `parity` (0 or 1) has completed: true once the barrier's current
// phase has the other parity. May wait a while (a hardware time limit; on emu until the phase
// completes).
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, unsigned parity) {
#ifdef REEL_EMU
  return reel_emu::mbarrier_wait_parity(bar, parity, true);
#else
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
#endif
}
// The same without waiting (mbarrier.test_wait.parity).
__device__ __forceinline__ bool mbarrier_test_wait_parity(uint64_t* bar, unsigned parity) {
#ifdef REEL_EMU
  return reel_emu::mbarrier_wait_parity(bar, parity, false);
#else
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
#endif
}
// Waits until the phase of `parity` has completed.
__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, unsigned parity) {
  while (!mbarrier_try_wait_parity(bar, parity)) {
  }
}

// ---- fences and barriers --------------------------------------------------------------

// fence.proxy.async.shared::cta: ordinary stores to shared memory before it are visible to
// the async proxy (TMA stores, wgmma operand reads) after it. Each writing thread fences,
// then a barrier, then the async read.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef REEL_EMU
  reel_emu::fence_proxy_async();
#else
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// bar.arrive id, threads: arrive at named barrier `id` without waiting (a producer signalling
// consumers that bar.sync it; `threads` counts both, a multiple of 32).
__device__ __forceinline__ void named_barrier_arrive(unsigned id, unsigned threads) {
#ifdef REEL_EMU
  reel_emu::barrier_arrive(id, threads);
#else
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}
// setmaxnreg.{inc,dec}.sync.aligned.u32 N: the warpgroup's registers per thread (N a multiple
// of 8 in 24..256; every thread of the warpgroup, the same N). Takes effect only in a kernel
// with a register cap at entry (__launch_bounds__(threads, 1)).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: a multiple of 8 in 24..256");
#ifdef REEL_EMU
  reel_emu::setmaxnreg(N, true);
#else
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: a multiple of 8 in 24..256");
#ifdef REEL_EMU
  reel_emu::setmaxnreg(N, false);
#else
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
// The run-time-count form, for the emulator's own checks (a count the compiler cannot see).
__device__ __forceinline__ void setmaxnreg_check(unsigned n, bool increase) {
#ifdef REEL_EMU
  reel_emu::setmaxnreg(n, increase);
#else
  (void)n;
  (void)increase;
#endif
}

// ---- TMA ------------------------------------------------------------------------------

// Load the box of `map` at element coordinates c (innermost first) into shared `dst`,
// completing its bytes on `bar` (whose phase the issuing thread armed with
// mbarrier_arrive_expect_tx for the box's bytes, out-of-bounds fill included). One thread.
template <int Rank>
__device__ __forceinline__ void tma_load(void* dst, const TensorMap& map, uint64_t* bar, int c0, int c1 = 0,
                                         int c2 = 0, int c3 = 0, int c4 = 0) {
  static_assert(Rank >= 1 && Rank <= 5, "TMA boxes have 1 to 5 dimensions");
#ifdef REEL_EMU
  const int32_t c[5] = {c0, c1, c2, c3, c4};
  reel_emu::tma_load(dst, &map, c, bar);
#else
  const uint32_t d = smem_addr(dst), b = smem_addr(bar);
  const uint64_t m = reinterpret_cast<uint64_t>(&map);
  if constexpr (Rank == 1)
    asm volatile(
        "cp.async.bulk.tensor.1d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2}], [%3];\n" ::"r"(d),
        "l"(m), "r"(c0), "r"(b)
        : "memory");
  else if constexpr (Rank == 2)
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            d),
        "l"(m), "r"(c0), "r"(c1), "r"(b)
        : "memory");
  else if constexpr (Rank == 3)
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(d),
        "l"(m), "r"(c0), "r"(c1), "r"(c2), "r"(b)
        : "memory");
  else if constexpr (Rank == 4)
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(d),
        "l"(m), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(b)
        : "memory");
  else
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
        "%6}], [%7];\n" ::"r"(d),
        "l"(m), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(b)
        : "memory");
#endif
}

// Store shared `src` (a box, laid out as a load would leave it) to the box of `map` at c;
// out-of-bounds elements are not written. Written by ordinary stores: fence_proxy_async()
// in every writing thread and a barrier first. One thread; then tma_store_commit() and
// tma_store_wait<0>() before the shared memory is reused.
template <int Rank>
__device__ __forceinline__ void tma_store(const TensorMap& map, const void* src, int c0, int c1 = 0, int c2 = 0,
                                          int c3 = 0, int c4 = 0) {
  static_assert(Rank >= 1 && Rank <= 5, "TMA boxes have 1 to 5 dimensions");
#ifdef REEL_EMU
  const int32_t c[5] = {c0, c1, c2, c3, c4};
  reel_emu::tma_store(&map, c, src);
#else
  const uint32_t s = smem_addr(src);
  const uint64_t m = reinterpret_cast<uint64_t>(&map);
  if constexpr (Rank == 1)
    asm volatile("cp.async.bulk.tensor.1d.global.shared::cta.bulk_group [%0, {%1}], [%2];\n" ::"l"(m), "r"(c0), "r"(s)
                 : "memory");
  else if constexpr (Rank == 2)
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(m), "r"(c0),
                 "r"(c1), "r"(s)
                 : "memory");
  else if constexpr (Rank == 3)
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::"l"(m),
                 "r"(c0), "r"(c1), "r"(c2), "r"(s)
                 : "memory");
  else if constexpr (Rank == 4)
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(m),
                 "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(s)
                 : "memory");
  else
    asm volatile("cp.async.bulk.tensor.5d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4, %5}], [%6];\n" ::"l"(m),
                 "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(s)
                 : "memory");
#endif
}
__device__ __forceinline__ void tma_store_commit() {
#ifdef REEL_EMU
  reel_emu::tma_store_commit();
#else
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N committed store groups may still be reading shared memory.
template <int N>
__device__ __forceinline__ void tma_store_wait() {
#ifdef REEL_EMU
  reel_emu::tma_store_wait(N);
#else
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
}

// ---- wgmma ----------------------------------------------------------------------------

// The 64-bit shared-memory matrix descriptor of an operand at `p`: start address, leading and
// stride byte offsets (multiples of 16; their meaning per layout in kernels/README.md), and
// the swizzle (layout type 1 = 128B, 2 = 64B, 3 = 32B, 0 = none). Base offset 0: the
// swizzle's repeat (8 × its span) starts at a multiple of it.
__device__ __forceinline__ uint64_t make_smem_desc(const void* p, Swizzle sw, uint32_t lbo, uint32_t sbo) {
  const uint64_t layout = sw == Swizzle::B128 ? 1 : sw == Swizzle::B64 ? 2 : sw == Swizzle::B32 ? 3 : 0;
  return (static_cast<uint64_t>((smem_addr(p) & 0x3ffffu) >> 4)) | (static_cast<uint64_t>((lbo & 0x3ffffu) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3ffffu) >> 4) << 32) | (layout << 62);
}

// wgmma.fence: before the first wgmma after the accumulators or A registers were touched by
// other instructions (in practice: before each batch).
__device__ __forceinline__ void wgmma_fence() {
#ifdef REEL_EMU
  reel_emu::wgmma_fence();
#else
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef REEL_EMU
  reel_emu::wgmma_commit();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed wgmma groups are in flight; their accumulators are then
// readable.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef REEL_EMU
  reel_emu::wgmma_wait(N);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

#ifdef REEL_EMU
namespace reel_emu_detail {
template <class T>
inline reel_emu::WgmmaOp wgmma_op(int n, float* d, int scale_d, int scale_a, int scale_b) {
  reel_emu::WgmmaOp op{};
  op.n = static_cast<uint32_t>(n);
  op.f16 = std::is_same<T, __half>::value ? 1 : 0;
  op.scale_a = scale_a;
  op.scale_b = scale_b;
  op.scale_d = scale_d != 0 ? 1 : 0;
  op.d = d;
  return op;
}
}  // namespace reel_emu_detail
#endif

#define REEL_WGMMA_UNPAREN(...) __VA_ARGS__
// Calls the generated reel_wgmma_KIND_TY_n<N><TARGS>CALLARGS for the template's N.
#define REEL_WGMMA_DISPATCH(KIND, TY, TARGS, CALLARGS)                                     \
  if constexpr (N == 8) reel_wgmma_##KIND##_##TY##_n8<REEL_WGMMA_UNPAREN TARGS> CALLARGS;     \
  else if constexpr (N == 16) reel_wgmma_##KIND##_##TY##_n16<REEL_WGMMA_UNPAREN TARGS> CALLARGS; \
  else if constexpr (N == 32) reel_wgmma_##KIND##_##TY##_n32<REEL_WGMMA_UNPAREN TARGS> CALLARGS; \
  else if constexpr (N == 64) reel_wgmma_##KIND##_##TY##_n64<REEL_WGMMA_UNPAREN TARGS> CALLARGS; \
  else if constexpr (N == 96) reel_wgmma_##KIND##_##TY##_n96<REEL_WGMMA_UNPAREN TARGS> CALLARGS; \
  else if constexpr (N == 128) reel_wgmma_##KIND##_##TY##_n128<REEL_WGMMA_UNPAREN TARGS> CALLARGS; \
  else if constexpr (N == 192) reel_wgmma_##KIND##_##TY##_n192<REEL_WGMMA_UNPAREN TARGS> CALLARGS; \
  else reel_wgmma_##KIND##_##TY##_n256<REEL_WGMMA_UNPAREN TARGS> CALLARGS

// D (64 x N, this thread's N/2 values) = A·B (+ D if scale_d), A (64x16) and B (16xN) from
// shared memory through descriptors; TransA: A stored M-major, TransB: B stored N-major (else
// K-major); ScaleA/ScaleB: 1 or -1 (negate the operand).
template <int N, class T, int TransA = 0, int TransB = 0, int ScaleA = 1, int ScaleB = 1>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N == 8 || N == 16 || N == 32 || N == 64 || N == 96 || N == 128 || N == 192 || N == 256,
                "wgmma_ss: N must be one of the generated sizes (tools/gen_wgmma.py)");
#ifdef REEL_EMU
  reel_emu::WgmmaOp op = reel_emu_detail::wgmma_op<T>(N, d, scale_d, ScaleA, ScaleB);
  op.desc_a = desc_a;
  op.desc_b = desc_b;
  op.trans_a = TransA;
  op.trans_b = TransB;
  reel_emu::wgmma(op);
#else
  if constexpr (std::is_same<T, __half>::value) {
    REEL_WGMMA_DISPATCH(ss, f16, (ScaleA, ScaleB, TransA, TransB), (d, desc_a, desc_b, scale_d));
  } else {
    REEL_WGMMA_DISPATCH(ss, bf16, (ScaleA, ScaleB, TransA, TransB), (d, desc_a, desc_b, scale_d));
  }
#endif
}

// The same with A from registers (the fragment layout at the top of this file).
template <int N, class T, int TransB = 0, int ScaleA = 1, int ScaleB = 1>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(N == 8 || N == 16 || N == 32 || N == 64 || N == 96 || N == 128 || N == 192 || N == 256,
                "wgmma_rs: N must be one of the generated sizes (tools/gen_wgmma.py)");
#ifdef REEL_EMU
  reel_emu::WgmmaOp op = reel_emu_detail::wgmma_op<T>(N, d, scale_d, ScaleA, ScaleB);
  op.a_regs = 1;
  for (int i = 0; i < 4; ++i) op.a[i] = a[i];
  op.desc_b = desc_b;
  op.trans_b = TransB;
  reel_emu::wgmma(op);
#else
  if constexpr (std::is_same<T, __half>::value) {
    REEL_WGMMA_DISPATCH(rs, f16, (ScaleA, ScaleB, TransB), (d, a, desc_b, scale_d));
  } else {
    REEL_WGMMA_DISPATCH(rs, bf16, (ScaleA, ScaleB, TransB), (d, a, desc_b, scale_d));
  }
#endif
}
#undef REEL_WGMMA_DISPATCH
#undef REEL_WGMMA_UNPAREN
