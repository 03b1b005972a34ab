// Allocation of op outputs and scratch: at::empty, except that large CPU outputs come from a small
// cache of blocks this library keeps (and hints for transparent huge pages).
//
// Why: glibc serves allocations above its mmap threshold (which never exceeds 32 MiB on 64-bit) with a
// new mapping, and freeing returns it to the kernel. Every call of an op with such an output then
// takes one page fault per 4 KiB on first write, and the kernel zeroes every page first: 12,800
// faults, ~15 ms for a 50 MB output on the development VM, several times the kernel itself. With
// MADV_HUGEPAGE the faults drop to ~500 but the zeroing stays, an extra write pass over the output
// (a 32 MiB guidance step output: 9.1 ms per call against 3.9 ms from reused memory, 2-core Xeon,
// 2026-12-02). So outputs of at least kLargeOutputBytes come from LargeBlockCache: a freed block is
// kept (up to RAEKERN_CPU_OUTPUT_CACHE_MB in all, default 1024; 0 turns the cache off) and handed to
// the next output of about its size, as a sampler's steps ask for every step. PyTorch does neither
// for its own CPU tensors (THP only with THP_MEM_ALLOC_ENABLE=1). raekern.release_cpu_output_cache()
// gives the cached blocks back. Non-CPU tensors are untouched, so headers shared with CUDA launchers
// can call empty_output unconditionally.
#pragma once
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <map>
#include <new>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace raekern {

// Below this the buffer usually comes from memory the process already touched (glibc's heap), where
// the hint would only split mappings.
constexpr int64_t kHugePageHintBytes = int64_t(32) << 20;

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!t.defined() || !t.device().is_cpu() || int64_t(t.nbytes()) < kHugePageHintBytes) return;
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advisory only
#else
  (void)t;
#endif
}

// Large CPU buffers, cached. Blocks are 2 MiB multiples, 2 MiB aligned (whole huge pages); a request
// takes the smallest cached block that fits and is at most a quarter larger than it needs.
class LargeBlockCache final : public c10::Allocator {
 public:
  static LargeBlockCache& get() {
    static LargeBlockCache* cache = new LargeBlockCache();  // never destroyed: tensors may outlive statics
    return *cache;
  }
  c10::DataPtr allocate(size_t n) override {
    const size_t size = round_up(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 4) {
        p = it->second;
        cached_ -= it->first;
        const size_t got = it->first;
        free_.erase(it);
        return make(p, got);
      }
    }
    if (posix_memalign(&p, kAlign, size) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)madvise(p, size, MADV_HUGEPAGE);  // advisory only
#endif
    return make(p, size);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
  // Frees every cached block; returns the bytes given back.
  int64_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t bytes = int64_t(cached_);
    for (auto& kv : free_) std::free(kv.second);
    free_.clear();
    cached_ = 0;
    return bytes;
  }
  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return int64_t(cached_);
  }
  bool enabled() const { return limit_ > 0; }

 private:
  static constexpr size_t kAlign = size_t(1) << 21;
  struct Block {
    void* base;
    size_t size;
  };
  LargeBlockCache() {
    const char* e = std::getenv("RAEKERN_CPU_OUTPUT_CACHE_MB");
    limit_ = (e && *e ? size_t(std::strtoull(e, nullptr, 10)) : size_t(1024)) << 20;
  }
  static size_t round_up(size_t n) { return (std::max<size_t>(n, 1) + kAlign - 1) / kAlign * kAlign; }
  c10::DataPtr make(void* p, size_t size) {
    return {p, new Block{p, size}, &LargeBlockCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }
  static void give_back(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    LargeBlockCache& c = get();
    {
      std::lock_guard<std::mutex> lock(c.mu_);
      if (c.cached_ + b->size <= c.limit_) {
        c.free_.emplace(b->size, b->base);
        c.cached_ += b->size;
        b->base = nullptr;
      }
    }
    if (b->base) std::free(b->base);
    delete b;
  }
  std::mutex mu_;
  std::multimap<size_t, void*> free_;  // size -> block
  size_t cached_ = 0, limit_ = 0;
};

// Outputs from this size on come from LargeBlockCache (below it glibc's heap reuses memory already).
constexpr int64_t kLargeOutputBytes = kHugePageHintBytes;

// at::empty for buffers the op is about to write in full (a plain signature, so braced size lists work).
inline at::Tensor empty_output(at::IntArrayRef size, const at::TensorOptions& options) {
  if (options.device().is_cpu() && options.layout() == c10::kStrided && !options.pinned_memory()) {
    int64_t n = c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
    for (const int64_t s : size) n *= s;
    if (n >= kLargeOutputBytes && LargeBlockCache::get().enabled())
      return at::detail::empty_generic(size, &LargeBlockCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       c10::typeMetaToScalarType(options.dtype()),
                                       options.memory_format_opt());
  }
  at::Tensor t = at::empty(size, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace raekern
