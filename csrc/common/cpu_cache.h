// What the CPU kernels need to know about the host's caches, read once.
#pragma once
#include <cstdint>
#include <cstdio>
#include <vector>

#include "common/cpu_utils.h"

namespace raekern::cpu {

// True on AMD x86 CPUs: where a streaming-store default was measured to differ between Sapphire
// Rapids and Zen 4, the family's rule depends on it.
inline bool cpu_is_amd() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
#else
  return false;
#endif
}

// Bytes of the L3 cache that CPU 0 shares (sysfs, as lscpu reads it), or 0 when unknown. Not
// sysconf(_SC_LEVEL3_CACHE_SIZE): on a Zen 4 EPYC it reported the socket's 320 MB, where one core
// reaches its CCD's 32 MB.
inline int64_t llc_bytes() {
  static const int64_t bytes = [] {
    int64_t b = 0;
    if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long v = 0;
      char unit = 0;
      if (std::fscanf(f, "%ld%c", &v, &unit) >= 1 && v > 0)
        b = int64_t(v) * (unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : unit == 'G' ? 1024 * 1024 * 1024 : 1);
      std::fclose(f);
    }
    return b;
  }();
  return bytes;
}

// Whether output rows that are written once and never read back by the op go around the caches
// (non-temporal stores): out_bytes in all, at least the family's measured threshold, and either
// beyond half the last-level cache or RAEKERN_CPU_STREAM_BYTES set; every row starts on a cache line
// (row_bytes a multiple of 64 and each output's start aligned). Saves the read-for-ownership of each
// line: a third of the traffic of a kernel that reads as much as it writes.
inline bool stream_rows(int64_t out_bytes, int64_t row_bytes, int64_t measured, const std::vector<const void*>& starts) {
  if (row_bytes % 64 != 0 || out_bytes < stream_threshold(measured)) return false;
  if (!stream_bytes_setting() && 2 * out_bytes <= llc_bytes()) return false;
  for (const void* p : starts)
    if (reinterpret_cast<uintptr_t>(p) % 64 != 0) return false;
  return true;
}

}  // namespace raekern::cpu
