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

// 16-bit floats from their bits, exactly (the host's __bfloat162float and __half2float, and
// the emulated wgmma's operand reads).
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float f;
  if (exp == 0) {
    // Zero or subnormal: man · 2^-24, exact (man < 2^10); a multiply, not ldexp, which
    // costs a library call per zero and zeros are common (padded channels).
    f = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  const uint32_t u = sign | (exp == 31 ? (0xffu << 23) | (man << 13) : ((exp + 112) << 23) | (man << 13));
  __builtin_memcpy(&f, &u, 4);
  return f;
}

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

// ---- Hopper (sm_90) primitives (kernels/common/reel_hopper.cuh wraps them) ----------
//
// The async proxy: TMA and wgmma read and write shared memory through it. The emulator keeps
// the async proxy's view of the block's shared memory beside the generic one: TMA loads
// write both, fence.proxy.async copies the generic view into it, and an async read of bytes
// whose two views differ (a generic write no fence made visible) is a fault.

// The warpgroup exchange: warp_exchange for the 128 threads of the calling thread's
// warpgroup (warps 4i..4i+3); every one of them must call it. Slots of kGroupSlotBytes at
// slot i * kGroupSlotBytes for thread i of the warpgroup; valid until this thread's next
// group exchange. `serial` as for warp_exchange.
constexpr size_t kGroupSlotBytes = 48;
const unsigned char* group_exchange(const void* mine, size_t bytes, uint64_t* serial);

// Shared-memory addresses as the hardware's shared window numbers them (what
// __cvta_generic_to_shared gives): offsets from the block's window.
uint32_t shared_offset(const void* p);
unsigned char* shared_at(uint32_t offset, size_t bytes);
// The async proxy's view of [offset, offset + bytes); faults naming `what` when a generic
// write to it was not fenced (the two views differ).
void async_read_check(uint32_t offset, size_t bytes, const char* what);
// fence.proxy.async.shared::cta by the calling thread.
void fence_proxy_async();

// mbarrier objects (8 bytes, 8-aligned, in shared memory). Waiting blocks the fiber until
// the phase completes; a TMA load that the barrier waits for completes then (as late as
// hardware may). A block in which every live thread waits reports the barrier.
void mbarrier_init(void* bar, unsigned count);
void mbarrier_inval(void* bar);
// Arrive (count arrivals), adding tx bytes to the transaction count first; returns the state
// token (the phase arrived on).
uint64_t mbarrier_arrive(void* bar, unsigned count, uint32_t tx);
void mbarrier_expect_tx(void* bar, uint32_t tx);
// Whether the phase of `parity` has completed; `block` waits for it.
bool mbarrier_wait_parity(void* bar, unsigned parity, bool block);

// bar.arrive: arrive at named barrier `id` for `count` threads without waiting.
void barrier_arrive(unsigned id, unsigned count);

// TMA. The tensor map is reel's own encoding in the 128 bytes of a CUtensorMap on emu (see
// TmaMap); rank 1..5, coordinates in elements (signed), out-of-bounds elements read as zero.
// Written by engine/kernels/hopper.rs (TmaDesc::encode); 128 bytes, as a CUtensorMap.
struct TmaMap {
  uint32_t magic;  // kTmaMagic
  uint32_t rank;
  uint32_t elem_bytes;  // 2 or 4
  uint32_t swizzle;     // 0 none, 32, 64, 128 (bytes)
  uint64_t global;      // base address
  uint64_t dims[5];     // elements per dimension, innermost first
  uint64_t strides[4];  // bytes between indices of dimensions 1..4
  uint32_t box[5];      // elements per box dimension
  uint32_t nan_fill;    // 1: out-of-bounds elements read as NaN (NAN_REQUEST_ZERO_FMA)
  uint32_t pad[2];
};
static_assert(sizeof(TmaMap) == 128, "TmaMap is a CUtensorMap's 128 bytes");
constexpr uint32_t kTmaMagic = 0x6d616d54;  // "Tmam"
// Load the box at `coords` into shared `dst`, completing `bytes` on mbarrier `bar` (issued by
// one thread; the copy happens when a waiter needs it).
void tma_load(void* dst, const void* map, const int32_t* coords, void* bar);
// Store shared `src` to the box at `coords` (bulk group: committed, waited for reading).
void tma_store(const void* map, const int32_t* coords, const void* src);
void tma_store_commit();
void tma_store_wait(int pending_groups);

// wgmma.mma_async m64nNk16, f32 accumulators, bf16 or f16 inputs: one warpgroup operation,
// every thread of the warpgroup calling with its own registers (the descriptors, N, the
// flags and scale-d must agree across the warpgroup). Asynchronous as on hardware: the
// thread's accumulators are poisoned at issue and written at the wait that covers the
// operation, reading shared memory then; operations on the same accumulators chain in issue
// order.
struct WgmmaOp {
  uint32_t n;        // 8..256, a multiple of 8
  uint32_t f16;      // 0 bf16, 1 f16
  uint32_t a_regs;   // 1: A from registers (a[]), else from desc_a
  uint32_t trans_a;  // 1: A is M-major (descriptor A only)
  uint32_t trans_b;  // 1: B is N-major
  int32_t scale_a;   // 1 or -1
  int32_t scale_b;   // 1 or -1
  uint32_t scale_d;  // 0: D = A·B, 1: D = A·B + D
  uint64_t desc_a, desc_b;
  uint32_t a[4];  // this thread's A fragment (a_regs)
  float* d;       // this thread's n / 2 accumulators
};
void wgmma(const WgmmaOp& op);
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int pending_groups);

// setmaxnreg: checks the count (24..256, a multiple of 8) and that the warpgroup agrees.
void setmaxnreg(unsigned count, bool increase);

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
