// Token-major ⇄ channels-first tiles for the CPU kernels that write or read [B, D, H, W] latents.
// A tile is kTile consecutive tokens of one sample held as rows [kTile, D] in the accumulator type;
// in the channels-first tensor the same tile is kTile contiguous values per channel (whole lines).
#pragma once
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/cpu_utils.h"

namespace raekern::fusion::cpu {

constexpr int64_t kTile = 16;

// rsqrt(var + eps) (inverse = false) or sqrt(var + eps), computed once per call and reused by every
// sample instead of a square root per element.
template <class A>
std::vector<A> latent_scale(const A* var, int64_t n, A eps, bool inverse) {
  std::vector<A> out(n);
  A* o = out.data();
  at::parallel_for(0, n, 1 << 14, [&](int64_t lo, int64_t hi) {
    if (inverse) {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) o[i] = A(1) / std::sqrt(var[i] + eps);
    } else {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) o[i] = std::sqrt(var[i] + eps);
    }
  });
  return out;
}

// out[b, d, n0 + t] = (tile[t, d] − shift[d, n0 + t])·scale[d, n0 + t]; out is contiguous [B, D, N].
template <class T, class A>
void store_tile_cf(const A* tile, int64_t tn, int64_t D, int64_t N, int64_t b, int64_t n0, const A* shift,
                   const A* scale, T* out) {
  T* o = out + b * D * N + n0;
  for (int64_t d = 0; d < D; ++d) {
    T* od = o + d * N;
    const A* tc = tile + d;
    if (scale) {
      const A* sc = scale + d * N + n0;
      const A* sh = shift ? shift + d * N + n0 : nullptr;
      for (int64_t t = 0; t < tn; ++t)
        od[t] = raekern::cpu::narrow<T>((tc[t * D] - (sh ? sh[t] : A(0))) * sc[t]);
    } else {
      for (int64_t t = 0; t < tn; ++t) od[t] = raekern::cpu::narrow<T>(tc[t * D]);
    }
  }
}

// tile[t, d] = x[b, d, n0 + t]·scale[d, n0 + t] + shift[d, n0 + t] for a [B, D, H, W] tensor of any
// strides (token n = h·W + w).
template <class T, class A>
void load_tile_cf(const T* x, int64_t sb, int64_t sd, int64_t sh, int64_t sw, int64_t W, int64_t D, int64_t N,
                  int64_t b, int64_t n0, int64_t tn, const A* shift, const A* scale, A* tile) {
  const T* xb = x + b * sb;
  for (int64_t d = 0; d < D; ++d) {
    const T* xd = xb + d * sd;
    const A* sc = scale ? scale + d * N + n0 : nullptr;
    const A* shf = shift ? shift + d * N + n0 : nullptr;
    if (sw == 1 && sh == W) {
      const T* xs = xd + n0;
      for (int64_t t = 0; t < tn; ++t) {
        A v = raekern::cpu::widen(xs[t]);
        if (sc) v *= sc[t];
        if (shf) v += shf[t];
        tile[t * D + d] = v;
      }
    } else {
      for (int64_t t = 0; t < tn; ++t) {
        const int64_t n = n0 + t;
        A v = raekern::cpu::widen(xd[(n / W) * sh + (n % W) * sw]);
        if (sc) v *= sc[t];
        if (shf) v += shf[t];
        tile[t * D + d] = v;
      }
    }
  }
}

}  // namespace raekern::fusion::cpu
