// Dynamic task distribution for the fusion CPU kernels. at::parallel_for hands each thread a fixed
// 1/T share of the range up front; on a shared machine a preempted thread then stalls the whole op
// until it gets its core back. Here threads claim small chunks from a shared counter, so a thread
// that is descheduled delays only the chunk it holds and the others take over the rest.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace raekern::fusion::cpu {

// Runs f(lo, hi) over [0, n) in chunks of at least min_grain items, about 8 chunks per thread.
// f may allocate per call (scratch rows): chunks stay few enough for that to be negligible.
template <class F>
void parallel_tasks(int64_t n, int64_t min_grain, const F& f) {
  if (n <= 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t grain = std::max<int64_t>({int64_t(1), min_grain, n / (8 * threads)});
  if (threads == 1 || n <= grain || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t lo = next.fetch_add(grain); lo < n; lo = next.fetch_add(grain)) f(lo, std::min(n, lo + grain));
  });
}

}  // namespace raekern::fusion::cpu
