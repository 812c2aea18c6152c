// The SIMT emulator's runtime (see emu.h).
#include "emu.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace reel_emu {
namespace {

// Kernels keep their locals small; 64 KiB per fiber leaves room for the emulated math.
constexpr size_t kStack = 64 * 1024;

enum class State { Ready, AtBarrier, AtWarp, Done };

struct Copy {
  void* dst;
  const void* src;
  size_t bytes;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  uint3 idx;
  unsigned linear = 0;
  State state = State::Ready;
  // cp.async: committed groups (oldest first) and the group being built.
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
};

// One warp's exchange: two generations of slots, so a lane that leaves an exchange and
// reaches the next one cannot overwrite slots a slower lane has yet to read (the next
// exchange cannot complete, and so a third cannot start, before every lane arrives).
struct Warp {
  unsigned char slots[2][32][kSlotBytes];
  unsigned generation = 0;
  unsigned arrived = 0;
  unsigned need = 0;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned threads = 0;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* args = nullptr;
};

thread_local Block* g_block = nullptr;
thread_local uint3 g_block_idx;
thread_local dim3 g_block_dim;
thread_local dim3 g_grid_dim;
thread_local std::vector<unsigned char> g_dynamic_shared;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "reel emulator: %s (block %u,%u,%u)\n", what, g_block_idx.x, g_block_idx.y,
               g_block_idx.z);
  std::abort();
}

void fiber_entry() {
  Block* b = g_block;
  b->body(b->args);
  b->current->state = State::Done;
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

void yield_to_scheduler(State s) {
  Block* b = g_block;
  b->current->state = s;
  swapcontext(&b->current->ctx, &b->scheduler);
}

unsigned lanes_of_warp(const Block& b, unsigned w) {
  unsigned n = std::min(32u, b.threads - 32 * w);
  return n == 32 ? 0xffffffffu : ((1u << n) - 1);
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
unsigned lane_id() { return g_block->current->linear % 32; }
unsigned warp_lanes() { return lanes_of_warp(*g_block, g_block->current->linear / 32); }

void sync_threads() { yield_to_scheduler(State::AtBarrier); }

const unsigned char* warp_exchange(const void* mine, size_t bytes, unsigned mask) {
  Block* b = g_block;
  Fiber* f = b->current;
  const unsigned w = f->linear / 32, lane = f->linear % 32;
  Warp& warp = b->warps[w];
  const unsigned need = mask & lanes_of_warp(*b, w);
  if (!(need & (1u << lane))) die("a warp operation's mask leaves out the calling lane");
  if (bytes > kSlotBytes) die("warp exchange larger than a slot");
  if (warp.arrived != 0 && warp.need != need)
    die("concurrent warp operations with different masks in one warp are not emulated");
  const unsigned gen = warp.generation & 1;
  if (bytes != 0) std::memcpy(warp.slots[gen][lane], mine, bytes);
  warp.need = need;
  warp.arrived |= 1u << lane;
  if (warp.arrived == need) {
    warp.arrived = 0;
    ++warp.generation;
    for (unsigned l = 0; l < 32; ++l)
      if ((need >> l) & 1u) {
        Fiber& o = b->fibers[32 * w + l];
        if (o.state == State::AtWarp) o.state = State::Ready;
      }
  } else {
    yield_to_scheduler(State::AtWarp);
  }
  return &warp.slots[gen][0][0];
}

void cp_async(void* dst, const void* src, size_t bytes) { g_block->current->open.push_back({dst, src, bytes}); }

void cp_async_commit() {
  Fiber* f = g_block->current;
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}

void cp_async_wait(int pending) {
  Fiber* f = g_block->current;
  if (pending < 0) pending = 0;
  while (f->groups.size() > static_cast<size_t>(pending)) {
    for (const Copy& c : f->groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    f->groups.erase(f->groups.begin());
  }
}

void launch(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* args) {
  bool shuffle = false;
  std::mt19937_64 rng(shuffle_seed(&shuffle));
  g_grid_dim = grid;
  g_block_dim = block;
  const unsigned n = block.x * block.y * block.z;
  std::vector<unsigned> order(n);
  for (unsigned t = 0; t < n; ++t) order[t] = t;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.body = body;
        b.args = args;
        b.threads = n;
        b.fibers.resize(n);
        b.warps.resize((n + 31) / 32);
        g_block = &b;
        g_block_idx = uint3(bx, by, bz);
        g_dynamic_shared.assign(shared_bytes, 0);
        for (unsigned t = 0; t < n; ++t) {
          Fiber& f = b.fibers[t];
          f.idx = uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          f.linear = t;
          f.stack.resize(kStack);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &b.scheduler;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        // Rounds: every ready fiber runs until it blocks or ends. When none is ready, either
        // all live fibers are at the barrier (release them) or the block is finished.
        for (;;) {
          if (shuffle) std::shuffle(order.begin(), order.end(), rng);
          bool ran = false;
          for (unsigned t : order) {
            Fiber& f = b.fibers[t];
            if (f.state != State::Ready) continue;
            b.current = &f;
            ran = true;
            swapcontext(&b.scheduler, &f.ctx);
          }
          if (ran) continue;
          unsigned at_barrier = 0, at_warp = 0;
          for (const Fiber& f : b.fibers) {
            at_barrier += f.state == State::AtBarrier;
            at_warp += f.state == State::AtWarp;
          }
          if (at_warp != 0) {
            char msg[160];
            unsigned w = 0;
            for (; w < b.warps.size() && b.warps[w].arrived == 0; ++w) {
            }
            std::snprintf(msg, sizeof msg,
                          "deadlock: %u lane(s) of warp %u wait on a warp operation (mask %08x, arrived %08x) "
                          "that the other lanes never reach",
                          at_warp, w, w < b.warps.size() ? b.warps[w].need : 0u,
                          w < b.warps.size() ? b.warps[w].arrived : 0u);
            die(msg);
          }
          if (at_barrier == 0) break;
          for (Fiber& f : b.fibers)
            if (f.state == State::AtBarrier) f.state = State::Ready;
        }
        g_block = nullptr;
      }
}

}  // namespace reel_emu
