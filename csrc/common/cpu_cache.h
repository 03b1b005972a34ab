// What the CPU kernels need to know about the host's caches, read once.
#pragma once
#include <cstdint>
#include <cstdio>

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

}  // namespace raekern::cpu
