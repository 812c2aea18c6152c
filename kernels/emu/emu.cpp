// The SIMT emulator's runtime (see emu.h).
#include "emu.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace reel_emu {
namespace {

// Kernels keep their locals small; 64 KiB per fiber leaves room for the emulated math.
constexpr size_t kStack = 64 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  uint3 idx;
  bool done = false;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* args = nullptr;
};

thread_local Block* g_block = nullptr;
thread_local uint3 g_block_idx;
thread_local dim3 g_block_dim;
thread_local dim3 g_grid_dim;
thread_local std::vector<unsigned char> g_dynamic_shared;

void fiber_entry() {
  Block* b = g_block;
  b->body(b->args);
  b->current->done = true;
  // Returning switches to uc_link (the scheduler).
}

// A per-thread override of REEL_EMU_SHUFFLE (tests set it without touching the
// environment): -1 unset, 0 off, 1 on with g_seed.
thread_local int g_shuffle_override = -1;
thread_local uint64_t g_seed = 0;

uint64_t shuffle_seed(bool* on) {
  if (g_shuffle_override >= 0) {
    *on = g_shuffle_override == 1;
    return g_seed;
  }
  const char* s = std::getenv("REEL_EMU_SHUFFLE");
  *on = s != nullptr && *s != '\0';
  return *on ? std::strtoull(s, nullptr, 10) : 0;
}

}  // namespace

extern "C" void reel_emu_set_shuffle(int mode, uint64_t seed) {
  g_shuffle_override = mode;
  g_seed = seed;
}

uint3 thread_idx() { return g_block->current->idx; }
uint3 block_idx() { return g_block_idx; }
dim3 block_dim() { return g_block_dim; }
dim3 grid_dim() { return g_grid_dim; }
void* dynamic_shared() { return g_dynamic_shared.data(); }

void sync_threads() {
  Block* b = g_block;
  swapcontext(&b->current->ctx, &b->scheduler);
}

void launch(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* args) {
  bool shuffle = false;
  std::mt19937_64 rng(shuffle_seed(&shuffle));
  g_grid_dim = grid;
  g_block_dim = block;
  const unsigned n = block.x * block.y * block.z;
  std::vector<unsigned> order(n);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.body = body;
        b.args = args;
        b.fibers.resize(n);
        g_block = &b;
        g_block_idx = uint3(bx, by, bz);
        g_dynamic_shared.assign(shared_bytes, 0);
        for (unsigned t = 0; t < n; ++t) {
          Fiber& f = b.fibers[t];
          f.idx = uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          f.stack.resize(kStack);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &b.scheduler;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        // Rounds: every live fiber runs to its next barrier or to its end.
        for (;;) {
          unsigned live = 0;
          for (unsigned t = 0; t < n; ++t) order[t] = t;
          if (shuffle) std::shuffle(order.begin(), order.end(), rng);
          for (unsigned t : order) {
            Fiber& f = b.fibers[t];
            if (f.done) continue;
            b.current = &f;
            swapcontext(&b.scheduler, &f.ctx);
            if (!f.done) ++live;
          }
          if (live == 0) break;
        }
        g_block = nullptr;
      }
}

}  // namespace reel_emu
