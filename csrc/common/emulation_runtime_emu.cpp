// The host emulation's runtime: fibers, the block scheduler, barriers and warp rendezvous, guarded
// buffers and the fault handler. Declared in common/host_emulation.h; built only into raekern._emu
// (the guard keeps it empty where CMake's csrc/common/*.cpp glob also compiles it into raekern._C).
#ifdef RAEKERN_HOST_EMULATION
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>
#include <random>
#include <sstream>

#include "common/host_emulation.h"

#if !defined(__x86_64__) || defined(RAEKERN_EMU_UCONTEXT)
#define RAEKERN_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

namespace raekern::emu {
namespace {

// ---------------------------------------------------------------------------------------------
// Context switching. x86-64 gets a hand-written switch (callee-saved registers, MXCSR and the x87
// control word): a block reduction switches thousands of times, and ucontext's swapcontext, used
// elsewhere (or with -DRAEKERN_EMU_UCONTEXT), makes a signal-mask syscall per switch (~5x slower).
#if !defined(RAEKERN_EMU_USE_UCONTEXT)
extern "C" void raekern_emu_switch(void** save_sp, void* load_sp);
extern "C" void raekern_emu_trampoline();
asm(R"(
  .text
  .globl raekern_emu_switch
  .hidden raekern_emu_switch
  .type raekern_emu_switch,@function
raekern_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size raekern_emu_switch, .-raekern_emu_switch

  .globl raekern_emu_trampoline
  .hidden raekern_emu_trampoline
  .type raekern_emu_trampoline,@function
raekern_emu_trampoline:
  callq *%r13
  ud2
  .size raekern_emu_trampoline, .-raekern_emu_trampoline
)");

struct Ctx {
  void* sp = nullptr;
};
inline void switch_ctx(Ctx& from, Ctx& to) { raekern_emu_switch(&from.sp, to.sp); }
void init_ctx(Ctx& c, unsigned char* lo, size_t size, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(lo + size) - 64) & ~uintptr_t(15));
  uint64_t* sp = top - 8;  // 16-byte aligned, so the trampoline's call sees the ABI alignment
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  sp[1] = 0;                                      // r15
  sp[2] = 0;                                      // r14
  sp[3] = reinterpret_cast<uint64_t>(entry);      // r13: called by the trampoline
  sp[4] = 0;                                      // r12
  sp[5] = 0;                                      // rbx
  sp[6] = 0;                                      // rbp
  sp[7] = reinterpret_cast<uint64_t>(&raekern_emu_trampoline);
  c.sp = sp;
}
#else
struct Ctx {
  ucontext_t uc;
};
inline void switch_ctx(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
void init_ctx(Ctx& c, unsigned char* lo, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

size_t page_size() {
  static const size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}
size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Fiber stacks: mmap'ed once per OS thread, each with an inaccessible page below it so a stack
// overflow faults instead of corrupting a neighbour.
struct Stack {
  unsigned char* lo;  // usable bytes [lo, lo + size)
  size_t size;
};

size_t stack_bytes() {
  static const size_t s = [] {
    const char* env = std::getenv("RAEKERN_EMU_STACK_KB");
    const long kb = env ? std::atol(env) : 64;
    return round_up(size_t(kb > 16 ? kb : 16) * 1024, page_size());
  }();
  return s;
}

struct StackPool {
  std::vector<Stack> stacks;
  std::vector<std::pair<unsigned char*, size_t>> maps;
  void ensure(size_t n) {
    if (stacks.size() >= n) return;
    const size_t want = n - stacks.size(), each = stack_bytes() + page_size();
    auto* m = static_cast<unsigned char*>(
        mmap(nullptr, want * each, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (m == MAP_FAILED) throw EmulationError("host emulation: cannot map fiber stacks");
    maps.emplace_back(m, want * each);
    for (size_t i = 0; i < want; ++i) {
      mprotect(m + i * each, page_size(), PROT_NONE);
      stacks.push_back({m + i * each + page_size(), stack_bytes()});
    }
  }
  bool is_guard(const void* a) const {
    const auto* p = static_cast<const unsigned char*>(a);
    for (const Stack& s : stacks)
      if (p >= s.lo - page_size() && p < s.lo) return true;
    return false;
  }
  ~StackPool() {
    for (auto& [p, n] : maps) munmap(p, n);
  }
};
thread_local StackPool tl_stacks;

// ---------------------------------------------------------------------------------------------
// One launch on this thread.
enum class St : uint8_t { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  Ctx ctx;
  St st = St::kRunnable;
  detail::Coords coords;
  int lane = 0, warp = 0;
  // The synchronisation point the fiber waits at.
  int op = 0;
  unsigned mask = 0;
  uint64_t value = 0;
  int param = 0, width = 32;
  uint64_t result = 0;
  std::source_location loc;
  // cp.async: copies issued since the last commit, and committed groups not yet retired (oldest first).
  struct Copy {
    void* dst;
    const void* src;
    int bytes, src_bytes;
  };
  std::vector<Copy> open_copies;
  std::vector<std::vector<Copy>> copy_groups;
};

struct Run {
  dim3 grid, block;
  int nthreads = 0, nwarps = 0;
  std::vector<Fiber> fibers;
  Ctx sched;
  int cur = -1;
  detail::Body body = nullptr;
  const void* closure = nullptr;
  std::vector<uint4> smem;  // 16-byte aligned: dynamic shared memory then its canary
  size_t smem_bytes = 0;
  bool aborted = false;
  std::string error;
};
thread_local Run* tl_run = nullptr;
thread_local Arena* tl_arenas = nullptr;

thread_local Schedule tl_schedule = Schedule::kRandom;
thread_local uint64_t tl_seed = 0;

constexpr size_t kSmemCanary = 256;

const char* op_name(int op) {
  switch (op) {
    case detail::kShflIdx: return "__shfl_sync";
    case detail::kShflUp: return "__shfl_up_sync";
    case detail::kShflDown: return "__shfl_down_sync";
    case detail::kShflXor: return "__shfl_xor_sync";
    case detail::kBallot: return "__ballot_sync";
    case detail::kAny: return "__any_sync";
    case detail::kAll: return "__all_sync";
    case detail::kSyncWarp: return "__syncwarp";
    case detail::kReduceAddU: case detail::kReduceAddI: return "__reduce_add_sync";
    case detail::kReduceMinU: case detail::kReduceMinI: return "__reduce_min_sync";
    case detail::kReduceMaxU: case detail::kReduceMaxI: return "__reduce_max_sync";
    case detail::kMatchAny: return "__match_any_sync";
    case detail::kCollective: return "warp collective (mma.sync / ldmatrix)";
  }
  return "?";
}
const char* barrier_name(int op) {
  switch (op) {
    case detail::kBarCount: return "__syncthreads_count";
    case detail::kBarAnd: return "__syncthreads_and";
    case detail::kBarOr: return "__syncthreads_or";
  }
  return "__syncthreads";
}

std::string where(const std::source_location& l) {
  const char* f = l.file_name();
  const char* csrc = std::strstr(f, "csrc/");
  return std::string(csrc ? csrc : f) + ":" + std::to_string(l.line());
}
std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", m);
  return b;
}
std::string xyz(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
std::string who(const Fiber& f) {
  return "block " + xyz(f.coords.block_idx) + " thread " + xyz(f.coords.thread_idx) + " (warp " +
         std::to_string(f.warp) + " lane " + std::to_string(f.lane) + ")";
}

void record(Run& r, std::string msg) {
  if (!r.aborted) r.error = "host emulation: " + std::move(msg);
  r.aborted = true;
}

// Called on a fiber: records the error and never resumes that fiber (its stack is abandoned).
[[noreturn]] void fail_fiber(Run& r, const std::string& msg) {
  Fiber& f = r.fibers[r.cur];
  record(r, msg);
  switch_ctx(f.ctx, r.sched);
  __builtin_unreachable();
}

Run& current(const char* what) {
  Run* r = tl_run;
  if (r == nullptr || r->cur < 0)
    throw EmulationError(std::string("host emulation: ") + what + " called outside an emulated kernel");
  return *r;
}

void yield(Run& r, Fiber& f) { switch_ctx(f.ctx, r.sched); }

unsigned existing_lanes(const Run& r, int warp) {
  const int n = std::min(32, r.nthreads - warp * 32);
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

const detail::Collective& collective_of(const Fiber& f) {
  return *reinterpret_cast<const detail::Collective*>(f.value);
}

// Every lane of the mask has arrived at a warp_collective: all lanes must be at the same instruction;
// then each lane's result is computed from everyone's operands before any lane runs on.
void resolve_collective(Run& r, Fiber* const (&lanes)[32]) {
  const Fiber* first = nullptr;
  const void* ins[32] = {};
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    const detail::Collective& c = collective_of(*lanes[l]);
    if (!first) first = lanes[l];
    if (c.fn != collective_of(*first).fn)
      fail_fiber(r, "divergent warp collective: " + who(*first) + " is at " + collective_of(*first).name + " (" +
                        where(first->loc) + ") while " + who(*lanes[l]) + " is at " + c.name + " (" +
                        where(lanes[l]->loc) + ")");
    ins[l] = c.in;
  }
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    const detail::Collective& c = collective_of(*lanes[l]);
    std::string err;
    c.fn(l, ins, c.out, &err);
    if (!err.empty()) fail_fiber(r, who(*lanes[l]) + " at " + where(lanes[l]->loc) + ": " + c.name + ": " + err);
  }
  for (int l = 0; l < 32; ++l)
    if (lanes[l]) lanes[l]->st = St::kRunnable;
}

void perform_copies(const std::vector<Fiber::Copy>& group) {
  for (const Fiber::Copy& c : group) {
    std::memcpy(c.dst, c.src, size_t(c.src_bytes));
    std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
  }
}

// If every lane of `mask` waits at the same collective, computes the results and wakes them.
void try_resolve(Run& r, int warp, unsigned mask, int op) {
  Fiber* lanes[32] = {};
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& g = r.fibers[warp * 32 + l];
    if (g.st == St::kDone)
      fail_fiber(r, who(r.fibers[r.cur]) + " at " + where(r.fibers[r.cur].loc) + ": " + op_name(op) +
                        " with mask " + hex(mask) + " includes lane " + std::to_string(l) +
                        ", which has exited (an inactive lane)");
    if (g.st != St::kWarp || g.mask != mask || g.op != op) return;  // not there yet (or deadlock later)
    lanes[l] = &g;
  }
  if (op == detail::kCollective) return resolve_collective(r, lanes);
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    Fiber& g = *lanes[l];
    uint64_t res = 0;
    switch (op) {
      case detail::kShflIdx: case detail::kShflUp: case detail::kShflDown: case detail::kShflXor: {
        const int w = g.width, base = l & ~(w - 1);
        int src = l;
        if (op == detail::kShflIdx) src = base + (g.param & (w - 1));
        else if (op == detail::kShflUp) src = l - g.param >= base ? l - g.param : l;
        else if (op == detail::kShflDown) src = l + g.param < base + w ? l + g.param : l;
        else src = (l ^ g.param) < base + w ? (l ^ g.param) : l;
        if (src != l && !(mask >> src & 1u))
          fail_fiber(r, who(g) + " at " + where(g.loc) + ": " + op_name(op) + " with mask " + hex(mask) +
                            " reads lane " + std::to_string(src) +
                            ", which is not in the mask (an inactive lane: undefined value on a GPU)");
        res = lanes[src]->value;
        break;
      }
      case detail::kBallot: case detail::kAny: case detail::kAll: {
        unsigned b = 0;
        for (int k = 0; k < 32; ++k)
          if (lanes[k] && lanes[k]->value) b |= 1u << k;
        res = op == detail::kBallot ? b : op == detail::kAny ? (b != 0) : (b == mask);
        break;
      }
      case detail::kSyncWarp: break;
      case detail::kMatchAny: {
        unsigned b = 0;
        for (int k = 0; k < 32; ++k)
          if (lanes[k] && lanes[k]->value == g.value) b |= 1u << k;
        res = b;
        break;
      }
      default: {  // __reduce_*_sync
        const bool sgn = op >= detail::kReduceAddI;
        int64_t acc = 0;
        bool first = true;
        for (int k = 0; k < 32; ++k) {
          if (!lanes[k]) continue;
          const int64_t v = sgn ? int64_t(int32_t(uint32_t(lanes[k]->value))) : int64_t(uint32_t(lanes[k]->value));
          if (op == detail::kReduceAddU || op == detail::kReduceAddI) acc += v;
          else if (op == detail::kReduceMinU || op == detail::kReduceMinI) acc = first ? v : std::min(acc, v);
          else acc = first ? v : std::max(acc, v);
          first = false;
        }
        res = uint64_t(uint32_t(acc));
      }
    }
    g.result = res;
  }
  for (int l = 0; l < 32; ++l)
    if (lanes[l]) lanes[l]->st = St::kRunnable;
}

void fiber_main() {
  Run& r = *tl_run;
  r.body(r.closure);
  Fiber& f = r.fibers[r.cur];
  size_t pending = f.open_copies.size();
  for (const auto& g : f.copy_groups) pending += g.size();
  if (pending)
    fail_fiber(r, who(f) + " exited with " + std::to_string(pending) +
                      " cp.async copies that no cp.async.wait_group retired (their data is never used)");
  f.st = St::kDone;
  switch_ctx(f.ctx, r.sched);
  __builtin_unreachable();
}

// Why the block cannot make progress: every live thread waits and no barrier or collective can
// complete.
std::string explain_deadlock(const Run& r) {
  for (const Fiber& g : r.fibers) {
    if (g.st != St::kWarp) continue;
    std::ostringstream s;
    s << who(g) << " waits at " << op_name(g.op) << " (" << where(g.loc) << ") with mask " << hex(g.mask)
      << ", but";
    for (int l = 0; l < 32; ++l) {
      if (!(g.mask >> l & 1u)) continue;
      const Fiber& h = r.fibers[g.warp * 32 + l];
      if (h.st == St::kDone) {
        s << " lane " << l << " has exited (an inactive lane)";
        return s.str();
      }
      if (h.st == St::kBarrier) {
        s << " lane " << l << " waits at " << barrier_name(h.op) << " (" << where(h.loc)
          << "): divergent warp collective";
        return s.str();
      }
      if (h.st == St::kWarp && (h.mask != g.mask || h.op != g.op)) {
        s << " lane " << l << " waits at " << op_name(h.op) << " (" << where(h.loc) << ") with mask "
          << hex(h.mask);
        return s.str();
      }
    }
    s << " the collective cannot complete";
    return s.str();
  }
  return "deadlock";
}

void run_block(Run& r, const uint3& bidx, std::mt19937_64& rng) {
  const int n = r.nthreads;
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.st = St::kRunnable;
    f.coords.block_idx = bidx;
    f.open_copies.clear();
    f.copy_groups.clear();
    const Stack& s = tl_stacks.stacks[i];
    init_ctx(f.ctx, s.lo, s.size, &fiber_main);
  }
  std::vector<int> order(n);
  for (;;) {
    for (int i = 0; i < n; ++i) order[i] = i;
    if (tl_schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
    if (tl_schedule == Schedule::kRandom) std::shuffle(order.begin(), order.end(), rng);
    for (bool progress = true; progress;) {
      progress = false;
      for (int i : order) {
        Fiber& f = r.fibers[i];
        if (f.st != St::kRunnable) continue;
        r.cur = i;
        detail::tl_coords = &f.coords;
        switch_ctx(r.sched, f.ctx);
        r.cur = -1;
        if (r.aborted) return;
        progress = true;
      }
    }
    int done = 0, at_warp = 0;
    const Fiber* first = nullptr;
    for (const Fiber& f : r.fibers) {
      done += f.st == St::kDone;
      at_warp += f.st == St::kWarp;
      if (f.st == St::kBarrier && !first) first = &f;
    }
    if (done == n) return;
    if (at_warp) return record(r, explain_deadlock(r));
    // Every live thread waits at a barrier (exited threads count as arrived, as on sm_70+).
    int count = 0, live = 0;
    for (const Fiber& f : r.fibers) {
      if (f.st != St::kBarrier) continue;
      if (f.op != first->op || f.loc.line() != first->loc.line() ||
          std::strcmp(f.loc.file_name(), first->loc.file_name()) != 0)
        return record(r, "divergent barrier: " + who(*first) + " waits at " + barrier_name(first->op) + " (" +
                             where(first->loc) + ") while " + who(f) + " waits at " + barrier_name(f.op) +
                             " (" + where(f.loc) + ")");
      count += f.value != 0;
      ++live;
    }
    const uint64_t res = first->op == detail::kBarCount ? count
                         : first->op == detail::kBarAnd ? (count == live)
                                                        : (count > 0);
    for (Fiber& f : r.fibers)
      if (f.st == St::kBarrier) f.result = res, f.st = St::kRunnable;
  }
}

// ---------------------------------------------------------------------------------------------
// Faults inside a kernel: any SIGSEGV/SIGBUS raised while a fiber runs is the kernel's (guard pages
// around every Arena buffer and below every fiber stack make near misses fault). The handler
// records what was hit and switches straight to the scheduler, abandoning the fiber.
std::mutex g_fault_mu;
int g_fault_users = 0;
struct sigaction g_old_segv, g_old_bus;

bool describe_fault_addr(const void* addr, std::string* out);

void on_fault(int sig, siginfo_t* si, void*) {
  Run* r = tl_run;
  if (r != nullptr && r->cur >= 0) {
    std::string what;
    if (!describe_fault_addr(si->si_addr, &what)) {
      char b[64];
      std::snprintf(b, sizeof b, "invalid memory access at address %p", si->si_addr);
      what = b;
    }
    Fiber& f = r->fibers[r->cur];
    record(*r, who(f) + ": " + what);
    switch_ctx(f.ctx, r->sched);  // never returns; the scheduler unblocks the signal
  }
  // Not ours: let the previous handler see the fault when the instruction re-executes.
  sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
}

struct FaultGuard {
  stack_t old_alt{};
  bool own_alt = false;
  std::vector<unsigned char> alt;
  FaultGuard() {
    {
      std::lock_guard<std::mutex> lk(g_fault_mu);
      if (g_fault_users++ == 0) {
        struct sigaction sa {};
        sa.sa_sigaction = &on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
        sigaction(SIGBUS, &sa, &g_old_bus);
      }
    }
    // A fiber's stack overflow faults on its guard page; the handler needs a stack of its own.
    sigaltstack(nullptr, &old_alt);
    if (old_alt.ss_flags & SS_DISABLE) {
      alt.resize(256 * 1024);
      stack_t st{};
      st.ss_sp = alt.data();
      st.ss_size = alt.size();
      own_alt = sigaltstack(&st, nullptr) == 0;
    }
  }
  ~FaultGuard() {
    if (own_alt) {
      stack_t dis{};
      dis.ss_flags = SS_DISABLE;
      sigaltstack(&dis, nullptr);
    }
    std::lock_guard<std::mutex> lk(g_fault_mu);
    if (--g_fault_users == 0) {
      sigaction(SIGSEGV, &g_old_segv, nullptr);
      sigaction(SIGBUS, &g_old_bus, nullptr);
    }
  }
};

}  // namespace

bool describe_fault(const void* addr, std::string* out) {
  for (const Arena* a = tl_arenas; a != nullptr; a = a->prev_)
    if (a->describe(addr, out)) return true;
  // Outside every guarded region: name the nearest buffer, the likely culprit.
  const auto* p = static_cast<const unsigned char*>(addr);
  const Arena::Region* best = nullptr;
  ptrdiff_t best_d = 0;
  for (const Arena* a = tl_arenas; a != nullptr; a = a->prev_)
    for (const Arena::Region& g : a->regions_) {
      const ptrdiff_t d = p < g.data ? g.data - p : p - (g.data + g.bytes);
      if (!best || d < best_d) best = &g, best_d = d;
    }
  if (!best || best_d > (ptrdiff_t(1) << 30)) return false;
  char b[64];
  std::snprintf(b, sizeof b, "invalid memory access at address %p", addr);
  *out = std::string(b) + ", byte offset " + std::to_string(p - best->data) + " of the nearest buffer '" +
         best->name + "' (" + std::to_string(best->bytes) + " bytes)";
  return true;
}

namespace {
bool describe_fault_addr(const void* addr, std::string* out) {
  if (describe_fault(addr, out)) return true;
  if (tl_stacks.is_guard(addr)) {
    *out = "fiber stack overflow (raise RAEKERN_EMU_STACK_KB, default 64)";
    return true;
  }
  return false;
}
}  // namespace

// ---------------------------------------------------------------------------------------------
void set_schedule(Schedule s, uint64_t seed) {
  tl_schedule = s;
  tl_seed = seed;
}
Schedule schedule() { return tl_schedule; }
uint64_t schedule_seed() { return tl_seed; }

namespace detail {

uint64_t warp_op(int op, unsigned mask, uint64_t value, int param, int width, const std::source_location& loc) {
  Run& r = current(op_name(op));
  Fiber& f = r.fibers[r.cur];
  f.loc = loc;
  auto at = [&] { return who(f) + " at " + where(loc) + ": " + op_name(op); };
  if (!(mask >> f.lane & 1u))
    fail_fiber(r, at() + " with mask " + hex(mask) + " does not include the calling lane");
  const unsigned exist = existing_lanes(r, f.warp);
  if (mask & ~exist)
    fail_fiber(r, at() + " with mask " + hex(mask) + " names lanes that do not exist (the block has " +
                      std::to_string(r.nthreads) + " threads; this warp's lanes are " + hex(exist) + ")");
  if (op <= kShflXor && (width < 1 || width > 32 || (width & (width - 1))))
    fail_fiber(r, at() + ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
  f.st = St::kWarp;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.param = param;
  f.width = width;
  try_resolve(r, f.warp, mask, op);
  yield(r, f);
  return f.result;
}

int barrier(int op, int pred, const std::source_location& loc) {
  Run& r = current(barrier_name(op));
  Fiber& f = r.fibers[r.cur];
  f.st = St::kBarrier;
  f.op = op;
  f.value = uint64_t(pred);
  f.loc = loc;
  yield(r, f);
  return int(f.result);
}

unsigned char* dynamic_shared() {
  Run& r = current("dynamic shared memory");
  return reinterpret_cast<unsigned char*>(r.smem.data());
}

bool in_dynamic_shared(const void* p, size_t bytes) {
  const Run& r = current("dynamic shared memory");
  const auto* lo = reinterpret_cast<const unsigned char*>(r.smem.data());
  const auto* a = static_cast<const unsigned char*>(p);
  return a >= lo && a + bytes <= lo + r.smem_bytes;
}

void warp_collective(unsigned mask, const Collective& c, const std::source_location& loc) {
  warp_op(kCollective, mask, reinterpret_cast<uint64_t>(&c), 0, 32, loc);
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes, const std::source_location& loc) {
  Run& r = current("cp.async");
  Fiber& f = r.fibers[r.cur];
  auto bad = [&](const std::string& m) { fail_fiber(r, who(f) + " at " + where(loc) + ": cp.async " + m); };
  if (bytes != 4 && bytes != 8 && bytes != 16) bad("copies 4, 8 or 16 bytes, not " + std::to_string(bytes));
  if (src_bytes < 0 || src_bytes > bytes) bad("source size " + std::to_string(src_bytes) + " outside [0, " +
                                              std::to_string(bytes) + "]");
  if (!in_dynamic_shared(dst, size_t(bytes))) bad("destination is not inside the block's dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % unsigned(bytes) || reinterpret_cast<uintptr_t>(src) % unsigned(bytes))
    bad("addresses must be aligned to the copy size (" + std::to_string(bytes) + " bytes)");
  f.open_copies.push_back({dst, src, bytes, src_bytes});
}

void cp_async_commit() {
  Run& r = current("cp.async.commit_group");
  Fiber& f = r.fibers[r.cur];
  f.copy_groups.push_back(std::move(f.open_copies));
  f.open_copies.clear();
}

void cp_async_wait(int pending, const std::source_location& loc) {
  Run& r = current("cp.async.wait_group");
  Fiber& f = r.fibers[r.cur];
  if (pending < 0) fail_fiber(r, who(f) + " at " + where(loc) + ": cp.async.wait_group with a negative count");
  while (f.copy_groups.size() > size_t(pending)) {
    perform_copies(f.copy_groups.front());
    f.copy_groups.erase(f.copy_groups.begin());
  }
}

void kernel_fail(const std::string& what, const std::source_location& loc) {
  Run& r = current("__trap");
  fail_fiber(r, who(r.fibers[r.cur]) + " at " + where(loc) + ": " + what);
}

void run_grid(dim3 grid, dim3 block, size_t shared_bytes, Body body, const void* closure) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  auto bad = [&](const std::string& m) {
    throw EmulationError("host emulation: invalid launch configuration: " + m + " (grid " +
                         xyz({grid.x, grid.y, grid.z}) + ", block " + xyz({block.x, block.y, block.z}) + ")");
  };
  if (nthreads == 0 || uint64_t(grid.x) * grid.y * grid.z == 0) bad("empty grid or block");
  if (nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) bad("block larger than the CUDA limits");
  if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) bad("grid larger than the CUDA limits");
  if (shared_bytes > 227 * 1024) bad("more than 227 KiB of dynamic shared memory");
  if (tl_run != nullptr) throw EmulationError("host emulation: a kernel launched another kernel (not supported)");

  Run r;
  r.grid = grid;
  r.block = block;
  r.nthreads = int(nthreads);
  r.nwarps = (r.nthreads + 31) / 32;
  r.body = body;
  r.closure = closure;
  r.fibers.resize(r.nthreads);
  r.smem_bytes = shared_bytes;
  r.smem.resize((shared_bytes + kSmemCanary + 15) / 16);
  tl_stacks.ensure(r.nthreads);
  for (int i = 0; i < r.nthreads; ++i) {
    Fiber& f = r.fibers[i];
    f.coords.thread_idx = {unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / (block.x * block.y))};
    f.coords.block_dim = block;
    f.coords.grid_dim = grid;
    f.lane = i % 32;
    f.warp = i / 32;
  }
  std::mt19937_64 rng(tl_seed * 0x9e3779b97f4a7c15ull + 1);

  struct Reset {
    ~Reset() {
      tl_run = nullptr;
      detail::tl_coords = nullptr;
    }
  } reset;
  FaultGuard guard;
  tl_run = &r;
  auto* smem = reinterpret_cast<unsigned char*>(r.smem.data());
  for (unsigned bz = 0; bz < grid.z && !r.aborted; ++bz)
    for (unsigned by = 0; by < grid.y && !r.aborted; ++by)
      for (unsigned bx = 0; bx < grid.x && !r.aborted; ++bx) {
        // Uninitialised shared memory reads as NaN in every float format.
        std::memset(smem, 0xff, r.smem.size() * 16);
        run_block(r, {bx, by, bz}, rng);
        if (r.aborted) break;
        for (size_t i = shared_bytes; i < r.smem.size() * 16; ++i)
          if (smem[i] != 0xff) {
            record(r, "block " + xyz({bx, by, bz}) + " wrote dynamic shared memory at byte " + std::to_string(i) +
                          ", past the " + std::to_string(shared_bytes) + " bytes the launch requested");
            break;
          }
      }
  if (r.aborted) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGSEGV);
    sigaddset(&s, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &s, nullptr);
    throw EmulationError(r.error);
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Guarded buffers.
Arena::Arena() : prev_(tl_arenas) { tl_arenas = this; }

Arena::~Arena() {
  for (Region& g : regions_) munmap(g.map, g.map_len);
  for (Arena** p = &tl_arenas; *p != nullptr; p = &(*p)->prev_)
    if (*p == this) {
      *p = prev_;
      break;
    }
}

void* Arena::alloc(size_t bytes, uintptr_t align_like, const std::string& name, bool poison) {
  constexpr size_t kLead = 256, kTrail = 64;
  const size_t page = page_size(), misalign = align_like % 256;
  // Inaccessible zones of 64 KiB on both sides: a write that jumps a one-page guard lands in whatever
  // the process mapped next to the buffer and corrupts it silently (a test of such a write once
  // passed or failed by chance and crashed a later test in the garbage collector).
  const size_t guard = 16 * page;
  const size_t body = round_up(kLead + 256 + bytes + kTrail, page);
  const size_t map_len = body + 2 * guard;
  auto* map = static_cast<unsigned char*>(
      mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (map == MAP_FAILED) throw EmulationError("host emulation: cannot map buffer '" + name + "'");
  mprotect(map, guard, PROT_NONE);
  mprotect(map + guard + body, guard, PROT_NONE);
  unsigned char* lo = map + guard;
  unsigned char* hi = lo + body;
  // The data ends close to the trailing inaccessible page, so an overrun faults soon after the canary.
  uintptr_t d = (reinterpret_cast<uintptr_t>(hi) - kTrail - bytes) & ~uintptr_t(255);
  d += misalign;
  if (d + bytes > reinterpret_cast<uintptr_t>(hi) - kTrail) d -= 256;
  auto* data = reinterpret_cast<unsigned char*>(d);
  std::memset(lo, 0xff, size_t(data - lo));
  std::memset(data + bytes, 0xff, size_t(hi - data - bytes));
  if (poison) std::memset(data, 0xff, bytes);
  regions_.push_back({map, map_len, data, bytes, lo, hi, name});
  return data;
}

void Arena::check() const {
  for (const Region& g : regions_) {
    for (const unsigned char* p = g.lo; p < g.data; ++p)
      if (*p != 0xff)
        throw EmulationError("host emulation: out-of-range write to buffer '" + g.name + "' (" +
                             std::to_string(g.bytes) + " bytes) at byte offset " +
                             std::to_string(p - g.data) + ", before its start");
    for (const unsigned char* p = g.data + g.bytes; p < g.hi; ++p)
      if (*p != 0xff)
        throw EmulationError("host emulation: out-of-range write to buffer '" + g.name + "' (" +
                             std::to_string(g.bytes) + " bytes) at byte offset " +
                             std::to_string(p - g.data) + ", past its end");
  }
}

bool Arena::describe(const void* addr, std::string* out) const {
  const auto* p = static_cast<const unsigned char*>(addr);
  for (const Region& g : regions_) {
    if (p < g.map || p >= g.map + g.map_len) continue;
    *out = "out-of-range access to buffer '" + g.name + "' (" + std::to_string(g.bytes) +
           " bytes) at byte offset " + std::to_string(p - g.data) +
           (p < g.data ? ", before its start" : ", past its end");
    return true;
  }
  return false;
}

}  // namespace raekern::emu
#endif  // RAEKERN_HOST_EMULATION
