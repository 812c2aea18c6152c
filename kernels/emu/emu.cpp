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

enum class State { Ready, AtBarrier, AtWarp, Done };

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

  ~Emu() { std::free(window); }
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

const char* state_name(const Fiber& f) {
  switch (f.state) {
    case State::Ready: return "is ready";
    case State::AtBarrier: return "waits at a block barrier";
    case State::AtWarp: return "waits at another warp operation";
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
  // Shared memory: the dynamic part poisoned, the static variables carved anew.
  std::memset(g.window, kPoison, g.cfg.dynamic_shared);
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
    g.window = static_cast<unsigned char*>(std::aligned_alloc(1024, need));
    g.window_cap = need;
  }
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
