// Checks of the Hopper wrappers (kernels/common/reel_hopper.cuh), run on emu by the tests
// and on a GPU by the hardware self-test, on the same inputs: raw shared-memory bytes after
// TMA loads, raw wgmma accumulator registers for every operand layout, mbarrier phases after a
// fixed sequence. `bad` breaks one rule on purpose (emu only: the emulator must reject it).
// sm_90a alone (build.rs: the `.sm90.cu` suffix).
#include "common/reel_cuda.cuh"
#include "common/reel_hopper.cuh"

// One TMA load of the box at c (rank 1..5) into 1024-aligned dynamic shared memory, its raw
// bytes copied to `raw`, then stored back through `out_map` at the same coordinates.
// bad = 1: a generic store into the box before the TMA store, no fence; 2: the load's
// destination 64 bytes off the 128-byte alignment.
extern "C" __global__ void tma_check(const __grid_constant__ TensorMap in_map, const __grid_constant__ TensorMap out_map,
                                     unsigned char* raw, int rank, int c0, int c1, int c2, int c3, int c4,
                                     unsigned bytes, int bad) {
  REEL_DYNAMIC_SHARED(unsigned char, dyn);
  REEL_SHARED_ALIGNED(8, uint64_t, bar, [1]);
  const unsigned tid = threadIdx.x;
  unsigned char* smem = aligned_1k(dyn);
  unsigned char* box = bad == 2 ? smem + 64 : smem;
  if (tid == 0) {
    mbarrier_init(bar, 1);
    fence_mbarrier_init();
  }
  __syncthreads();
  if (tid == 0) {
    mbarrier_arrive_expect_tx(bar, bytes);
    switch (rank) {
      case 1: tma_load<1>(box, in_map, bar, c0); break;
      case 2: tma_load<2>(box, in_map, bar, c0, c1); break;
      case 3: tma_load<3>(box, in_map, bar, c0, c1, c2); break;
      case 4: tma_load<4>(box, in_map, bar, c0, c1, c2, c3); break;
      default: tma_load<5>(box, in_map, bar, c0, c1, c2, c3, c4); break;
    }
  }
  mbarrier_wait_parity(bar, 0);
  for (unsigned i = tid; i < bytes; i += blockDim.x) raw[i] = box[i];
  if (bad == 1 && tid == 5) box[0] = 0x3c;
  __syncthreads();
  if (tid == 0) {
    switch (rank) {
      case 1: tma_store<1>(out_map, box, c0); break;
      case 2: tma_store<2>(out_map, box, c0, c1); break;
      case 3: tma_store<3>(out_map, box, c0, c1, c2); break;
      case 4: tma_store<4>(out_map, box, c0, c1, c2, c3); break;
      default: tma_store<5>(out_map, box, c0, c1, c2, c3, c4); break;
    }
    tma_store_commit();
    tma_store_wait<0>();
  }
}
REEL_EMU_EXPORT(tma_check)

// The plan of a wgmma check, made by the launcher (engine/kernels/hopper.rs): where each TMA
// load of A and B lands, and each k16 step's descriptors.
struct WgmmaPlan {
  int loads_a, loads_b;
  int load_a[8][3];  // shared offset, c0, c1
  int load_b[8][3];
  int desc_a[4][3];  // shared offset of the step's start, LBO, SBO (bytes)
  int desc_b[4][3];
  int swizzle_a, swizzle_b;  // bytes (0: none)
  int trans_b;               // B N-major
  int a_regs;                // A from registers (a_frag) instead of shared memory
  unsigned bytes;            // all loads
};

template <int TransB>
__device__ __forceinline__ void wgmma_steps(float (&d)[32], const WgmmaPlan& p, unsigned char* smem,
                                            const uint32_t* a_frag, int bad) {
  const unsigned tid = threadIdx.x;
  uint32_t a[4][4];
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 4; ++i) a[j][i] = p.a_regs ? a_frag[(j * 128 + tid) * 4 + i] : 0u;
  if (bad != 2) wgmma_fence();
  for (int j = 0; j < 4; ++j) {
    const uint64_t db = make_smem_desc(smem + p.desc_b[j][0], static_cast<Swizzle>(p.swizzle_b), p.desc_b[j][1],
                                       p.desc_b[j][2]);
    if (p.a_regs) {
      wgmma_rs<64, __nv_bfloat16, TransB>(d, a[j], db, j > 0);
    } else {
      const uint64_t da = make_smem_desc(smem + p.desc_a[j][0], static_cast<Swizzle>(p.swizzle_a), p.desc_a[j][1],
                                         p.desc_a[j][2]);
      wgmma_ss<64, __nv_bfloat16, 0, TransB>(d, da, db, j > 0);
    }
  }
  wgmma_commit();
}

// D (64x64, f32) = A (64x64) · B (64x64) in four k16 steps of m64n64k16, A and B loaded by
// TMA as `plan` says; every thread's 32 accumulator registers to d[tid * 32 + r].
// bad = 1: a generic store into B after it landed, no fence; 2: no wgmma.fence; 3: the
// accumulators read before the wait (d gets what they held).
extern "C" __global__ void __launch_bounds__(128, 1)
    wgmma_check(const __grid_constant__ TensorMap a_map, const __grid_constant__ TensorMap b_map,
                const WgmmaPlan* plan, const uint32_t* a_frag, float* d_out, int bad) {
  REEL_DYNAMIC_SHARED(unsigned char, dyn);
  REEL_SHARED_ALIGNED(8, uint64_t, bar, [1]);
  const unsigned tid = threadIdx.x;
  unsigned char* smem = aligned_1k(dyn);
  const WgmmaPlan p = *plan;
  if (tid == 0) {
    mbarrier_init(bar, 1);
    fence_mbarrier_init();
  }
  __syncthreads();
  if (tid == 0) {
    mbarrier_arrive_expect_tx(bar, p.bytes);
    for (int i = 0; i < p.loads_a; ++i) tma_load<2>(smem + p.load_a[i][0], a_map, bar, p.load_a[i][1], p.load_a[i][2]);
    for (int i = 0; i < p.loads_b; ++i) tma_load<2>(smem + p.load_b[i][0], b_map, bar, p.load_b[i][1], p.load_b[i][2]);
  }
  mbarrier_wait_parity(bar, 0);
  if (bad == 1 && tid == 7) smem[p.load_b[0][0] + 2] ^= 0x01;
  __syncthreads();
  float d[32];
  for (int r = 0; r < 32; ++r) d[r] = 0.0f;
  if (p.trans_b)
    wgmma_steps<1>(d, p, smem, a_frag, bad);
  else
    wgmma_steps<0>(d, p, smem, a_frag, bad);
  if (bad == 3)
    for (int r = 0; r < 32; ++r) d_out[tid * 32 + r] = d[r];
  wgmma_wait<0>();
  if (bad != 3)
    for (int r = 0; r < 32; ++r) d_out[tid * 32 + r] = d[r];
}
REEL_EMU_EXPORT(wgmma_check)

// mbarrier phases after a fixed sequence by thread 0 (test_wait results, 1 = the phase of that
// parity has completed), with a 64-byte TMA load (`map`: 32 bf16, 1D) completing the last
// phase's transaction count: out[0..8].
// bad = 1: a wait that can never complete (deadlock naming the barrier); 2: a warpgroup whose
// warps pass setmaxnreg different counts; 3: setmaxnreg with a count that is not a multiple
// of 8; 4: more arrivals than the phase expects.
extern "C" __global__ void __launch_bounds__(128, 1)
    mbarrier_check(const __grid_constant__ TensorMap map, int* out, int bad) {
  REEL_DYNAMIC_SHARED(unsigned char, dyn);
  REEL_SHARED_ALIGNED(8, uint64_t, bar, [1]);
  const unsigned tid = threadIdx.x;
  unsigned char* smem = aligned_1k(dyn);
  if (bad == 2) setmaxnreg_check(tid < 32 ? 240 : 232, true);
  if (bad == 3) setmaxnreg_check(100, false);
  if (tid == 0) {
    mbarrier_init(bar, 2);
    out[0] = mbarrier_test_wait_parity(bar, 0);  // phase 0 running: 0
    out[1] = mbarrier_test_wait_parity(bar, 1);  // the phase before it counts as done: 1
    mbarrier_arrive(bar);
    out[2] = mbarrier_test_wait_parity(bar, 0);  // one of two arrivals: 0
    mbarrier_arrive(bar);
    out[3] = mbarrier_test_wait_parity(bar, 0);  // phase 0 complete: 1
    out[4] = mbarrier_test_wait_parity(bar, 1);  // phase 1 running: 0
    mbarrier_arrive_expect_tx(bar, 64);
    mbarrier_arrive(bar);
    out[5] = mbarrier_test_wait_parity(bar, 1);  // arrivals done, 64 bytes outstanding: 0
    if (bad == 4) mbarrier_arrive(bar);
    tma_load<1>(smem, map, bar, 0);
    mbarrier_wait_parity(bar, 1);
    out[6] = mbarrier_test_wait_parity(bar, 1);  // phase 1 complete: 1
    out[7] = mbarrier_test_wait_parity(bar, 0);  // phase 2 running: 0
    if (bad == 1) mbarrier_wait_parity(bar, 0);
    out[8] = smem[0] | (smem[63] << 8);  // the load landed
  }
  __syncthreads();
}
REEL_EMU_EXPORT(mbarrier_check)
