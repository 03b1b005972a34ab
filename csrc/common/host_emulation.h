// Host emulation of the CUDA SIMT execution model, so that a kernel header (<op>_kernel.cuh, which
// includes only common/simt.cuh) compiles under the host C++ compiler and runs on the CPU in tests.
//
// Model (see docs/emu.md):
// - emulate_launch(kernel, grid, block, shared_bytes, args...) runs the blocks one after another; the
//   threads of a block are fibers (one stack each, cooperative switching on the calling OS thread).
// - A fiber runs until it reaches a synchronisation point: __syncthreads*, __syncwarp, a warp shuffle,
//   vote or __reduce_*_sync, or its end. Barriers are real: a thread waits until every live thread of
//   the block has arrived at the same __syncthreads. Warp collectives are rendezvous of the lanes in
//   the mask; a lane outside the mask, a lane that exited, a lane that does not exist or a mask
//   mismatch is reported as an error instead of yielding an undefined value.
// - Between two barriers the threads run in an order chosen by the schedule (forward, reverse, or a
//   seeded random permutation, re-drawn after each barrier), so a missing barrier produces a wrong
//   result in at least one schedule, reproducibly.
// - Dynamic shared memory is per block, filled with 0xFF bytes (NaN in every float format) before each
//   block and followed by a canary; static __shared__ variables are per OS thread and keep whatever the
//   previous block left in them (on a GPU they hold garbage).
// - Global memory: launchers copy tensors into guarded buffers (emu::Arena, common/emulation_torch.h)
//   whose neighbourhood is poisoned, canary-checked after the launch and bounded by inaccessible pages;
//   an out-of-range access becomes an EmulationError (RuntimeError in Python), not silent corruption.
// - Atomics are trivially atomic: nothing preempts a fiber between two synchronisation points.
//
// - sm80 tensor-core instructions (common/tensor_core.cuh): mma.sync m16n8k16 and ldmatrix are warp
//   collectives computed from every lane's fragments (PTX ISA layouts); cp.async copies are queued per
//   thread and land at the wait_group that retires them.
//
// Not emulated (verified on a GPU only): wgmma, TMA, clusters, other inline PTX, texture/surface
// memory, cooperative-groups grid sync.
#pragma once
#include <math.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Keywords and qualifiers.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Per OS thread = per block, since the threads of a block are fibers of one OS thread.
#define __shared__ static thread_local
#define __constant__ static
#define __grid_constant__

// ---------------------------------------------------------------------------------------------
// Built-in vector types (the subset kernels use; alignment as in CUDA).
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Runtime interface (implemented in common/emulation_runtime_emu.cpp).
namespace raekern::emu {

// Every failure the emulation detects; the launchers let it propagate (RuntimeError in Python).
struct EmulationError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Schedule { kForward, kReverse, kRandom };
// Thread order between barriers for later launches on this OS thread (tests run several).
void set_schedule(Schedule s, uint64_t seed = 0);
Schedule schedule();
uint64_t schedule_seed();

namespace detail {

struct Coords {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
// The running fiber's coordinates; switched by the scheduler.
inline thread_local const Coords* tl_coords = nullptr;

enum WarpOp : int {
  kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp,
  kReduceAddU, kReduceMinU, kReduceMaxU, kReduceAddI, kReduceMinI, kReduceMaxI, kMatchAny, kCollective,
};
enum BarrierOp : int { kBarSync, kBarCount, kBarAnd, kBarOr };

uint64_t warp_op(int op, unsigned mask, uint64_t value, int param, int width, const std::source_location& loc);
int barrier(int op, int pred, const std::source_location& loc);
unsigned char* dynamic_shared();
// Whether [p, p + bytes) lies inside this block's dynamic shared memory.
bool in_dynamic_shared(const void* p, size_t bytes);

// A warp-wide instruction whose result in each lane depends on the operands of other lanes
// (tensor-core mma.sync, ldmatrix): every lane of `mask` posts its operands `in`; once all have
// arrived, fn(lane, ins, out) runs for every lane (ins[k]: lane k's operands, nullptr outside the
// mask) before any lane continues, so the operands are read while every poster is still waiting.
// fn reports a misuse by setting *error. Lanes that meet at different instructions (different fn)
// are a divergent collective.
struct Collective {
  const char* name;
  void (*fn)(int lane, const void* const* ins, void* out, std::string* error);
  const void* in;
  void* out;
};
void warp_collective(unsigned mask, const Collective& c, const std::source_location& loc);

// cp.async: each thread's copies are queued and performed at the cp.async.wait_group that retires
// their group, the latest point the PTX memory model allows, so reading the destination before that
// wait (or, from another thread, before the barrier after it) sees the old contents (NaN).
void cp_async(void* smem_dst, const void* src, int bytes, int src_bytes, const std::source_location& loc);
void cp_async_commit();
void cp_async_wait(int pending, const std::source_location& loc);
[[noreturn]] void kernel_fail(const std::string& what, const std::source_location& loc);

using Body = void (*)(const void* closure);
void run_grid(dim3 grid, dim3 block, size_t shared_bytes, Body body, const void* closure);

template <class T> inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp collectives move <= 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T> inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace detail

inline unsigned char* dynamic_shared() { return detail::dynamic_shared(); }

// Runs `kernel(args...)` on a grid of blocks as `kernel<<<grid, block, shared_bytes>>>(args...)` would.
// Arguments are converted to the kernel's parameter types once, as a CUDA launch does.
template <class... P, class... A>
void emulate_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "emulate_launch: wrong number of kernel arguments");
  struct Closure {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  const Closure c{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  detail::run_grid(
      grid, block, shared_bytes,
      [](const void* p) {
        const auto* cl = static_cast<const Closure*>(p);
        std::apply(cl->kernel, cl->args);  // each thread gets its own copy of the parameters
      },
      &c);
}

// Guarded global memory: each allocation sits between poisoned canary bytes and inaccessible pages.
// check() reports any canary that changed (an out-of-range write) naming the buffer; an access that
// reaches an inaccessible page during a launch aborts that launch with an EmulationError.
class Arena {
 public:
  Arena();
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  // `bytes` of storage whose address is congruent to `align_like` modulo 256 (so a view keeps the
  // alignment its tensor has), poisoned with 0xFF when `poison`, else uninitialised.
  void* alloc(size_t bytes, uintptr_t align_like, const std::string& name, bool poison);
  void check() const;  // throws EmulationError naming the first buffer whose canary changed
  // The buffer and byte offset an address belongs to (guards included), for error messages.
  bool describe(const void* addr, std::string* out) const;

  struct Region {
    unsigned char* map;
    size_t map_len;
    unsigned char* data;
    size_t bytes;
    unsigned char* lo;  // first canary byte (after the leading 64 KiB inaccessible zone)
    unsigned char* hi;  // one past the last canary byte (start of the trailing 64 KiB inaccessible zone)
    std::string name;
  };

 private:
  std::vector<Region> regions_;
  Arena* prev_;  // arenas alive on this thread, for the fault handler
  friend bool describe_fault(const void* addr, std::string* out);
};

}  // namespace raekern::emu

#define threadIdx (::raekern::emu::detail::tl_coords->thread_idx)
#define blockIdx (::raekern::emu::detail::tl_coords->block_idx)
#define blockDim (::raekern::emu::detail::tl_coords->block_dim)
#define gridDim (::raekern::emu::detail::tl_coords->grid_dim)

// ---------------------------------------------------------------------------------------------
// Synchronisation.
inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  ::raekern::emu::detail::barrier(::raekern::emu::detail::kBarSync, 0, loc);
}
inline int __syncthreads_count(int pred, std::source_location loc = std::source_location::current()) {
  return ::raekern::emu::detail::barrier(::raekern::emu::detail::kBarCount, pred != 0, loc);
}
inline int __syncthreads_and(int pred, std::source_location loc = std::source_location::current()) {
  return ::raekern::emu::detail::barrier(::raekern::emu::detail::kBarAnd, pred != 0, loc);
}
inline int __syncthreads_or(int pred, std::source_location loc = std::source_location::current()) {
  return ::raekern::emu::detail::barrier(::raekern::emu::detail::kBarOr, pred != 0, loc);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
  ::raekern::emu::detail::warp_op(::raekern::emu::detail::kSyncWarp, mask, 0, 0, warpSize, loc);
}
// Memory is coherent on the host and nothing preempts a fiber: fences only stop compiler reordering.
inline void __threadfence() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_signal_fence(std::memory_order_seq_cst); }
// Not emulated: on hardware it is the lanes converged at this instruction, which fibers that only
// meet at synchronisation points cannot tell (it would depend on the schedule). No kernel uses it.
[[noreturn]] inline unsigned __activemask(std::source_location loc = std::source_location::current()) {
  ::raekern::emu::detail::kernel_fail("__activemask() is not emulated (use an explicit mask)", loc);
}
[[noreturn]] inline void __trap(std::source_location loc = std::source_location::current()) {
  ::raekern::emu::detail::kernel_fail("__trap() called", loc);
}

// ---------------------------------------------------------------------------------------------
// Warp shuffles, votes and reductions: rendezvous of the lanes in `mask`.
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return d::from_bits<T>(d::warp_op(d::kShflIdx, mask, d::to_bits(var), src_lane, width, loc));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return d::from_bits<T>(d::warp_op(d::kShflUp, mask, d::to_bits(var), int(delta), width, loc));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return d::from_bits<T>(d::warp_op(d::kShflDown, mask, d::to_bits(var), int(delta), width, loc));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return d::from_bits<T>(d::warp_op(d::kShflXor, mask, d::to_bits(var), lane_mask, width, loc));
}
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return unsigned(d::warp_op(d::kBallot, mask, pred != 0, 0, warpSize, loc));
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return int(d::warp_op(d::kAny, mask, pred != 0, 0, warpSize, loc));
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return int(d::warp_op(d::kAll, mask, pred != 0, 0, warpSize, loc));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return unsigned(d::warp_op(d::kReduceAddU, mask, v, 0, warpSize, loc));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return unsigned(d::warp_op(d::kReduceMinU, mask, v, 0, warpSize, loc));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return unsigned(d::warp_op(d::kReduceMaxU, mask, v, 0, warpSize, loc));
}
inline int __reduce_add_sync(unsigned mask, int v, std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return int(d::warp_op(d::kReduceAddI, mask, uint32_t(v), 0, warpSize, loc));
}
inline int __reduce_min_sync(unsigned mask, int v, std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return int(d::warp_op(d::kReduceMinI, mask, uint32_t(v), 0, warpSize, loc));
}
inline int __reduce_max_sync(unsigned mask, int v, std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return int(d::warp_op(d::kReduceMaxI, mask, uint32_t(v), 0, warpSize, loc));
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v, std::source_location loc = std::source_location::current()) {
  namespace d = ::raekern::emu::detail;
  return unsigned(d::warp_op(d::kMatchAny, mask, d::to_bits(v), 0, warpSize, loc));
}

// ---------------------------------------------------------------------------------------------
// Atomics. No fiber switch can happen inside one, so a plain read-modify-write is atomic.
template <class T> inline T raekern_emu_atomic_rmw_(T* p, T v, T (*f)(T, T)) {
  const T old = *p;
  *p = f(old, v);
  return old;
}
#define RAEKERN_EMU_ATOMIC(NAME, T, EXPR) \
  inline T NAME(T* p, T v) { return raekern_emu_atomic_rmw_<T>(p, v, [](T a, T b) -> T { return EXPR; }); }
RAEKERN_EMU_ATOMIC(atomicAdd, int, a + b)
RAEKERN_EMU_ATOMIC(atomicAdd, unsigned, a + b)
RAEKERN_EMU_ATOMIC(atomicAdd, unsigned long long, a + b)
RAEKERN_EMU_ATOMIC(atomicAdd, float, a + b)
RAEKERN_EMU_ATOMIC(atomicAdd, double, a + b)
RAEKERN_EMU_ATOMIC(atomicSub, int, a - b)
RAEKERN_EMU_ATOMIC(atomicSub, unsigned, a - b)
RAEKERN_EMU_ATOMIC(atomicMax, int, a > b ? a : b)
RAEKERN_EMU_ATOMIC(atomicMax, unsigned, a > b ? a : b)
RAEKERN_EMU_ATOMIC(atomicMax, long long, a > b ? a : b)
RAEKERN_EMU_ATOMIC(atomicMax, unsigned long long, a > b ? a : b)
RAEKERN_EMU_ATOMIC(atomicMin, int, a < b ? a : b)
RAEKERN_EMU_ATOMIC(atomicMin, unsigned, a < b ? a : b)
RAEKERN_EMU_ATOMIC(atomicMin, long long, a < b ? a : b)
RAEKERN_EMU_ATOMIC(atomicMin, unsigned long long, a < b ? a : b)
RAEKERN_EMU_ATOMIC(atomicExch, int, b)
RAEKERN_EMU_ATOMIC(atomicExch, unsigned, b)
RAEKERN_EMU_ATOMIC(atomicExch, unsigned long long, b)
RAEKERN_EMU_ATOMIC(atomicExch, float, b)
RAEKERN_EMU_ATOMIC(atomicOr, int, a | b)
RAEKERN_EMU_ATOMIC(atomicOr, unsigned, a | b)
RAEKERN_EMU_ATOMIC(atomicAnd, int, a & b)
RAEKERN_EMU_ATOMIC(atomicAnd, unsigned, a & b)
RAEKERN_EMU_ATOMIC(atomicXor, int, a ^ b)
RAEKERN_EMU_ATOMIC(atomicXor, unsigned, a ^ b)
#undef RAEKERN_EMU_ATOMIC
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  const unsigned old = *p;
  *p = old >= limit ? 0u : old + 1u;
  return old;
}
template <class T> inline T raekern_emu_cas_(T* p, T compare, T val) {
  const T old = *p;
  if (old == compare) *p = val;
  return old;
}
inline int atomicCAS(int* p, int c, int v) { return raekern_emu_cas_(p, c, v); }
inline unsigned atomicCAS(unsigned* p, unsigned c, unsigned v) { return raekern_emu_cas_(p, c, v); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c, unsigned long long v) {
  return raekern_emu_cas_(p, c, v);
}
inline unsigned short atomicCAS(unsigned short* p, unsigned short c, unsigned short v) {
  return raekern_emu_cas_(p, c, v);
}

// ---------------------------------------------------------------------------------------------
// Loads and stores with cache hints: plain accesses here.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------------------------
// Math intrinsics: the fast-math variants are computed exactly here (tests compare with tolerances
// that cover the GPU's approximations).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x), *c = std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(std::max(x, 0.0f), 1.0f); }
inline float exp10f(float x) { return std::pow(10.0f, x); }
inline int __float2int_rn(float x) { return int(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline unsigned __float2uint_rn(float x) { return unsigned(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline int __float_as_int(float x) { return ::raekern::emu::detail::from_bits<int>(::raekern::emu::detail::to_bits(x)); }
inline unsigned __float_as_uint(float x) { return ::raekern::emu::detail::from_bits<unsigned>(::raekern::emu::detail::to_bits(x)); }
inline float __int_as_float(int x) { return ::raekern::emu::detail::from_bits<float>(::raekern::emu::detail::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::raekern::emu::detail::from_bits<float>(::raekern::emu::detail::to_bits(x)); }
inline long long __double_as_longlong(double x) { return ::raekern::emu::detail::from_bits<long long>(::raekern::emu::detail::to_bits(x)); }
inline double __longlong_as_double(long long x) { return ::raekern::emu::detail::from_bits<double>(::raekern::emu::detail::to_bits(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return int((int64_t(a) * b) >> 32); }
// CUDA's global min/max overloads (device code calls them unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 storage types with CUDA's conversion functions. As in raekern's CUDA build
// (__CUDA_NO_HALF_CONVERSIONS__ / _OPERATORS__), there are no implicit conversions or operators:
// a kernel that compiles here uses only what also compiles under nvcc.
struct alignas(2) __half {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
using half = __half;
using half2 = __half2;
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

// aarch64 GCC < 13 has no _Float16 in C++; its __fp16 is the same IEEE binary16 storage format.
#if defined(__aarch64__)
using emu_binary16 = __fp16;
#else
using emu_binary16 = _Float16;
#endif
inline float __half2float(__half h) {
  emu_binary16 f;
  std::memcpy(&f, &h.__x, 2);
  return float(f);
}
inline __half __float2half_rn(float v) {
  const emu_binary16 f = static_cast<emu_binary16>(v);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.__x, &f, 2);
  return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = uint32_t(b.__x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  __nv_bfloat16 b;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    b.__x = 0x7fff;  // canonical NaN, as the hardware converts
  } else {
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    b.__x = static_cast<unsigned short>(bits >> 16);
  }
  return b;
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline __half __double2half(double v) { return __float2half_rn(float(v)); }
inline __nv_bfloat16 __double2bfloat16(double v) { return __float2bfloat16_rn(float(v)); }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return {__float2half_rn(a), __float2half_rn(a)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline __half __low2half(__half2 v) { return v.x; }
inline __half __high2half(__half2 v) { return v.y; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }
// Arithmetic rounds once per operation, as the hardware does (fp32 holds the exact sum/product).
#define RAEKERN_EMU_HALF_BINOP(NAME, EXPR)                                                        \
  inline __half NAME(__half a_, __half b_) {                                                      \
    const float a = __half2float(a_), b = __half2float(b_);                                       \
    return __float2half_rn(EXPR);                                                                 \
  }                                                                                               \
  inline __nv_bfloat16 NAME(__nv_bfloat16 a_, __nv_bfloat16 b_) {                                 \
    const float a = __bfloat162float(a_), b = __bfloat162float(b_);                               \
    return __float2bfloat16_rn(EXPR);                                                             \
  }
RAEKERN_EMU_HALF_BINOP(__hadd, a + b)
RAEKERN_EMU_HALF_BINOP(__hsub, a - b)
RAEKERN_EMU_HALF_BINOP(__hmul, a * b)
RAEKERN_EMU_HALF_BINOP(__hdiv, a / b)
RAEKERN_EMU_HALF_BINOP(__hmax, fmaxf(a, b))
RAEKERN_EMU_HALF_BINOP(__hmin, fminf(a, b))
#undef RAEKERN_EMU_HALF_BINOP
inline __half __hfma(__half a, __half b, __half c) {
  return __float2half_rn(float(double(__half2float(a)) * __half2float(b) + __half2float(c)));
}
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __float2bfloat16_rn(float(double(__bfloat162float(a)) * __bfloat162float(b) + __bfloat162float(c)));
}
inline __half2 __hadd2(__half2 a, __half2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
