// The SIMT emulator: runs CUDA kernels written against kernels/common/reel_cuda.cuh on the
// host. A block's threads are fibers on one OS thread, scheduled cooperatively; the blocks
// of a grid run one after another (in a shuffled order under REEL_EMU_SHUFFLE).
//
// Fibers: a context switch of our own on x86-64 (callee-saved registers and the stack
// pointer, no signal mask: see emu.cpp), ucontext elsewhere and on request
// (REEL_EMU_SWITCH=ucontext, for the comparison in bench/emu.rs). Stacks are pooled per OS
// thread across blocks and launches, each with a guard page below it, never re-zeroed.
//
// Scheduling: a fiber runs until it blocks, then hands over directly to the next ready
// fiber. It blocks at a block barrier (__syncthreads, named barriers; released when every
// participating thread has arrived) or at a warp-collective operation (released when every
// lane the mask names has arrived). With REEL_EMU_SHUFFLE=<seed> the next fiber is drawn at
// random from the ready ones, so a missing barrier shows up as a wrong result.
//
// Fidelity (the emulator fails where hardware would): launch limits per axis; dynamic shared
// memory within the kernel's opt-in and the architecture's maximum; one shared-memory window
// per block (static and dynamic), poisoned (0xff bytes: NaN in every float format) before
// each block; alignment and address-space checks in ldmatrix and cp.async; cp.async
// destinations poisoned until the wait that covers their group. A fault, a deadlock or a
// broken rule ends the launch with an error naming the kernel, block and thread; a
// segmentation fault inside a kernel prints the same before the process dies.
#pragma once
#include <cstddef>
#include <cstdint>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;

namespace reel_emu {
// What the Rust launcher passes with every launch (mirrored #[repr(C)] in
// engine/kernels/mod.rs as EmuLaunch).
struct LaunchConfig {
  dim3 grid;
  dim3 block;
  // Dynamic shared memory of this launch, in bytes.
  uint32_t dynamic_shared;
  // The kernel's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: 0 = not opted in (static +
  // dynamic ≤ 48 KiB), else the opt-in (dynamic ≤ it, static + it ≤ the architecture's max).
  uint32_t shared_opt_in;
  // The architecture's maximum shared memory per block with an opt-in (227 KiB on sm_90).
  uint32_t max_shared_per_block;
};

// A kernel parameter as the C++ signature declares it (exported for the layout test).
struct ParamInfo {
  uint32_t size;
  uint32_t align;
  uint32_t offset;
  // 'p' pointer, 'i' signed integer, 'u' unsigned integer, 'f' floating point, 's' struct.
  uint32_t kind;
};

constexpr uint32_t kStaticSharedMax = 48 * 1024;  // static __shared__ limit of every arch
constexpr unsigned char kPoison = 0xff;

// The running fiber's coordinates.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
// Lane (0..31) of the running fiber: lanes are consecutive linear thread ids.
unsigned lane_id();
// Lanes of the running fiber's warp that exist (a partial last warp has fewer).
unsigned warp_lanes();
// Lanes of the running fiber's warp that exist and have not exited (__activemask: fibers do
// not model divergence).
unsigned active_lanes();

// Block barrier `id` (0 = __syncthreads) for `count` threads (0: every thread of the block
// that has not exited). `op`: 0 plain, 1 returns the number of arriving threads with pred
// != 0, 2 returns 1 if all had it, 3 returns 1 if any had it.
int barrier(unsigned id, unsigned count, int op, int pred);
inline void sync_threads() { barrier(0, 0, 0, 0); }

// Shared memory. The dynamic part starts the block's window (1024-byte aligned); a static
// variable is carved from the window the first time a thread of the block reaches its
// declaration (keyed by `site`, the address of a per-declaration static) and poisoned then.
void* dynamic_shared();
void* static_shared(const void* site, size_t bytes, size_t align);
// Whether [p, p + bytes) lies inside the running block's shared memory.
bool in_shared(const void* p, size_t bytes);

// The warp exchange every warp-collective operation is built on: deposits `bytes`
// (<= kSlotBytes) from `mine` as this lane's slot, waits until every lane in `mask` that
// exists has deposited, and returns the 32 slots of that exchange (slot i at
// i * kSlotBytes; slots of lanes outside the mask are poisoned). The slots stay valid until
// this lane's next exchange. The calling lane must be in `mask`, and every lane in it must
// pass the same mask (as CUDA requires); exchanges of disjoint masks may interleave.
constexpr size_t kSlotBytes = 32;
const unsigned char* warp_exchange(const void* mine, size_t bytes, unsigned mask);
// The same, also giving the exchange's serial: unique among the exchanges of this OS thread,
// so that what every lane derives from the same slots (the emulated mma's decoded operands)
// can be computed by the first lane that reads them and reused by the others.
const unsigned char* warp_exchange(const void* mine, size_t bytes, unsigned mask, uint64_t* serial);

// cp.async: `bytes` (4, 8 or 16) from global `src` to shared `dst`, of which the first
// `src_bytes` are read and the rest zero-filled. The destination is poisoned at once and the
// copy happens at the wait that covers its group (as late as hardware may do it), so a
// missing or too-short wait reads poison.
void cp_async(void* dst_shared, const void* src_global, size_t bytes, size_t src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// Ends the launch with an error naming the kernel, block and thread (never returns).
[[noreturn]] void fault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Runs body(params) as every thread of every block. Returns 0, or -1 with the message in
// reel_emu_last_error().
int launch(const char* kernel, const LaunchConfig& cfg, void (*body)(void*), void* params);
}  // namespace reel_emu

extern "C" {
// The message of the last failed launch on this OS thread.
const char* reel_emu_last_error();
// Per-thread overrides (tests and benches set them without touching the environment).
// Shuffle: mode -1 = REEL_EMU_SHUFFLE decides, 0 off, 1 on with `seed`.
void reel_emu_set_shuffle(int mode, uint64_t seed);
// Context switch: -1 = REEL_EMU_SWITCH decides, 0 reel's own, 1 ucontext.
void reel_emu_set_switch(int mode);
}
