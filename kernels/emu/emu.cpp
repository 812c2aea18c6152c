// The SIMT emulator's runtime (see emu.h).
#include "emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <unordered_map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

// ---------------------------------------------------------------------------------------
// The context switch. On x86-64 (System V) a switch saves the callee-saved registers on
// the running stack, stores the stack pointer, loads the other one and pops its registers:
// about 20 instructions and no system call, where swapcontext also saves and restores the
// signal mask (a sigprocmask system call per switch). The FPU control word and MXCSR are
// not switched: no kernel changes the rounding mode.
#if defined(__x86_64__) && !defined(REEL_EMU_UCONTEXT_ONLY)
#define REEL_EMU_OWN_SWITCH 1
extern "C" void reel_emu_ctx_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl reel_emu_ctx_switch
.hidden reel_emu_ctx_switch
.type reel_emu_ctx_switch,@function
.p2align 4
reel_emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size reel_emu_ctx_switch,.-reel_emu_ctx_switch
)");
#else
#define REEL_EMU_OWN_SWITCH 0
#endif

namespace reel_emu {
namespace {

// Kernels keep their locals small; 128 KiB of address space per fiber leaves room for the
// emulated wrappers (pages are touched only as used). A PROT_NONE guard page lies below.
constexpr size_t kStack = 128 * 1024;
constexpr size_t kGuard = 4096;
constexpr unsigned kBarriers = 16;

enum class State { Ready, AtBarrier, AtWarp, AtGroup, AtMbarrier, Done };

struct Copy {
  void* dst;
  const void* src;
  size_t bytes, src_bytes;
};

// One warp-collective exchange: the lanes of `need` deposit their slots; complete when all
// have. The result stays readable until each lane's next exchange (`readers` counts the
// lanes still holding it), so a lane that runs ahead never overwrites what a slower lane has
// yet to read.
struct Exchange {
  unsigned need = 0, arrived = 0, readers = 0;
  uint64_t serial = 0;  // unique per exchange on this OS thread (see warp_exchange)
  unsigned char slots[32][kSlotBytes];
};

struct Warp {
  std::vector<std::unique_ptr<Exchange>> all;
  std::vector<Exchange*> free, open;
  unsigned exited = 0;  // lanes that have returned
};

struct Barrier {
  unsigned count = 0;    // the count the arriving threads passed (0: all live threads)
  unsigned arrived = 0;  // threads waiting
  unsigned preds = 0;    // of which with a non-zero predicate
  int op = 0;            // the barrier operation of this round (sync, count, and, or)
  std::vector<unsigned> waiters;
};

struct Stack {
  char* map = nullptr;  // guard page, then the stack
  size_t size = 0;
  Stack() = default;
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  Stack(Stack&& o) noexcept : map(o.map), size(o.size) { o.map = nullptr; }
  Stack& operator=(Stack&& o) noexcept {
    std::swap(map, o.map);
    std::swap(size, o.size);
    return *this;
  }
  ~Stack() {
    if (map) munmap(map, size);
  }
  char* top() const { return map + size; }
  char* lo() const { return map + kGuard; }
};

// A warpgroup exchange (128 threads), as Exchange is for a warp.
struct GroupExchange {
  unsigned arrived = 0, readers = 0;  // counts
  uint32_t bits[4] = {};              // which threads of the warpgroup have arrived
  uint64_t serial = 0;
  unsigned char slots[128][kGroupSlotBytes];
};

struct Group {
  std::vector<std::unique_ptr<GroupExchange>> all;
  std::vector<GroupExchange*> free;
  GroupExchange* open = nullptr;
};

bool group_arrived(const GroupExchange* e, unsigned i) { return (e->bits[i / 32] >> (i % 32)) & 1u; }

// An mbarrier (kept beside shared memory, keyed by its shared offset; its 8 bytes hold a tag
// so that an ordinary store over a live barrier is caught).
struct Mbar {
  unsigned expected = 0, pending = 0;
  int64_t tx = 0;
  uint64_t phase = 0;  // completed phases
  std::vector<unsigned> waiters;
};

struct TmaLoad {
  uint32_t dst;  // shared offset
  TmaMap map;
  int32_t coords[5];
  uint32_t bar;  // shared offset of the mbarrier
  uint64_t bytes;
};

struct TmaStore {
  TmaMap map;
  int32_t coords[5];
  uint32_t src;  // shared offset
  uint64_t bytes;
};

// One warpgroup wgmma: the operands every thread passed (from the exchange), decoded from
// shared memory at the first completion.
struct WgmmaGroupOp {
  WgmmaOp op;            // the uniform part (a, d of thread 0)
  uint32_t a[128][4];    // every thread's A fragment (a_regs)
  bool decoded = false;
  std::vector<float> A;  // [64][16]
  std::vector<float> B;  // [n][16]: B[col][k]
  unsigned issued = 0;   // threads that have issued their part
};

struct WgmmaPending {
  std::shared_ptr<WgmmaGroupOp> op;
  float* d;
  std::vector<float> c;  // the accumulators' values at issue (first of a chain), else empty
  bool chained;          // the input is the previous operation's output on the same d
  unsigned thread;       // index in the warpgroup
};

struct Fiber {
  void* sp = nullptr;  // the saved stack pointer (own switch)
  ucontext_t uc;       // the saved context (ucontext switch)
  Stack stack;
  uint3 idx;
  unsigned linear = 0;
  State state = State::Ready;
  unsigned barrier = 0;    // which barrier, when AtBarrier
  int barrier_result = 0;  // what __syncthreads_count/and/or return
  Exchange* held = nullptr;
  // cp.async: committed groups (oldest first) and the group being built.
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
  // Hopper: the warpgroup exchange held, the mbarrier waited on, TMA store groups, wgmma
  // operations in flight (committed groups, then the open one).
  GroupExchange* held_group = nullptr;
  uint32_t mbar = 0;
  unsigned mbar_parity = 0;
  std::vector<std::vector<TmaStore>> tma_groups;
  std::vector<TmaStore> tma_open;
  std::vector<std::vector<WgmmaPending>> wg_groups;
  std::vector<WgmmaPending> wg_open;
  bool wg_fenced = false;
};

// Everything about the running launch, per OS thread (blocks of one launch run on one OS
// thread, one at a time). Fibers, stacks, warps and the shared window are kept across
// launches.
struct Emu {
  // The launch.
  const char* kernel = "";
  LaunchConfig cfg{};
  void (*body)(void*) = nullptr;
  void* params = nullptr;
  unsigned threads = 0;
  bool shuffle = false;
  std::mt19937_64 rng;
  bool own_switch = REEL_EMU_OWN_SWITCH;
  // The block.
  uint3 block_idx;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier bars[kBarriers];
  std::vector<unsigned> ready;  // ring buffer of fiber indices
  size_t ready_head = 0, ready_count = 0;
  unsigned live = 0;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  ucontext_t sched_uc;
  bool running = false;  // inside a block (the fault handler's test)
  bool faulted = false;
  std::string error;
  // Shared memory: [0, dynamic) dynamic, then static variables from static_base.
  unsigned char* window = nullptr;
  size_t window_cap = 0;
  size_t static_base = 0, static_used = 0;
  std::vector<std::pair<const void*, size_t>> statics;  // (site, offset)
  uint64_t exchanges = 0;  // exchanges opened on this OS thread, for their serials
  // Hopper: the async proxy's view of the window, warpgroups, mbarriers, TMA loads in flight,
  // and the wgmma operations being issued (by serial of their exchange).
  unsigned char* async_view = nullptr;
  std::vector<Group> groups;
  std::unordered_map<uint32_t, Mbar> mbars;
  std::vector<TmaLoad> tma_loads;
  std::unordered_map<uint64_t, std::shared_ptr<WgmmaGroupOp>> wg_issuing;

  ~Emu() {
    std::free(window);
    std::free(async_view);
  }
};

// The running launch's state. Reached through a plain pointer: a thread_local object with a
// constructor is reached through an init check on every access (a quarter of a barrier's
// cost, measured); `owner` frees it when the OS thread ends.
thread_local Emu* gp = nullptr;
thread_local std::unique_ptr<Emu> owner;
#define g (*gp)

// Overrides set through the extern "C" functions: -1 = the environment decides.
thread_local int g_shuffle_override = -1;
thread_local uint64_t g_seed = 0;
thread_local int g_switch_override = -1;

// ---------------------------------------------------------------------------------------
// Errors.

// "kernel K, block (x,y,z), thread (x,y,z)" into buf (no allocation: the fault handler uses it).
void where(char* buf, size_t n) {
  if (g.cur != nullptr)
    std::snprintf(buf, n, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", g.kernel, g.block_idx.x, g.block_idx.y,
                  g.block_idx.z, g.cur->idx.x, g.cur->idx.y, g.cur->idx.z);
  else
    std::snprintf(buf, n, "kernel %s, block (%u,%u,%u)", g.kernel, g.block_idx.x, g.block_idx.y, g.block_idx.z);
}

std::string where() {
  char buf[256];
  where(buf, sizeof buf);
  return buf;
}

std::string vformat(const char* fmt, va_list ap) {
  char buf[512];
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

int launch_error(const std::string& what) {
  g.error = "reel emulator: kernel " + std::string(g.kernel) + ": " + what;
  return -1;
}

// ---------------------------------------------------------------------------------------
// Fibers.

// A fiber stack (kept by its fiber for the life of the OS thread: the pool is g.fibers).
Stack new_stack() {
  Stack s;
  s.size = kGuard + kStack;
  void* m = mmap(nullptr, s.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    std::fprintf(stderr, "reel emulator: cannot map a %zu-byte fiber stack\n", s.size);
    std::abort();
  }
  s.map = static_cast<char*>(m);
  mprotect(s.map, kGuard, PROT_NONE);
  return s;
}

// The ready queue: a ring of fiber indices (each fiber is in it at most once).
void push_ready(unsigned t) {
  size_t i = g.ready_head + g.ready_count;
  if (i >= g.ready.size()) i -= g.ready.size();
  g.ready[i] = t;
  ++g.ready_count;
}

Fiber* pop_ready() {
  if (g.ready_count == 0) return nullptr;
  if (g.shuffle && g.ready_count > 1) {
    size_t k = g.ready_head + g.rng() % g.ready_count;
    if (k >= g.ready.size()) k -= g.ready.size();
    std::swap(g.ready[g.ready_head], g.ready[k]);
  }
  const unsigned t = g.ready[g.ready_head];
  if (++g.ready_head == g.ready.size()) g.ready_head = 0;
  --g.ready_count;
  return &g.fibers[t];
}

void make_ready(Fiber& f) {
  f.state = State::Ready;
  push_ready(f.linear);
}

// Leaves the running fiber (already marked blocked or done) for the next ready one, or for
// the scheduler when none is ready. Returns when someone switches back to it.
void leave(Fiber* f) {
  Fiber* next = g.faulted ? nullptr : pop_ready();
  if (next != nullptr) g.cur = next;
#if REEL_EMU_OWN_SWITCH
  if (g.own_switch) {
    reel_emu_ctx_switch(&f->sp, next ? next->sp : g.sched_sp);
    return;
  }
#endif
  swapcontext(&f->uc, next ? &next->uc : &g.sched_uc);
}

void exit_fiber();
// Performs fiber f's committed TMA store groups but the newest `pending` (at the end of the
// block: all, with a failure recorded instead of faulting).
void complete_tma_stores(Fiber& f, int pending, bool at_end = false);

[[noreturn]] void fiber_main() {
  g.body(g.params);
  exit_fiber();
  std::abort();  // a finished fiber is never resumed
}

#if REEL_EMU_OWN_SWITCH
// A fresh stack laid out as reel_emu_ctx_switch leaves a suspended one: six zeroed
// callee-saved registers, then fiber_main as the return address, placed so that fiber_main
// starts with the stack aligned as after a call (rsp ≡ 8 mod 16).
void* initial_sp(const Stack& s) {
  uintptr_t top = reinterpret_cast<uintptr_t>(s.top()) & ~uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top - 16);
  sp[1] = nullptr;  // fiber_main's own return address: never used
  sp[0] = reinterpret_cast<void*>(&fiber_main);
  sp -= 6;
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  return sp;
}
#endif

unsigned lanes_of_warp(unsigned w) {
  const unsigned n = std::min(32u, g.threads - 32 * w);
  return n == 32 ? 0xffffffffu : ((1u << n) - 1);
}

void release_exchange(unsigned w, Exchange*& e) {
  if (e == nullptr) return;
  if (--e->readers == 0) g.warps[w].free.push_back(e);
  e = nullptr;
}

void release_group(Group& grp, GroupExchange*& e) {
  if (e == nullptr) return;
  if (--e->readers == 0) grp.free.push_back(e);
  e = nullptr;
}

const char* state_name(const Fiber& f) {
  switch (f.state) {
    case State::Ready: return "is ready";
    case State::AtBarrier: return "waits at a block barrier";
    case State::AtWarp: return "waits at another warp operation";
    case State::AtGroup: return "waits at a warpgroup operation";
    case State::AtMbarrier: return "waits on an mbarrier";
    default: return "has exited";
  }
}

// The message for a block in which no fiber can run although some have not finished.
std::string deadlock_report() {
  for (unsigned w = 0; w < g.warps.size(); ++w)
    for (Exchange* e : g.warps[w].open) {
      const unsigned missing = e->need & ~e->arrived;
      const unsigned first = static_cast<unsigned>(__builtin_ctz(e->arrived));
      const unsigned gone = static_cast<unsigned>(__builtin_ctz(missing));
      const Fiber& waiter = g.fibers[32 * w + first];
      const Fiber& absent = g.fibers[32 * w + gone];
      return format(
          "deadlock: thread (%u,%u,%u) (warp %u, lane %u) waits at a warp operation with mask %08x, arrived "
          "%08x; lane %u (thread (%u,%u,%u)) %s",
          waiter.idx.x, waiter.idx.y, waiter.idx.z, w, first, e->need, e->arrived, gone, absent.idx.x, absent.idx.y,
          absent.idx.z, state_name(absent));
    }
  for (unsigned i = 0; i < g.groups.size(); ++i)
    if (GroupExchange* e = g.groups[i].open) {
      unsigned first = 0, gone = 0;
      while (first < 128 && !group_arrived(e, first)) ++first;
      while (gone < 128 && group_arrived(e, gone)) ++gone;
      const Fiber& waiter = g.fibers[128 * i + first];
      const Fiber& absent = g.fibers[128 * i + gone];
      return format(
          "deadlock: thread (%u,%u,%u) waits at a warpgroup operation (wgmma, setmaxnreg) of warpgroup %u with %u of "
          "128 threads arrived; thread (%u,%u,%u) %s",
          waiter.idx.x, waiter.idx.y, waiter.idx.z, i, e->arrived, absent.idx.x, absent.idx.y, absent.idx.z,
          state_name(absent));
    }
  for (const Fiber& f : g.fibers) {
    if (&f - g.fibers.data() >= static_cast<std::ptrdiff_t>(g.threads)) break;
    if (f.state != State::AtMbarrier) continue;
    const auto it = g.mbars.find(f.mbar);
    const Mbar& m = it->second;
    return format(
        "deadlock: thread (%u,%u,%u) waits on the mbarrier at shared offset 0x%x for the phase of parity %u; the "
        "barrier has completed %llu phases, waits for %u of %u arrivals and %lld transaction bytes, and no thread "
        "can arrive",
        f.idx.x, f.idx.y, f.idx.z, f.mbar, f.mbar_parity, (unsigned long long)m.phase, m.pending, m.expected,
        (long long)m.tx);
  }
  for (unsigned b = 0; b < kBarriers; ++b)
    if (g.bars[b].arrived != 0) {
      const Fiber& f = g.fibers[g.bars[b].waiters.front()];
      return format("deadlock: thread (%u,%u,%u) waits at barrier %u (%s) with %u of %u threads arrived", f.idx.x,
                    f.idx.y, f.idx.z, b, g.bars[b].count ? "named, with a thread count" : "__syncthreads",
                    g.bars[b].arrived, g.bars[b].count ? g.bars[b].count : g.live);
    }
  return "deadlock: no thread can run";
}

void finish_barrier(unsigned id, int result_op) {
  Barrier& b = g.bars[id];
  int result = 0;
  if (result_op == 1) result = static_cast<int>(b.preds);
  if (result_op == 2) result = b.preds == b.arrived;
  if (result_op == 3) result = b.preds != 0;
  for (unsigned t : b.waiters) {
    Fiber& o = g.fibers[t];
    o.barrier_result = result;
    if (&o != g.cur) make_ready(o);
  }
  b.waiters.clear();
  b.arrived = b.preds = b.count = 0;
}

void exit_fiber() {
  Fiber* f = g.cur;
  f->state = State::Done;
  --g.live;
  const unsigned w = f->linear / 32, lane = f->linear % 32;
  release_exchange(w, f->held);
  g.warps[w].exited |= 1u << lane;
  for (Exchange* e : g.warps[w].open)
    if ((e->need >> lane) & 1u)
      fault("exited while lanes %08x of its warp wait for it at a warp operation with mask %08x", e->arrived,
            e->need);
  if (f->linear / 128 < g.groups.size()) {
    Group& grp = g.groups[f->linear / 128];
    release_group(grp, f->held_group);
    if (grp.open != nullptr && !group_arrived(grp.open, f->linear % 128))
      fault("exited while %u threads of its warpgroup wait for it at a warpgroup operation (wgmma, setmaxnreg)",
            grp.open->arrived);
  }
  if (!f->wg_open.empty() || !f->wg_groups.empty())
    fault("exited with wgmma operations in flight (no wgmma.wait_group covers them)");
  // __syncthreads counts the threads that have not exited: this exit may complete it.
  if (g.bars[0].arrived != 0 && g.bars[0].count == 0 && g.bars[0].arrived == g.live) finish_barrier(0, g.bars[0].op);
  leave(f);
}

// Runs block `bidx` to completion. Returns false on a fault or deadlock (g.error set).
bool run_block(uint3 bidx) {
  g.block_idx = bidx;
  g.cur = nullptr;
  g.live = g.threads;
  g.ready_head = 0;
  g.ready_count = 0;
  for (unsigned t = 0; t < g.threads; ++t) {
    Fiber& f = g.fibers[t];
    f.state = State::Ready;
    f.held = nullptr;
    f.groups.clear();
    f.open.clear();
    f.held_group = nullptr;
    f.tma_groups.clear();
    f.tma_open.clear();
    f.wg_groups.clear();
    f.wg_open.clear();
    f.wg_fenced = false;
#if REEL_EMU_OWN_SWITCH
    if (g.own_switch) f.sp = initial_sp(f.stack);
#endif
    if (!g.own_switch) {
      getcontext(&f.uc);
      f.uc.uc_stack.ss_sp = f.stack.lo();
      f.uc.uc_stack.ss_size = kStack;
      f.uc.uc_link = nullptr;
      makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_main), 0);
    }
    push_ready(t);
  }
  for (Warp& w : g.warps) {
    w.exited = 0;
    w.open.clear();
    w.free.clear();
    for (auto& e : w.all) w.free.push_back(e.get());
  }
  for (Barrier& b : g.bars) {
    b.arrived = b.preds = b.count = 0;
    b.waiters.clear();
  }
  for (Group& grp : g.groups) {
    grp.open = nullptr;
    grp.free.clear();
    for (auto& e : grp.all) grp.free.push_back(e.get());
  }
  g.mbars.clear();
  g.tma_loads.clear();
  g.wg_issuing.clear();
  // Shared memory: the dynamic part poisoned (in both proxies' views), the static variables
  // carved anew.
  std::memset(g.window, kPoison, g.cfg.dynamic_shared);
  std::memset(g.async_view, kPoison, g.cfg.dynamic_shared);
  g.statics.clear();
  g.static_used = 0;
  g.running = true;
  g.faulted = false;
  while (Fiber* next = g.faulted ? nullptr : pop_ready()) {
    g.cur = next;
#if REEL_EMU_OWN_SWITCH
    if (g.own_switch)
      reel_emu_ctx_switch(&g.sched_sp, next->sp);
    else
#endif
      swapcontext(&g.sched_uc, &next->uc);
  }
  g.running = false;
  if (g.faulted) return false;
  if (g.live == 0) {
    // TMA stores no thread waited for land before the block ends.
    g.running = true;
    for (unsigned t = 0; t < g.threads && !g.faulted; ++t) {
      Fiber& f = g.fibers[t];
      g.cur = &f;
      if (!f.tma_open.empty()) f.tma_groups.push_back(std::move(f.tma_open));
      complete_tma_stores(f, 0, true);
    }
    g.running = false;
    if (g.faulted) return false;
  }
  if (g.live != 0) {
    g.cur = nullptr;
    g.error = "reel emulator: " + where() + ": " + deadlock_report();
    return false;
  }
  g.cur = nullptr;
  return true;
}

bool shuffle_setting(uint64_t* seed) {
  if (g_shuffle_override >= 0) {
    *seed = g_seed;
    return g_shuffle_override == 1;
  }
  const char* s = std::getenv("REEL_EMU_SHUFFLE");
  if (s == nullptr || *s == '\0') return false;
  *seed = std::strtoull(s, nullptr, 10);
  return true;
}

bool own_switch_setting() {
  if (!REEL_EMU_OWN_SWITCH) return false;
  if (g_switch_override >= 0) return g_switch_override == 0;
  const char* s = std::getenv("REEL_EMU_SWITCH");
  return s == nullptr || std::strcmp(s, "ucontext") != 0;
}

// ---------------------------------------------------------------------------------------
// Segmentation faults inside a kernel: name the kernel, block and thread (and a fiber's
// stack overflow), then let the previous handler (Rust's, or the default) end the process.

struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
  if (gp != nullptr && g.running && g.cur != nullptr) {
    char at[256], msg[512];
    where(at, sizeof at);
    const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
    const uintptr_t lo = reinterpret_cast<uintptr_t>(g.cur->stack.map);
    const bool overflow = a >= lo && a < lo + kGuard;
    const int n = std::snprintf(msg, sizeof msg, "reel emulator: %s: %s at address %p%s\n", at,
                                sig == SIGSEGV ? "segmentation fault" : "bus error", info->si_addr,
                                overflow ? " (the fiber's 128 KiB stack overflowed)" : "");
    if (n > 0) {
      ssize_t ignored = write(2, msg, static_cast<size_t>(std::min(n, static_cast<int>(sizeof msg) - 1)));
      (void)ignored;
    }
    g.running = false;
  }
  const struct sigaction& old = sig == SIGSEGV ? g_old_segv : g_old_bus;
  if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction != nullptr) {
    old.sa_sigaction(sig, info, uctx);
  } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN && old.sa_handler != nullptr) {
    old.sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);  // returning re-executes the access, which now ends the process
  }
}

void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
  // The handler needs a stack of its own to report an overflowed fiber stack.
  thread_local bool alt = false;
  if (!alt) {
    stack_t cur;
    if (sigaltstack(nullptr, &cur) == 0 && (cur.ss_flags & SS_DISABLE)) {
      // Never freed: it must outlive every signal this thread may take.
      stack_t st;
      st.ss_size = 64 * 1024;
      st.ss_sp = std::malloc(st.ss_size);
      st.ss_flags = 0;
      sigaltstack(&st, nullptr);
    }
    alt = true;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The API of emu.h.

uint3 thread_idx() { return g.cur->idx; }
uint3 block_idx() { return g.block_idx; }
dim3 block_dim() { return g.cfg.block; }
dim3 grid_dim() { return g.cfg.grid; }
unsigned lane_id() { return g.cur->linear % 32; }
unsigned warp_lanes() { return lanes_of_warp(g.cur->linear / 32); }
unsigned active_lanes() {
  const unsigned w = g.cur->linear / 32;
  unsigned m = 0;
  for (unsigned l = 0; l < 32 && 32 * w + l < g.threads; ++l)
    if (g.fibers[32 * w + l].state != State::Done) m |= 1u << l;
  return m;
}

void fault(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  const std::string what = vformat(fmt, ap);
  va_end(ap);
  g.error = "reel emulator: " + where() + ": " + what;
  g.faulted = true;
  Fiber* f = g.cur;
  if (f == nullptr || !g.running) {
    std::fprintf(stderr, "%s\n", g.error.c_str());
    std::abort();
  }
  f->state = State::Done;
  leave(f);  // to the scheduler (faulted: no other fiber runs); never resumed
  std::abort();
}

int barrier(unsigned id, unsigned count, int op, int pred) {
  Fiber* f = g.cur;
  if (id >= kBarriers) fault("barrier id %u: there are 16 (0..15)", id);
  if (count % 32 != 0) fault("barrier %u: the thread count %u is not a multiple of the warp size", id, count);
  if (count > g.threads) fault("barrier %u: the thread count %u exceeds the block's %u threads", id, count, g.threads);
  Barrier& b = g.bars[id];
  if (b.arrived == 0) {
    b.count = count;
    b.op = op;
  } else if (b.count != count) {
    fault("barrier %u: threads arrive with thread counts %u and %u", id, b.count, count);
  } else if (b.op != op) {
    fault("barrier %u: threads arrive at different barrier operations (sync, count, and, or)", id);
  }
  ++b.arrived;
  b.preds += pred != 0;
  b.waiters.push_back(f->linear);
  const unsigned need = count ? count : g.live;
  if (b.arrived == need) {
    finish_barrier(id, op);
    return f->barrier_result;
  }
  f->state = State::AtBarrier;
  f->barrier = id;
  leave(f);
  return f->barrier_result;
}

void* dynamic_shared() { return g.window; }

void* static_shared(const void* site, size_t bytes, size_t align) {
  for (const auto& s : g.statics)
    if (s.first == site) return g.window + s.second;
  size_t off = (g.static_base + g.static_used + align - 1) & ~(align - 1);
  const size_t used = off + bytes - g.static_base;
  if (used > kStaticSharedMax)
    fault("static shared memory of %zu bytes exceeds the 48 KiB every architecture allows", used);
  const size_t limit = g.cfg.shared_opt_in ? g.cfg.max_shared_per_block : kStaticSharedMax;
  const size_t dyn = g.cfg.shared_opt_in ? g.cfg.shared_opt_in : g.cfg.dynamic_shared;
  if (used + dyn > limit)
    fault("%zu bytes of static shared memory and %zu of dynamic (%s) exceed the %zu bytes a block may have", used,
          dyn, g.cfg.shared_opt_in ? "the opt-in" : "this launch", limit);
  std::memset(g.window + off, kPoison, bytes);
  std::memset(g.async_view + off, kPoison, bytes);
  g.static_used = used;
  g.statics.emplace_back(site, off);
  return g.window + off;
}

bool in_shared(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* lo = g.window;
  const unsigned char* dyn_end = g.window + g.cfg.dynamic_shared;
  const unsigned char* st_lo = g.window + g.static_base;
  const unsigned char* st_end = st_lo + g.static_used;
  return (c >= lo && c + bytes <= dyn_end) || (c >= st_lo && c + bytes <= st_end);
}

const unsigned char* warp_exchange(const void* mine, size_t bytes, unsigned mask) {
  uint64_t serial;
  return warp_exchange(mine, bytes, mask, &serial);
}

const unsigned char* warp_exchange(const void* mine, size_t bytes, unsigned mask, uint64_t* serial) {
  Fiber* f = g.cur;
  const unsigned w = f->linear / 32, lane = f->linear % 32;
  Warp& warp = g.warps[w];
  const unsigned need = mask & lanes_of_warp(w);
  if (!((need >> lane) & 1u)) fault("a warp operation's mask %08x leaves out the calling lane %u", mask, lane);
  if (bytes > kSlotBytes) fault("warp exchange of %zu bytes, larger than a slot", bytes);
  if (need & warp.exited)
    fault("a warp operation's mask %08x names lane %d, which has exited", mask, __builtin_ctz(need & warp.exited));
  release_exchange(w, f->held);
  Exchange* e = nullptr;
  for (Exchange* x : warp.open)
    if (x->need & need) {
      if (x->need != need)
        fault("warp operations with overlapping but different masks (%08x and %08x) in one warp", x->need, need);
      e = x;
      break;
    }
  if (e == nullptr) {
    if (warp.free.empty()) {
      warp.all.push_back(std::make_unique<Exchange>());
      warp.free.push_back(warp.all.back().get());
    }
    e = warp.free.back();
    warp.free.pop_back();
    e->need = need;
    e->arrived = 0;
    e->readers = 0;
    e->serial = ++g.exchanges;
    warp.open.push_back(e);
  }
  if (bytes != 0) std::memcpy(e->slots[lane], mine, bytes);
  e->arrived |= 1u << lane;
  if (e->arrived == need) {
    warp.open.erase(std::find(warp.open.begin(), warp.open.end(), e));
    e->readers = static_cast<unsigned>(__builtin_popcount(need));
    if (need != 0xffffffffu)
      for (unsigned l = 0; l < 32; ++l)
        if (!((need >> l) & 1u)) std::memset(e->slots[l], kPoison, kSlotBytes);
    for (unsigned l = 0; l < 32; ++l)
      if (l != lane && ((need >> l) & 1u)) make_ready(g.fibers[32 * w + l]);
  } else {
    f->state = State::AtWarp;
    leave(f);
  }
  f->held = e;
  *serial = e->serial;
  return &e->slots[0][0];
}

void cp_async(void* dst, const void* src, size_t bytes, size_t src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) fault("cp.async of %zu bytes: 4, 8 or 16", bytes);
  if (src_bytes > bytes) fault("cp.async src-size %zu exceeds its cp-size %zu", src_bytes, bytes);
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0)
    fault("cp.async destination %p is not %zu-byte aligned", dst, bytes);
  if (reinterpret_cast<uintptr_t>(src) % bytes != 0) fault("cp.async source %p is not %zu-byte aligned", src, bytes);
  if (!in_shared(dst, bytes)) fault("cp.async destination %p is not in the block's shared memory", dst);
  if (src_bytes != 0 && in_shared(src, 1)) fault("cp.async source %p is in shared memory, not global", src);
  std::memset(dst, kPoison, bytes);
  g.cur->open.push_back({dst, src, bytes, src_bytes});
}

void cp_async_commit() {
  Fiber* f = g.cur;
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}

void cp_async_wait(int pending) {
  Fiber* f = g.cur;
  if (pending < 0) pending = 0;
  size_t done = 0;
  while (f->groups.size() - done > static_cast<size_t>(pending)) {
    for (const Copy& c : f->groups[done]) {
      std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
    ++done;
  }
  f->groups.erase(f->groups.begin(), f->groups.begin() + static_cast<std::ptrdiff_t>(done));
}


// ---------------------------------------------------------------------------------------
// Hopper primitives.

namespace {

// The shared offset of p, which must lie in the block's shared memory with `bytes` after it.
uint32_t checked_offset(const void* p, size_t bytes, const char* what) {
  if (!in_shared(p, bytes)) fault("%s: address %p (%zu bytes) is not in the block's shared memory", what, p, bytes);
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - g.window);
}

// Writes through the async proxy: both views.
void async_write(uint32_t off, const void* src, size_t bytes) {
  std::memcpy(g.window + off, src, bytes);
  std::memcpy(g.async_view + off, src, bytes);
}

constexpr uint64_t kMbarTag = 0x6d62617272696572ull;  // "mbarrier"

Mbar& mbar_at(void* bar, const char* what, uint32_t* off_out = nullptr) {
  const uint32_t off = checked_offset(bar, 8, what);
  if (off % 8 != 0) fault("%s: the mbarrier at shared offset 0x%x is not 8-byte aligned", what, off);
  const auto it = g.mbars.find(off);
  if (it == g.mbars.end()) fault("%s: no mbarrier was initialised at shared offset 0x%x", what, off);
  uint64_t tag;
  std::memcpy(&tag, g.window + off, 8);
  if (tag != (kMbarTag ^ off))
    fault("%s: the mbarrier at shared offset 0x%x was overwritten by an ordinary store while in use", what, off);
  if (off_out) *off_out = off;
  return it->second;
}

// Counts down the barrier's arrivals or transaction bytes; completes the phase when both are
// zero (waking its waiters and restarting the count).
void mbar_check_phase(Mbar& m) {
  if (m.pending != 0 || m.tx != 0) return;
  ++m.phase;
  m.pending = m.expected;
  for (unsigned t : m.waiters) {
    Fiber& o = g.fibers[t];
    if (o.state == State::AtMbarrier) make_ready(o);
  }
  m.waiters.clear();
}

// The smem byte offset of box element `linear` (row-major over the box, dimension 0
// innermost) before the swizzle, and the swizzle of an absolute shared address.
uint32_t swizzle(uint32_t addr, uint32_t span) {
  // 128B: address bits [4,7) ^= bits [7,10); 64B: [4,6) ^= [7,9); 32B: bit 4 ^= bit 7.
  const uint32_t bits = span == 128 ? 3 : span == 64 ? 2 : span == 32 ? 1 : 0;
  const uint32_t mask = (1u << bits) - 1;
  return addr ^ (((addr >> 7) & mask) << 4);
}

uint64_t box_elems(const TmaMap& m) {
  uint64_t n = 1;
  for (uint32_t i = 0; i < m.rank; ++i) n *= m.box[i];
  return n;
}

void check_map(const TmaMap& m, const char* what) {
  if (m.magic != kTmaMagic) fault("%s: the tensor map was not encoded by reel (bad magic)", what);
  if (m.rank < 1 || m.rank > 5) fault("%s: tensor map rank %u (1..5)", what, m.rank);
}

// Element (box-relative index `e`, per dimension) → its global address, or null when out of
// bounds.
const unsigned char* tma_global(const TmaMap& m, const int32_t* coords, const uint32_t* e) {
  uint64_t addr = m.global;
  for (uint32_t i = 0; i < m.rank; ++i) {
    const int64_t c = static_cast<int64_t>(coords[i]) + e[i];
    if (c < 0 || static_cast<uint64_t>(c) >= m.dims[i]) return nullptr;
    addr += static_cast<uint64_t>(c) * (i == 0 ? m.elem_bytes : m.strides[i - 1]);
  }
  return reinterpret_cast<const unsigned char*>(addr);
}

// Calls f(box element index per dimension, shared byte offset of the element) for each
// element of the box at `base` (shared offset), in row-major order.
template <class F>
void for_box(const TmaMap& m, uint32_t base, F f) {
  uint32_t e[5] = {0, 0, 0, 0, 0};
  const uint64_t n = box_elems(m);
  for (uint64_t i = 0; i < n; ++i) {
    const uint32_t off = swizzle(base + static_cast<uint32_t>(i * m.elem_bytes), m.swizzle);
    f(e, off);
    for (uint32_t d = 0; d < m.rank; ++d) {
      if (++e[d] < m.box[d]) break;
      e[d] = 0;
    }
  }
}

void complete_tma_load(const TmaLoad& l) {
  const TmaMap& m = l.map;
  for_box(m, l.dst, [&](const uint32_t* e, uint32_t off) {
    const unsigned char* src = tma_global(m, l.coords, e);
    unsigned char buf[4] = {0, 0, 0, 0};
    if (src != nullptr) {
      std::memcpy(buf, src, m.elem_bytes);
    } else if (m.nan_fill) {
      const uint32_t nan32 = 0x7fffffffu;
      const uint16_t nan16 = m.elem_bytes == 2 ? 0x7fff : 0;
      if (m.elem_bytes == 4) std::memcpy(buf, &nan32, 4); else std::memcpy(buf, &nan16, 2);
    }
    async_write(off, buf, m.elem_bytes);
  });
  const auto it = g.mbars.find(l.bar);
  if (it == g.mbars.end()) return;  // invalidated meanwhile: nothing to signal
  it->second.tx -= static_cast<int64_t>(l.bytes);
  mbar_check_phase(it->second);
}

// Completes the TMA loads that signal the barrier at `bar` (all of them, in issue order).
void complete_tma_loads_for(uint32_t bar) {
  std::vector<TmaLoad> keep, run;
  for (TmaLoad& l : g.tma_loads) (l.bar == bar ? run : keep).push_back(l);
  g.tma_loads.swap(keep);
  for (const TmaLoad& l : run) complete_tma_load(l);
}

// Box geometry checks shared by loads and stores.
void check_box(const TmaMap& m, uint32_t smem, const char* what) {
  const uint64_t inner = uint64_t{m.box[0]} * m.elem_bytes;
  if (inner % 16 != 0) fault("%s: the box's inner dimension is %llu bytes, not a multiple of 16", what, (unsigned long long)inner);
  // Hardware requires inner bytes <= the span; how it lays out a narrower row is not
  // documented, so reel requires them equal (as CUTLASS and FlashAttention-3 use it).
  if (m.swizzle != 0 && inner != m.swizzle)
    fault("%s: the box's inner dimension of %llu bytes differs from the %u-byte swizzle span", what,
          (unsigned long long)inner, m.swizzle);
  // 128 bytes, whatever the swizzle: the swizzle is a function of the absolute address.
  if (smem % 128 != 0) fault("%s: shared address 0x%x is not 128-byte aligned", what, smem);
}

void complete_tma_stores(Fiber& f, int pending, bool at_end) {
  if (pending < 0) pending = 0;
  size_t done = 0;
  while (f.tma_groups.size() - done > static_cast<size_t>(pending)) {
    for (const TmaStore& st : f.tma_groups[done]) {
      if (std::memcmp(g.window + st.src, g.async_view + st.src, st.bytes) != 0) {
        const std::string what = "a TMA store's shared memory was written by ordinary stores while the store read it";
        if (at_end) {
          g.error = "reel emulator: " + where() + ": " + what;
          g.faulted = true;
          return;
        }
        fault("%s", what.c_str());
      }
      const TmaMap& m = st.map;
      for_box(m, st.src, [&](const uint32_t* e, uint32_t off) {
        unsigned char* dst = const_cast<unsigned char*>(tma_global(m, st.coords, e));
        if (dst != nullptr) std::memcpy(dst, g.async_view + off, m.elem_bytes);
      });
    }
    ++done;
  }
  f.tma_groups.erase(f.tma_groups.begin(), f.tma_groups.begin() + static_cast<std::ptrdiff_t>(done));
}

}  // namespace

const unsigned char* group_exchange(const void* mine, size_t bytes, uint64_t* serial) {
  Fiber* f = g.cur;
  const unsigned wg = f->linear / 128, i = f->linear % 128;
  if (wg >= g.groups.size())
    fault("a warpgroup operation in a block of %u threads: thread %u has no complete warpgroup of 128", g.threads,
          f->linear);
  if (bytes > kGroupSlotBytes) fault("warpgroup exchange of %zu bytes, larger than a slot", bytes);
  Group& grp = g.groups[wg];
  release_group(grp, f->held_group);
  GroupExchange* e = grp.open;
  if (e == nullptr) {
    if (grp.free.empty()) {
      grp.all.push_back(std::make_unique<GroupExchange>());
      grp.free.push_back(grp.all.back().get());
    }
    e = grp.free.back();
    grp.free.pop_back();
    e->arrived = 0;
    e->readers = 0;
    std::memset(e->bits, 0, sizeof e->bits);
    e->serial = ++g.exchanges;
    grp.open = e;
  }
  for (unsigned t = 0; t < 128; ++t)
    if (g.fibers[128 * wg + t].state == State::Done)
      fault("a warpgroup operation while thread %u of the warpgroup has exited", 128 * wg + t);
  std::memcpy(e->slots[i], mine, bytes);
  e->bits[i / 32] |= 1u << (i % 32);
  if (++e->arrived == 128) {
    grp.open = nullptr;
    e->readers = 128;
    for (unsigned t = 0; t < 128; ++t)
      if (t != i) make_ready(g.fibers[128 * wg + t]);
  } else {
    f->state = State::AtGroup;
    leave(f);
  }
  f->held_group = e;
  *serial = e->serial;
  return &e->slots[0][0];
}

uint32_t shared_offset(const void* p) { return checked_offset(p, 1, "a shared-memory address"); }

unsigned char* shared_at(uint32_t offset, size_t bytes) {
  unsigned char* p = g.window + offset;
  if (!in_shared(p, bytes)) fault("shared offset 0x%x (%zu bytes) is outside the block's shared memory", offset, bytes);
  return p;
}

void async_read_check(uint32_t offset, size_t bytes, const char* what) {
  shared_at(offset, bytes);
  if (std::memcmp(g.window + offset, g.async_view + offset, bytes) == 0) return;
  size_t i = 0;
  while (g.window[offset + i] == g.async_view[offset + i]) ++i;
  fault("%s reads shared offset 0x%zx through the async proxy, written by ordinary stores that no "
        "fence.proxy.async made visible to it",
        what, offset + i);
}

void fence_proxy_async() {
  std::memcpy(g.async_view, g.window, g.cfg.dynamic_shared);
  std::memcpy(g.async_view + g.static_base, g.window + g.static_base, g.static_used);
}

void mbarrier_init(void* bar, unsigned count) {
  const uint32_t off = checked_offset(bar, 8, "mbarrier.init");
  if (off % 8 != 0) fault("mbarrier.init: shared offset 0x%x is not 8-byte aligned", off);
  if (count == 0 || count >= (1u << 20)) fault("mbarrier.init: count %u (1..2^20-1)", count);
  Mbar& m = g.mbars[off];
  m = Mbar{};
  m.expected = m.pending = count;
  const uint64_t tag = kMbarTag ^ off;
  std::memcpy(g.window + off, &tag, 8);
  std::memcpy(g.async_view + off, &tag, 8);
}

void mbarrier_inval(void* bar) {
  uint32_t off;
  Mbar& m = mbar_at(bar, "mbarrier.inval", &off);
  if (!m.waiters.empty()) fault("mbarrier.inval: threads wait on the mbarrier at shared offset 0x%x", off);
  g.mbars.erase(off);
  std::memset(g.window + off, kPoison, 8);
}

uint64_t mbarrier_arrive(void* bar, unsigned count, uint32_t tx) {
  uint32_t off;
  Mbar& m = mbar_at(bar, "mbarrier.arrive", &off);
  if (tx >= (1u << 20)) fault("mbarrier.arrive.expect_tx: %u bytes (at most 2^20-1)", tx);
  if (count > m.pending)
    fault("mbarrier.arrive: %u arrivals on the mbarrier at shared offset 0x%x, which expects %u more in this phase",
          count, off, m.pending);
  const uint64_t token = m.phase;
  m.tx += tx;
  m.pending -= count;
  mbar_check_phase(m);
  return token;
}

void mbarrier_expect_tx(void* bar, uint32_t tx) {
  Mbar& m = mbar_at(bar, "mbarrier.expect_tx");
  if (tx >= (1u << 20)) fault("mbarrier.expect_tx: %u bytes (at most 2^20-1)", tx);
  m.tx += tx;
}

bool mbarrier_wait_parity(void* bar, unsigned parity, bool block) {
  uint32_t off;
  Mbar* m = &mbar_at(bar, "mbarrier.try_wait.parity", &off);
  // The phase of parity p has completed when the current phase's parity differs from p.
  auto done = [&] { return (m->phase & 1u) != (parity & 1u); };
  if (done() || !block) return done();
  // As late as hardware may: the TMA loads this barrier waits for land now.
  complete_tma_loads_for(off);
  m = &g.mbars.at(off);
  if (done()) return true;
  Fiber* f = g.cur;
  f->state = State::AtMbarrier;
  f->mbar = off;
  f->mbar_parity = parity & 1u;
  m->waiters.push_back(f->linear);
  leave(f);
  // Woken by the phase's completion (or the barrier went away: a fault already).
  m = &mbar_at(bar, "mbarrier.try_wait.parity");
  return done();
}

void barrier_arrive(unsigned id, unsigned count) {
  if (id >= kBarriers) fault("bar.arrive %u: there are 16 barriers (0..15)", id);
  if (count == 0 || count % 32 != 0 || count > g.threads)
    fault("bar.arrive %u: the thread count %u must be a non-zero multiple of 32, at most the block's %u", id, count,
          g.threads);
  Barrier& b = g.bars[id];
  if (b.arrived == 0) {
    b.count = count;
    b.op = 0;
  } else if (b.count != count) {
    fault("barrier %u: threads arrive with thread counts %u and %u", id, b.count, count);
  }
  ++b.arrived;
  if (b.arrived == count) finish_barrier(id, 0);
}

void tma_load(void* dst, const void* map_p, const int32_t* coords, void* bar) {
  TmaLoad l;
  std::memcpy(&l.map, map_p, sizeof l.map);
  check_map(l.map, "cp.async.bulk.tensor (load)");
  const uint64_t bytes = box_elems(l.map) * l.map.elem_bytes;
  l.dst = checked_offset(dst, bytes, "cp.async.bulk.tensor (load) destination");
  check_box(l.map, l.dst, "cp.async.bulk.tensor (load)");
  mbar_at(bar, "cp.async.bulk.tensor (load) mbarrier", &l.bar);
  for (uint32_t i = 0; i < 5; ++i) l.coords[i] = i < l.map.rank ? coords[i] : 0;
  l.bytes = bytes;
  // Poisoned until it lands (as late as a waiter on its barrier allows).
  std::memset(g.window + l.dst, kPoison, bytes);
  std::memset(g.async_view + l.dst, kPoison, bytes);
  g.tma_loads.push_back(l);
}

void tma_store(const void* map_p, const int32_t* coords, const void* src) {
  TmaStore st;
  std::memcpy(&st.map, map_p, sizeof st.map);
  check_map(st.map, "cp.async.bulk.tensor (store)");
  st.bytes = box_elems(st.map) * st.map.elem_bytes;
  st.src = checked_offset(src, st.bytes, "cp.async.bulk.tensor (store) source");
  check_box(st.map, st.src, "cp.async.bulk.tensor (store)");
  for (uint32_t i = 0; i < 5; ++i) st.coords[i] = i < st.map.rank ? coords[i] : 0;
  async_read_check(st.src, st.bytes, "cp.async.bulk.tensor (store)");
  g.cur->tma_open.push_back(st);
}

void tma_store_commit() {
  Fiber* f = g.cur;
  f->tma_groups.push_back(std::move(f->tma_open));
  f->tma_open.clear();
}

void tma_store_wait(int pending) { complete_tma_stores(*g.cur, pending); }

void setmaxnreg(unsigned count, bool increase) {
  if (count < 24 || count > 256 || count % 8 != 0)
    fault("setmaxnreg.%s %u: the count must be a multiple of 8 in 24..256", increase ? "inc" : "dec", count);
  const uint32_t mine[2] = {count, increase ? 1u : 0u};
  uint64_t serial;
  const unsigned char* slots = group_exchange(mine, sizeof mine, &serial);
  uint32_t first[2];
  std::memcpy(first, slots, sizeof first);
  for (unsigned t = 1; t < 128; ++t) {
    uint32_t other[2];
    std::memcpy(other, slots + t * kGroupSlotBytes, sizeof other);
    if (other[0] != first[0] || other[1] != first[1])
      fault("setmaxnreg: the warpgroup disagrees (thread 0: %s %u, thread %u: %s %u)", first[1] ? "inc" : "dec",
            first[0], t, other[1] ? "inc" : "dec", other[0]);
  }
}


// ---- wgmma ----------------------------------------------------------------------------

namespace {

// Fields of a shared-memory matrix descriptor (byte values).
struct MatDesc {
  uint32_t start, lbo, sbo, base, span;  // span: the swizzle in bytes, 0 for none
};

MatDesc mat_desc(uint64_t d) {
  MatDesc m;
  m.start = static_cast<uint32_t>(d & 0x3fff) << 4;
  m.lbo = static_cast<uint32_t>((d >> 16) & 0x3fff) << 4;
  m.sbo = static_cast<uint32_t>((d >> 32) & 0x3fff) << 4;
  m.base = static_cast<uint32_t>((d >> 49) & 7);
  const uint32_t layout = static_cast<uint32_t>(d >> 62);
  m.span = layout == 1 ? 128 : layout == 2 ? 64 : layout == 3 ? 32 : 0;
  return m;
}

// The shared address of element (mn, k) of a 16-bit operand in the canonical layouts (PTX
// ISA, wgmma "Shared Memory Matrix Layout"; in 16-byte units T = 8 elements, s = span / 16):
//   K-major,  no swizzle: ((8,m),(T,2)) : ((1T,SBO),(1,LBO))
//   K-major,  swizzled:   ((8,m),(T,2)) : ((sT,SBO),(1,T))
//   MN-major, no swizzle: ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))
//   MN-major, swizzled:   ((T,s,m),(8,k)) : ((1,T,LBO),(sT,SBO))
// then the swizzle of the address (16-byte chunk bits [4, 4+log2 s) ^= bits [7, 7+log2 s)).
uint32_t operand_addr(const MatDesc& d, bool mn_major, uint32_t mn, uint32_t k) {
  uint32_t a;
  if (!mn_major) {
    if (d.span == 0)
      a = (mn % 8) * 16 + (mn / 8) * d.sbo + (k % 8) * 2 + (k / 8) * d.lbo;
    else
      a = (mn % 8) * d.span + (mn / 8) * d.sbo + (k % 8) * 2 + (k / 8) * 16;
  } else {
    if (d.span == 0) {
      a = (mn % 8) * 2 + (mn / 8) * d.sbo + (k % 8) * 16 + (k / 8) * d.lbo;
    } else {
      const uint32_t s = d.span / 16;
      a = (mn % 8) * 2 + ((mn / 8) % s) * 16 + (mn / (8 * s)) * d.lbo + (k % 8) * d.span + (k / 8) * d.sbo;
    }
  }
  return swizzle(d.start + a, d.span);
}

float half_bits(uint16_t h, bool f16) { return f16 ? f16_bits_to_float(h) : bf16_bits_to_float(h); }

// Reads element (mn, k) of a shared operand through the async proxy.
float operand_at(const MatDesc& d, bool mn_major, uint32_t mn, uint32_t k, bool f16, const char* what) {
  const uint32_t addr = operand_addr(d, mn_major, mn, k);
  async_read_check(addr, 2, what);
  uint16_t h;
  std::memcpy(&h, g.async_view + addr, 2);
  return half_bits(h, f16);
}

void check_desc(const MatDesc& d, const char* what) {
  if (d.base != 0) fault("%s: descriptor base offset %u (reel's wrappers use 0: 1024-aligned swizzle atoms)", what, d.base);
  if (d.span != 0 && d.start % 16 != 0) fault("%s: descriptor start 0x%x is not 16-byte aligned", what, d.start);
}

// Decodes the operands of a warpgroup operation from shared memory (now: at completion).
void wgmma_decode(WgmmaGroupOp& G) {
  const WgmmaOp& op = G.op;
  const bool f16 = op.f16 != 0;
  G.A.assign(64 * 16, 0.0f);
  G.B.assign(size_t{op.n} * 16, 0.0f);
  if (op.a_regs) {
    for (uint32_t i = 0; i < 128; ++i) {
      const uint32_t w = i / 32, lane = i % 32, gg = lane / 4, t = lane % 4;
      for (uint32_t r = 0; r < 4; ++r) {
        const uint32_t row = 16 * w + gg + (r & 1 ? 8 : 0), k = 2 * t + (r & 2 ? 8 : 0);
        G.A[row * 16 + k] = half_bits(static_cast<uint16_t>(G.a[i][r] & 0xffffu), f16);
        G.A[row * 16 + k + 1] = half_bits(static_cast<uint16_t>(G.a[i][r] >> 16), f16);
      }
    }
  } else {
    const MatDesc da = mat_desc(op.desc_a);
    check_desc(da, "wgmma A");
    for (uint32_t m = 0; m < 64; ++m)
      for (uint32_t k = 0; k < 16; ++k) G.A[m * 16 + k] = operand_at(da, op.trans_a != 0, m, k, f16, "wgmma (A)");
  }
  const MatDesc db = mat_desc(op.desc_b);
  check_desc(db, "wgmma B");
  for (uint32_t n = 0; n < op.n; ++n)
    for (uint32_t k = 0; k < 16; ++k) G.B[n * 16 + k] = operand_at(db, op.trans_b != 0, n, k, f16, "wgmma (B)");
  if (op.scale_a < 0)
    for (float& x : G.A) x = -x;
  if (op.scale_b < 0)
    for (float& x : G.B) x = -x;
  G.decoded = true;
}

void wgmma_complete(WgmmaPending& p) {
  WgmmaGroupOp& G = *p.op;
  if (!G.decoded) wgmma_decode(G);
  const uint32_t n = G.op.n;
  const uint32_t w = p.thread / 32, lane = p.thread % 32, gg = lane / 4, t = lane % 4;
  for (uint32_t j = 0; j < n / 2; ++j) {
    const uint32_t row = 16 * w + gg + ((j % 4) >= 2 ? 8 : 0), col = 8 * (j / 4) + 2 * t + (j % 2);
    float acc = G.op.scale_d ? (p.chained ? p.d[j] : p.c[j]) : 0.0f;
    const float* a = &G.A[row * 16];
    const float* b = &G.B[col * 16];
    for (uint32_t k = 0; k < 16; ++k) acc += a[k] * b[k];
    p.d[j] = acc;
  }
}

}  // namespace

void wgmma(const WgmmaOp& op) {
  Fiber* f = g.cur;
  if (!f->wg_fenced)
    fault("wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group (or before the first wgmma)");
  if (op.n < 8 || op.n > 256 || op.n % 8 != 0) fault("wgmma: N = %u (8..256, a multiple of 8)", op.n);
  struct Slot {
    uint64_t desc_a, desc_b;
    uint32_t a[4];
    uint32_t n, flags, scale_d;
  } mine{op.a_regs ? 0 : op.desc_a, op.desc_b, {op.a[0], op.a[1], op.a[2], op.a[3]}, op.n,
         op.f16 | op.a_regs << 1 | op.trans_a << 2 | op.trans_b << 3 | (op.scale_a < 0 ? 16u : 0u) |
             (op.scale_b < 0 ? 32u : 0u),
         op.scale_d};
  static_assert(sizeof(Slot) <= kGroupSlotBytes, "wgmma slot");
  uint64_t serial;
  const unsigned char* slots = group_exchange(&mine, sizeof mine, &serial);
  const unsigned i = f->linear % 128;
  std::shared_ptr<WgmmaGroupOp>& G = g.wg_issuing[serial];
  if (!G) {
    G = std::make_shared<WgmmaGroupOp>();
    G->op = op;
    Slot first;
    std::memcpy(&first, slots, sizeof first);
    for (unsigned t = 0; t < 128; ++t) {
      Slot o;
      std::memcpy(&o, slots + t * kGroupSlotBytes, sizeof o);
      if (o.desc_a != first.desc_a || o.desc_b != first.desc_b || o.n != first.n || o.flags != first.flags ||
          o.scale_d != first.scale_d)
        fault("wgmma: threads 0 and %u of the warpgroup disagree on the descriptors, N, the flags or scale-d", t);
      std::memcpy(G->a[t], o.a, sizeof o.a);
    }
  }
  std::shared_ptr<WgmmaGroupOp> op_ref = G;
  if (++op_ref->issued == 128) g.wg_issuing.erase(serial);
  WgmmaPending p;
  p.op = op_ref;
  p.d = op.d;
  p.thread = i;
  p.chained = false;
  auto in_flight = [&](float* d) {
    for (const WgmmaPending& q : f->wg_open)
      if (q.d == d) return true;
    for (const auto& grp : f->wg_groups)
      for (const WgmmaPending& q : grp)
        if (q.d == d) return true;
    return false;
  };
  if (in_flight(op.d)) {
    p.chained = true;
  } else if (op.scale_d) {
    p.c.assign(op.d, op.d + op.n / 2);
  }
  // Poisoned until the wait.
  std::memset(op.d, 0xff, sizeof(float) * (op.n / 2));
  f->wg_open.push_back(std::move(p));
}

void wgmma_fence() { g.cur->wg_fenced = true; }

void wgmma_commit() {
  Fiber* f = g.cur;
  f->wg_groups.push_back(std::move(f->wg_open));
  f->wg_open.clear();
}

void wgmma_wait(int pending) {
  Fiber* f = g.cur;
  if (pending < 0) pending = 0;
  size_t done = 0;
  while (f->wg_groups.size() - done > static_cast<size_t>(pending)) {
    for (WgmmaPending& p : f->wg_groups[done]) wgmma_complete(p);
    ++done;
  }
  f->wg_groups.erase(f->wg_groups.begin(), f->wg_groups.begin() + static_cast<std::ptrdiff_t>(done));
  f->wg_fenced = false;
}

int launch(const char* kernel, const LaunchConfig& cfg, void (*body)(void*), void* params) {
  if (gp == nullptr) {
    owner = std::make_unique<Emu>();
    gp = owner.get();
  }
  g.kernel = kernel;
  g.cur = nullptr;
  g.error.clear();
  const dim3 gd = cfg.grid, bd = cfg.block;
  // Launch limits of every architecture since sm_30 (cudaDeviceProp maxThreadsDim,
  // maxGridSize, maxThreadsPerBlock).
  if (bd.x == 0 || bd.y == 0 || bd.z == 0 || gd.x == 0 || gd.y == 0 || gd.z == 0)
    return launch_error(format("empty launch geometry: grid (%u,%u,%u), block (%u,%u,%u)", gd.x, gd.y, gd.z, bd.x,
                               bd.y, bd.z));
  if (bd.x > 1024 || bd.y > 1024 || bd.z > 64)
    return launch_error(format("block (%u,%u,%u) exceeds the per-axis limits (1024, 1024, 64)", bd.x, bd.y, bd.z));
  const uint64_t threads = uint64_t{bd.x} * bd.y * bd.z;
  if (threads > 1024) return launch_error(format("block of %llu threads exceeds 1024", (unsigned long long)threads));
  if (gd.x > 0x7fffffffu || gd.y > 65535 || gd.z > 65535)
    return launch_error(format("grid (%u,%u,%u) exceeds the limits (2^31-1, 65535, 65535)", gd.x, gd.y, gd.z));
  const uint32_t max_dyn = cfg.shared_opt_in ? cfg.shared_opt_in : kStaticSharedMax;
  if (cfg.shared_opt_in > cfg.max_shared_per_block)
    return launch_error(format("the dynamic shared memory opt-in of %u bytes exceeds the architecture's %u",
                               cfg.shared_opt_in, cfg.max_shared_per_block));
  if (cfg.dynamic_shared > max_dyn)
    return launch_error(format("%u bytes of dynamic shared memory exceed the kernel's %s of %u bytes",
                               cfg.dynamic_shared, cfg.shared_opt_in ? "opt-in" : "default limit (no opt-in)",
                               max_dyn));
  install_fault_handler();
  g.cfg = cfg;
  g.body = body;
  g.params = params;
  g.threads = static_cast<unsigned>(threads);
  uint64_t seed = 0;
  g.shuffle = shuffle_setting(&seed);
  g.rng.seed(seed);
  g.own_switch = own_switch_setting();
  // Fibers, stacks and warps, kept from earlier launches.
  while (g.fibers.size() < g.threads) {
    g.fibers.emplace_back();
    g.fibers.back().stack = new_stack();
  }
  for (unsigned t = 0; t < g.threads; ++t) {
    Fiber& f = g.fibers[t];
    f.idx = uint3(t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y));
    f.linear = t;
  }
  g.warps.resize((g.threads + 31) / 32);
  g.ready.assign(g.threads, 0);
  // The shared window: dynamic memory first, 1024-byte aligned as TMA swizzles need; the
  // static variables after it.
  g.static_base = (size_t{cfg.dynamic_shared} + 1023) & ~size_t{1023};
  const size_t need = g.static_base + kStaticSharedMax;
  if (g.window_cap < need) {
    std::free(g.window);
    std::free(g.async_view);
    g.window = static_cast<unsigned char*>(std::aligned_alloc(1024, need));
    g.async_view = static_cast<unsigned char*>(std::aligned_alloc(1024, need));
    g.window_cap = need;
  }
  g.groups.resize(g.threads / 128);
  // Blocks in order, or in a random order under REEL_EMU_SHUFFLE.
  const uint64_t nblocks = uint64_t{gd.x} * gd.y * gd.z;
  auto coords = [&](uint64_t i) {
    return uint3(static_cast<unsigned>(i % gd.x), static_cast<unsigned>((i / gd.x) % gd.y),
                 static_cast<unsigned>(i / (uint64_t{gd.x} * gd.y)));
  };
  if (g.shuffle && nblocks > 1) {
    if (nblocks <= (1u << 22)) {
      std::vector<uint32_t> order(nblocks);
      for (uint64_t i = 0; i < nblocks; ++i) order[i] = static_cast<uint32_t>(i);
      std::shuffle(order.begin(), order.end(), g.rng);
      for (uint32_t i : order)
        if (!run_block(coords(i))) return -1;
    } else {
      // An affine permutation (a odd and coprime to n, so i -> a·i + c mod n is a bijection).
      uint64_t a = g.rng() | 1;
      auto gcd = [](uint64_t x, uint64_t y) {
        while (y) {
          x %= y;
          std::swap(x, y);
        }
        return x;
      };
      while (gcd(a % nblocks, nblocks) != 1) a += 2;
      const uint64_t c = g.rng() % nblocks;
      for (uint64_t i = 0; i < nblocks; ++i)
        if (!run_block(coords((static_cast<unsigned __int128>(a) * i + c) % nblocks))) return -1;
    }
  } else {
    for (uint64_t i = 0; i < nblocks; ++i)
      if (!run_block(coords(i))) return -1;
  }
  return 0;
}

}  // namespace reel_emu

extern "C" const char* reel_emu_last_error() { return reel_emu::gp ? reel_emu::gp->error.c_str() : ""; }

extern "C" void reel_emu_set_shuffle(int mode, uint64_t seed) {
  reel_emu::g_shuffle_override = mode;
  reel_emu::g_seed = seed;
}

extern "C" void reel_emu_set_switch(int mode) { reel_emu::g_switch_override = mode; }
