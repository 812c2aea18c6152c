// The SIMT emulator: runs CUDA kernels written against kernels/common/reel_cuda.cuh on the
// host. A block's threads are fibers (ucontext) on one OS thread, scheduled cooperatively;
// blocks of a grid run one after another. __syncthreads() is a block barrier: every fiber
// runs until it reaches the barrier (or returns), then the next round starts. With
// REEL_EMU_SHUFFLE=<seed> the order in which fibers run between barriers is a fresh random
// permutation each round, so a missing barrier shows up as a wrong result.
#pragma once
#include <cstddef>

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
void sync_threads();
// Dynamic shared memory of the running block (zeroed per launch).
void* dynamic_shared();
// Runs body(args) as every thread of every block.
void launch(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* args);
}  // namespace reel_emu
