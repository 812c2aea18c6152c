// Kernels that break a rule on purpose, each a test that the emulator rejects what hardware
// would get wrong (engine/kernels/emu_checks.rs runs them on emu only), and the emulator's
// micro-benchmarks (bench/emu.rs). Compiled for the GPU like every kernel, never launched
// there except emu_microbench.
#include "common/reel_cuda.cuh"
#include "common/reel_mma.cuh"

// Block 0 fills shared memory; every block reads it. On hardware the other blocks read
// whatever the SM's shared memory held; on emu they read the poison pattern (NaN).
extern "C" __global__ void stale_shared_check(float* out) {
  REEL_SHARED(float, buf, [256]);
  const int t = threadIdx.x;
  if (blockIdx.x == 0) buf[t] = static_cast<float>(t);
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = buf[t];
}
REEL_EMU_EXPORT(stale_shared_check)

// n floats of dynamic shared memory beside 4 KiB of static: out[i] = n − 1 − i, read back
// reversed through shared memory.
extern "C" __global__ void dyn_shared_check(float* out, int n) {
  REEL_DYNAMIC_SHARED(float, dyn);
  REEL_SHARED(float, st, [1024]);
  const int t = threadIdx.x;
  st[t % 1024] = 1.0f;
  for (int i = t; i < n; i += blockDim.x) dyn[i] = static_cast<float>(i);
  __syncthreads();
  for (int i = t; i < n; i += blockDim.x) out[i] = dyn[n - 1 - i] * st[0];
}
REEL_EMU_EXPORT(dyn_shared_check)

// ldmatrix x4 of a 16x16 bf16 tile staged in shared memory; bad = 1 shifts lane 3's row
// address by 2 bytes (misaligned), bad = 2 gives lane 5 a global-memory address.
// out: [32][4] registers.
extern "C" __global__ void ldmatrix_check(const __nv_bfloat16* in, uint32_t* out, int bad) {
  REEL_SHARED_ALIGNED(16, __nv_bfloat16, s, [256]);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) s[i] = in[i];
  __syncwarp();
  const __nv_bfloat16* row = s + (lane % 16) * 16 + (lane / 16) * 8;
  if (bad == 1 && lane == 3) row += 1;
  if (bad == 2 && lane == 5) row = in + 16;
  uint32_t r[4];
  ldmatrix<4, false>(r, row);
  for (int i = 0; i < 4; ++i) out[4 * lane + i] = r[i];
}
REEL_EMU_EXPORT(ldmatrix_check)

// One 16-byte cp.async per lane into shared memory, waited for, copied out; bad = 1
// misaligns lane 2's destination, 2 its source, 3 gives it a global destination, 4 a
// shared-memory source. out: 128 floats.
extern "C" __global__ void cp_async_check(const float* src, float* out, int bad) {
  REEL_SHARED_ALIGNED(16, float, sh, [132]);
  const int lane = threadIdx.x;
  float* d = sh + 4 * lane;
  const float* s = src + 4 * lane;
  if (lane == 2) {
    if (bad == 1) d += 1;
    if (bad == 2) s += 1;
    if (bad == 3) d = out;
    if (bad == 4) s = sh + 128;
  }
  cp_async<16>(d, s);
  cp_async_commit();
  cp_async_wait<0>();
  __syncwarp();
  for (int i = lane; i < 128; i += 32) out[i] = sh[i];
}
REEL_EMU_EXPORT(cp_async_check)

// Deadlocks and broken warp rules, in a block of 64 threads:
//   mode 0: lanes 16-31 of warp 0 exit while lanes 0-15 wait at __syncwarp() for them
//   mode 1: lanes 0-15 of warp 1 wait at __syncwarp() for lanes 16-31, which wait at
//           __syncthreads() for them
//   mode 2: warp 0 waits at named barrier 1 for 64 threads; warp 1 never comes
//   mode 3: lanes 0-15 of warp 0 __syncwarp with a mask that also names lane 16, which
//           passes another mask (overlapping, different)
//   mode 4: a lane passes a mask that leaves itself out
extern "C" __global__ void deadlock_check(int* out, int mode) {
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  if (mode == 0 && warp == 0) {
    if (lane >= 16) return;
    __syncwarp();
  }
  if (mode == 1) {
    if (warp == 1 && lane < 16) __syncwarp();
    __syncthreads();
  }
  if (mode == 2 && warp == 0) named_barrier_sync(1, 64);
  if (mode == 3 && warp == 0) __syncwarp(lane < 16 ? 0x0001ffffu : 0xffff0000u);
  if (mode == 4) __syncwarp(1u << ((lane + 1) % 32));
  out[t] = mode;
}
REEL_EMU_EXPORT(deadlock_check)

// The order blocks run in: thread 0 of each block takes a ticket. In order on emu, a
// permutation under REEL_EMU_SHUFFLE (hardware promises no order either).
extern "C" __global__ void block_order_check(int* counter, int* ticket) {
  if (threadIdx.x == 0) ticket[blockIdx.x] = atomicAdd(counter, 1);
}
REEL_EMU_EXPORT(block_order_check)

// Crashes on purpose, for the test that a crash inside a kernel names it (run in a child
// process): mode 0 reads address 16 in thread 7 of block 1; mode 1 overflows thread 3's
// fiber stack (emu only: a 512 KiB local array).
#ifdef REEL_EMU
// Its own frame (not inlined): a local array is allocated at function entry, so in the
// kernel itself every thread would overflow.
__attribute__((noinline)) static float overflow_stack() {
  volatile char big[512 * 1024];
  big[0] = 1;
  return big[0];
}
#endif
extern "C" __global__ void crash_check(const float* bad, float* out, int mode) {
  float v = 0.0f;
  if (mode == 0 && blockIdx.x == 1 && threadIdx.x == 7) v = *(bad + 4);
#ifdef REEL_EMU
  if (mode == 1 && threadIdx.x == 3) v = overflow_stack();
#endif
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}
REEL_EMU_EXPORT(crash_check)

// Micro-benchmarks of the emulator (bench/emu.rs): `iters` rounds of op 0 __syncthreads(),
// 1 a warp shuffle, 2 an m16n8k16 mma. out: one float per thread.
extern "C" __global__ void emu_microbench(float* out, int op, int iters) {
  const int t = threadIdx.x;
  float v = static_cast<float>(t);
  if (op == 0) {
    for (int i = 0; i < iters; ++i) __syncthreads();
  } else if (op == 1) {
    for (int i = 0; i < iters; ++i) v += __shfl_xor_sync(0xffffffffu, v, 1 + i % 16);
  } else {
    const uint32_t a[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};  // bf16 1.0 pairs
    const uint32_t b[2] = {0x3f803f80u, 0x3f803f80u};
    float d[4] = {0, 0, 0, 0};
    for (int i = 0; i < iters; ++i) mma_m16n8k16_bf16(d, a, b, d);
    v = d[0];
  }
  out[blockIdx.x * blockDim.x + t] = v;
}
REEL_EMU_EXPORT(emu_microbench)
