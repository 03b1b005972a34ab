// The per-token prologue of attention on the CPU: per-head RMSNorm of q/k (learnable [Dh] weight)
// followed by RAE's 2-D RoPE, applied while a row is copied into a packed fp32/fp64 panel, and its
// exact backward. RoPE: the first Dh/2 channels rotate with the token's grid row, the second Dh/2
// with its column; pair (2p, 2p+1) of each half uses frequency θ^(-2p/(Dh/2)); tokens with index
// >= grid_h·grid_w are left unrotated.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/cpu_utils.h"

namespace raekern::attention::cpu {

template <class C> struct RopeTable {
  int64_t gh = 0, gw = 0, npair = 0;  // npair = Dh/4 pairs per half
  std::vector<C> cr, sr, cc, sc;      // [gh][npair] by row, [gw][npair] by column

  RopeTable(int64_t h, int64_t w, int64_t D, double theta) : gh(h), gw(w), npair(D / 4) {
    if (gh == 0) return;
    std::vector<double> f(npair);
    for (int64_t p = 0; p < npair; ++p) f[p] = std::pow(theta, -double(2 * p) / double(D / 2));
    auto fill = [&](int64_t n, std::vector<C>& c, std::vector<C>& s) {
      c.resize(n * npair);
      s.resize(n * npair);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t p = 0; p < npair; ++p) {
          c[i * npair + p] = C(std::cos(double(i) * f[p]));
          s[i * npair + p] = C(std::sin(double(i) * f[p]));
        }
    };
    fill(gh, cr, sr);
    fill(gw, cc, sc);
  }
  bool rotates(int64_t token) const { return gh > 0 && token < gh * gw; }
};

// Rotate (or, with sign = -1, un-rotate) one half of a row by the angles of one table row.
template <class C>
inline void rotate_half(C* __restrict x, const C* __restrict c, const C* __restrict s, int64_t npair,
                        C sign) {
#pragma omp simd
  for (int64_t p = 0; p < npair; ++p) {
    const C a = x[2 * p], b = x[2 * p + 1], sn = sign * s[p];
    x[2 * p] = a * c[p] - b * sn;
    x[2 * p + 1] = b * c[p] + a * sn;
  }
}

template <class C>
inline void apply_rope(C* x, int64_t D, const RopeTable<C>& t, int64_t token, C sign) {
  if (!t.rotates(token)) return;
  const int64_t row = token / t.gw, col = token % t.gw, np = t.npair;
  rotate_half(x, &t.cr[row * np], &t.sr[row * np], np, sign);
  rotate_half(x + D / 2, &t.cc[col * np], &t.sc[col * np], np, sign);
}

template <class C> inline C inv_rms(const C* __restrict x, int64_t D, C eps) {
  C ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  return C(1) / std::sqrt(ss / C(D) + eps);
}

// dst[0..D) = mul · rope(norm(src)); `w` is nullptr when there is no QK-norm.
template <class T, class C>
inline void prologue_row(const T* __restrict src, int64_t D, const C* __restrict w, C eps,
                         const RopeTable<C>& rope, int64_t token, C mul, C* __restrict dst) {
  for (int64_t i = 0; i < D; ++i) dst[i] = C(raekern::cpu::widen(src[i]));
  C m = mul;
  if (w) {
    const C r = inv_rms(dst, D, eps);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) dst[i] *= r * w[i];
  }
  apply_rope(dst, D, rope, token, C(1));
  if (m != C(1)) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) dst[i] *= m;
  }
}

// Given g = dL/d(prologue output) / mul (in place, destroyed), write dL/dsrc to dx and add
// the row's contribution to the norm weight gradient dw.
template <class T, class C>
inline void prologue_row_backward(const T* __restrict src, int64_t D, const C* __restrict w, C eps,
                                  const RopeTable<C>& rope, int64_t token, C mul, C* __restrict g,
                                  C* __restrict xbuf, C* __restrict dw, T* __restrict dx) {
  if (mul != C(1)) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) g[i] *= mul;
  }
  apply_rope(g, D, rope, token, C(-1));
  if (w) {
    for (int64_t i = 0; i < D; ++i) xbuf[i] = C(raekern::cpu::widen(src[i]));
    const C r = inv_rms(xbuf, D, eps);
    C dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < D; ++i) dot += g[i] * w[i] * xbuf[i];
    const C k = r * r * r * dot / C(D);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) {
      dw[i] += g[i] * xbuf[i] * r;
      g[i] = r * w[i] * g[i] - k * xbuf[i];
    }
  }
  for (int64_t i = 0; i < D; ++i) dx[i] = static_cast<T>(g[i]);
}

}  // namespace raekern::attention::cpu
