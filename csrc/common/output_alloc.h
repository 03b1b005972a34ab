// Allocation of op outputs and scratch: at::empty, plus a transparent-huge-page hint for large fresh
// CPU buffers.
//
// Why: glibc serves allocations above its mmap threshold (which never exceeds 32 MiB on 64-bit) with a
// new mapping, and freeing returns it to the kernel. Every call of an op with such an output then
// takes one page fault per 4 KiB on first write: 12,800 faults, ~15 ms for a 50 MB output on the
// development VM, several times the kernel itself. With MADV_HUGEPAGE on the 2 MiB-aligned interior
// the same first touch costs ~500 faults (~3.9 ms including the write). PyTorch does the same for
// all of its CPU allocations only when THP_MEM_ALLOC_ENABLE=1 is set; raekern does it for its own
// large outputs by default. The hint is a no-op where THP is 'never', on non-Linux hosts and for
// non-CPU tensors, so headers shared with CUDA launchers can call it unconditionally.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cstdint>

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

// at::empty for buffers the op is about to write in full (a plain signature, so braced size lists work).
inline at::Tensor empty_output(at::IntArrayRef size, const at::TensorOptions& options) {
  at::Tensor t = at::empty(size, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace raekern
