// The SIMT emulator: runs CUDA kernels written against kernels/common/reel_cuda.cuh on the
// host. A block's threads are fibers (ucontext) on one OS thread, scheduled cooperatively;
// blocks of a grid run one after another.
//
// Scheduling: every ready fiber runs until it blocks; it blocks at __syncthreads() (until
// every live fiber of the block is there) or at a warp-collective operation (until every
// lane the mask names has arrived). With REEL_EMU_SHUFFLE=<seed> the order in which fibers
// run is a fresh random permutation each round, so a missing barrier shows up as a wrong
// result. A deadlock (lanes waiting on a warp operation that the rest of their warp never
// reaches) aborts with a message naming the block and warp.
#pragma once
#include <cstddef>
#include <cstdint>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;

namespace reel_emu {
// The running fiber's coordinates.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
// Lane (0..31) and warp of the running fiber: lanes are consecutive linear thread ids.
unsigned lane_id();
void sync_threads();
// Dynamic shared memory of the running block (zeroed per launch).
void* dynamic_shared();
// Runs body(args) as every thread of every block.
void launch(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* args);

// The warp exchange every warp-collective operation is built on: deposits `bytes`
// (<= kSlotBytes) from `mine` as this lane's slot, waits until every lane in `mask` that
// exists has deposited, and returns the 32 slots of that exchange (slot i at
// i * kSlotBytes). The slots stay valid until this lane's next exchange. The calling lane
// must be in `mask`, and every lane in it must pass the same mask (as CUDA requires).
constexpr size_t kSlotBytes = 32;
const unsigned char* warp_exchange(const void* mine, size_t bytes, unsigned mask);
// Lanes of the running fiber's warp that exist (a partial last warp has fewer).
unsigned warp_lanes();

// cp.async emulation: copies are queued per thread and happen at the wait that covers their
// group (as late as the hardware may do them), so a missing wait reads stale shared memory.
void cp_async(void* dst_shared, const void* src_global, size_t bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);
}  // namespace reel_emu
