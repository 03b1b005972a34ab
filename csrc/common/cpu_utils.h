// CPU kernel helpers: fp32 math on any storage type, row-parallel loops.
// Kernels compile with -O3 -march=<RAEKERN_CPU_ARCH> and are written so that GCC vectorises the
// inner loops (contiguous fp32 buffers, `#pragma omp simd`); bf16/fp16 are widened to fp32 once per row.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace raekern::cpu {

// Output bytes from which a CPU kernel writes with non-temporal stores: `measured` (the family's
// threshold) unless RAEKERN_CPU_STREAM_BYTES sets another (read at each call, so one process can
// compare both).
inline const char* stream_bytes_setting() {
  const char* e = std::getenv("RAEKERN_CPU_STREAM_BYTES");
  return e && *e ? e : nullptr;
}
inline int64_t stream_threshold(int64_t measured) {
  const char* e = stream_bytes_setting();
  return e ? std::strtoll(e, nullptr, 10) : measured;
}

template <class T> inline float to_f(T v) { return static_cast<float>(v); }
template <> inline float to_f<c10::BFloat16>(c10::BFloat16 v) {
  uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Accumulator type: fp64 stays fp64 (reference precision), everything else accumulates in fp32.
template <class T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <class T> using acc_t = typename Acc<T>::type;

template <class T> inline acc_t<T> widen(T v) { return static_cast<acc_t<T>>(to_f(v)); }
template <> inline double widen<double>(double v) { return v; }

template <class T> inline T narrow(acc_t<T> v) { return static_cast<T>(v); }

// Copy n elements of a (possibly strided) row into a contiguous accumulator buffer.
template <class T>
inline void load_row(const T* __restrict src, int64_t stride, int64_t n, acc_t<T>* __restrict dst) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i * stride]);
  }
}

template <class T>
inline void store_row(const acc_t<T>* __restrict src, int64_t n, T* __restrict dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = narrow<T>(src[i]);
}

// Run f(begin, end) over [0, n) rows with a grain sized so each task moves >= ~64 KiB.
template <class F>
inline void parallel_rows(int64_t n, int64_t bytes_per_row, const F& f) {
  int64_t grain = bytes_per_row > 0 ? std::max<int64_t>(1, (int64_t(1) << 16) / bytes_per_row) : 1;
  at::parallel_for(0, n, grain, f);
}

}  // namespace raekern::cpu
