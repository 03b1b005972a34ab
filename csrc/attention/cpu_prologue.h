// The per-token prologue of attention on the CPU: per-head RMSNorm of q/k (learnable [Dh] weight)
// followed by RAE's 2-D RoPE, applied while a row is copied into a packed fp32/fp64 panel, and its
// exact backward. RoPE: the first Dh/2 channels rotate with the token's grid row, the second Dh/2
// with its column; pair (2p, 2p+1) of each half uses frequency θ^(-2p/(Dh/2)); tokens with index
// >= grid_h·grid_w are left unrotated.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common/cpu_utils.h"
#include "common/cpu_vec_math.h"  // also silences GCC 12's intrinsic false positives (see there)

namespace raekern::attention::cpu {

template <class C> struct RopeTable {
  int64_t gh = 0, gw = 0, half = 0;  // half = Dh/2 channels rotated by one position
  // Per position and channel of a half: cos, and sin signed for the pair partner, so that
  // y[i] = x[i]·cos[i] + x[i^1]·sin[i] (interleaved pairs (2p, 2p+1) share angle p).
  std::vector<C> cr, sr, cc, sc;  // [gh][half] by row, [gw][half] by column

  RopeTable(int64_t h, int64_t w, int64_t D, double theta) : gh(h), gw(w), half(D / 2) {
    if (gh == 0) return;
    const int64_t npair = D / 4;
    std::vector<double> f(npair);
    for (int64_t p = 0; p < npair; ++p) f[p] = std::pow(theta, -double(2 * p) / double(D / 2));
    auto fill = [&](int64_t n, std::vector<C>& c, std::vector<C>& s) {
      c.resize(n * half);
      s.resize(n * half);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t p = 0; p < npair; ++p) {
          const double cs = std::cos(double(i) * f[p]), sn = std::sin(double(i) * f[p]);
          c[i * half + 2 * p] = c[i * half + 2 * p + 1] = C(cs);
          s[i * half + 2 * p] = C(-sn);
          s[i * half + 2 * p + 1] = C(sn);
        }
    };
    fill(gh, cr, sr);
    fill(gw, cc, sc);
    fc.resize(gh * gw * D);
    fs.resize(gh * gw * D);
    for (int64_t t = 0; t < gh * gw; ++t)
      for (int64_t i = 0; i < D; ++i) {
        const bool by_row = i < half;
        const int64_t at = by_row ? (t / gw) * half + i : (t % gw) * half + i - half;
        fc[t * D + i] = by_row ? cr[at] : cc[at];
        fs[t * D + i] = by_row ? sr[at] : sc[at];
      }
  }
  bool rotates(int64_t token) const { return gh > 0 && token < gh * gw; }
  // The whole row's tables of a rotated token (both halves), for a single vector pass.
  const C* row_cos(int64_t token) const { return &fc[token * 2 * half]; }
  const C* row_sin(int64_t token) const { return &fs[token * 2 * half]; }

 private:
  std::vector<C> fc, fs;  // [gh·gw][Dh]
};

// Rotate (sign = 1) or un-rotate (sign = -1) n channels of interleaved pairs.
template <class C>
inline void rotate_half(C* __restrict x, const C* __restrict c, const C* __restrict s, int64_t n, C sign) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<C, float>) {
    const __m512 sg = _mm512_set1_ps(sign);
    raekern::cpu::for16(n, [&](int64_t i, __mmask16 mk) {
      const __m512 v = raekern::cpu::load16(x + i, mk);
      const __m512 sw = _mm512_permute_ps(v, 0xB1);  // swap the two members of every pair
      const __m512 r = _mm512_fmadd_ps(v, raekern::cpu::load16(c + i, mk),
                                       _mm512_mul_ps(sg, _mm512_mul_ps(sw, raekern::cpu::load16(s + i, mk))));
      raekern::cpu::store16(x + i, r, mk);
    });
    return;
  }
#endif
  for (int64_t p = 0; p < n; p += 2) {
    const C a = x[p], b = x[p + 1];
    x[p] = a * c[p] + sign * b * s[p];
    x[p + 1] = b * c[p + 1] + sign * a * s[p + 1];
  }
}

template <class C>
inline void apply_rope(C* x, int64_t D, const RopeTable<C>& t, int64_t token, C sign) {
  if (!t.rotates(token)) return;
  const int64_t row = token / t.gw, col = token % t.gw, h = t.half;
  rotate_half(x, &t.cr[row * h], &t.sr[row * h], h, sign);
  rotate_half(x + D / 2, &t.cc[col * h], &t.sc[col * h], h, sign);
}

// Widen one row of storage type T to the compute type (bf16 via a 16-bit shift, 16 lanes at a time).
template <class T, class C> inline void widen_row(const T* __restrict src, int64_t D, C* __restrict dst) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<C, float>) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(src);
    raekern::cpu::for16(D, [&](int64_t i, __mmask16 mk) {
      const __m512i w = _mm512_cvtepu16_epi32(raekern::cpu::load16_bits(u + i, mk));
      raekern::cpu::store16(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), mk);
    });
    return;
  }
#endif
  for (int64_t i = 0; i < D; ++i) dst[i] = C(raekern::cpu::widen(src[i]));
}

template <class C> inline C inv_rms(const C* __restrict x, int64_t D, C eps) {
  C ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  return C(1) / std::sqrt(ss / C(D) + eps);
}

#if defined(RAEKERN_CPU_VEC16)
constexpr int64_t kVecMaxD = 256;  // rows the register prologue holds (16 zmm)
using raekern::cpu::tail_mask;
template <class T> inline constexpr bool kVecPrologue = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// mul · rope(norm(src)) of one fp32/bf16 row held in registers: x[v] = channels [16v, 16v + 16), lanes
// past D zero; returns the vector count. One pass, where a copy followed by separate norm, RoPE and
// scaling passes over the row stalls on each pass's tail store.
template <class T>
inline int64_t prologue_vec(const T* __restrict src, int64_t D, const float* __restrict w, float eps,
                            const RopeTable<float>& rope, int64_t token, float mul, __m512* x) {
  const int64_t nv = (D + 15) / 16;
  for (int64_t v = 0; v < nv; ++v) x[v] = raekern::cpu::load16(src + 16 * v, tail_mask(D - 16 * v));
  if (w) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t v = 0; v < nv; ++v) ss = _mm512_fmadd_ps(x[v], x[v], ss);
    const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / float(D) + eps));
    for (int64_t v = 0; v < nv; ++v)
      x[v] = _mm512_mul_ps(x[v], _mm512_mul_ps(r, raekern::cpu::load16(w + 16 * v, tail_mask(D - 16 * v))));
  }
  if (rope.rotates(token)) {
    const float *c = rope.row_cos(token), *s = rope.row_sin(token);
    for (int64_t v = 0; v < nv; ++v) {
      const __mmask16 mk = tail_mask(D - 16 * v);
      const __m512 sw = _mm512_permute_ps(x[v], 0xB1);  // the pair partner of every lane
      x[v] = _mm512_fmadd_ps(x[v], raekern::cpu::load16(c + 16 * v, mk),
                             _mm512_mul_ps(sw, raekern::cpu::load16(s + 16 * v, mk)));
    }
  }
  if (mul != 1.f)
    for (int64_t v = 0; v < nv; ++v) x[v] = _mm512_mul_ps(x[v], _mm512_set1_ps(mul));
  return nv;
}
#endif

// dst[0..D) = mul · rope(norm(src)); `w` is nullptr when there is no QK-norm.
template <class T, class C>
inline void prologue_row(const T* __restrict src, int64_t D, const C* __restrict w, C eps,
                         const RopeTable<C>& rope, int64_t token, C mul, C* __restrict dst) {
#if defined(RAEKERN_CPU_VEC16)
  if constexpr (std::is_same_v<C, float> && kVecPrologue<T>) {
    if (D <= kVecMaxD) {
      __m512 x[kVecMaxD / 16];
      const int64_t nv = prologue_vec(src, D, w, eps, rope, token, mul, x);
      for (int64_t v = 0; v < nv; ++v) raekern::cpu::store16(dst + 16 * v, x[v], tail_mask(D - 16 * v));
      return;
    }
  }
#endif
  widen_row(src, D, dst);
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
    widen_row(src, D, xbuf);
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
