// Vectorised 2^x for the softmax (the scores are kept in log2 units, so exp becomes exp2).
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>

#include "common/cpu_vec_math.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
// GCC 12 reports the intrinsics' own _mm512_undefined_ps() operands as maybe-uninitialized once
// they are inlined here (a known false positive); only the attention CPU units include this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace raekern::attention::cpu {

#if defined(__AVX512F__)
// Horizontal reductions by halving (GCC 12's _mm512_reduce_* trip -Wmaybe-uninitialized).
inline float hsum(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}
inline float hmax(__m512 v) {
  const __m256 a = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_max_ps(b, _mm_movehl_ps(b, b));
  b = _mm_max_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}

// 2^x = 2^floor(x) · 2^f with f = x − floor(x) ∈ [0, 1): vreduceps gives f in one instruction and
// vscalefps applies 2^floor(x) to the polynomial (coefficients highest degree first, relative-error
// fits on [0, 1)), so there is no separate rounding, subtraction or exponent-bit arithmetic. Inputs
// are clamped at -160, so -inf and anything whose result would be below the denormals give exactly 0.
// The clamp is max(-160, x): vmaxps returns its second operand when either is NaN, so a NaN score (a
// NaN in q or k) stays NaN and reaches the output, as in SDPA, instead of becoming a zero weight.
template <size_t N> inline __m512 exp2_horner(__m512 x, const float (&c)[N]) {
  x = _mm512_max_ps(_mm512_set1_ps(-160.f), x);
  const __m512 f = _mm512_reduce_ps(x, 0x09);  // x − floor(x): round down, exceptions suppressed
  __m512 p = _mm512_set1_ps(c[0]);
  for (size_t i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, x);
}

// Degree 5: error < 8e-8.
inline __m512 exp2_ps(__m512 x) {
  static constexpr float c[] = {1.8762329452e-03f, 8.9925840313e-03f, 5.5823604462e-02f,
                                2.4015452989e-01f, 6.9315296818e-01f, 9.9999992692e-01f};
  return exp2_horner(x, c);
}

// s·mul rounded to fp32 before anything is subtracted from it, in the running max (lazy_max_update16)
// and in the exponents alike: a fused s·mul − m (which GCC forms from a plain mul and sub under its
// default -ffp-contract=fast) keeps the exact product, which differs from the rounded max by up to half
// an ulp, 512 at scores near 1e10: the largest probability becomes 2^-512 = 0 (or 2^512), and a row
// whose probabilities are all 0 gives 0/0. The empty asm makes the product opaque to the optimiser,
// so it is never fused (GCC lowers even _mm512_mul_round_ps with round-to-nearest to a plain, fusable
// multiply).
inline __m512 mul_rounded(__m512 a, __m512 b) {
  __m512 p = _mm512_mul_ps(a, b);
  asm("" : "+v"(p));
  return p;
}

// At bf16 precision, for probabilities that are rounded to bf16 before the P·V product: degree 4,
// error < 2.7e-6 (bf16 keeps 2^-9).
inline __m512 exp2_ps_bf16(__m512 x) {
  static constexpr float c[] = {1.3520603197e-02f, 5.2037428774e-02f, 2.4142749325e-01f, 6.9300662066e-01f,
                                1.0000025181e+00f};
  return exp2_horner(x, c);
}
#endif

// p[i] = 2^(s[i] - sub) for i < n; returns Σ p. Generic over fp32 / fp64.
template <class F> inline F exp2_shift_sum(F* __restrict s, int64_t n, F sub) {
  F sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp2(s[i] - sub);
    sum += s[i];
  }
  return sum;
}

#if defined(__AVX512F__)
// p = 2^(s − sub) in place for i < n; returns a + Σ p, still as 16 lanes.
inline __m512 exp2_shift_lanes(float* __restrict s, int64_t n, float sub, __m512 a) {
  const __m512 vs = _mm512_set1_ps(sub);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + i), vs));
    _mm512_storeu_ps(s + i, p);
    a = _mm512_add_ps(a, p);
  }
  if (i < n) {
    const __mmask16 mk = __mmask16((1u << (n - i)) - 1u);
    const __m512 p = exp2_ps(_mm512_sub_ps(raekern::cpu::load16(s + i, mk), vs));
    raekern::cpu::store16(s + i, p, mk);
    a = _mm512_add_ps(a, _mm512_maskz_mov_ps(mk, p));
  }
  return a;
}
template <> inline float exp2_shift_sum<float>(float* __restrict s, int64_t n, float sub) {
  return hsum(exp2_shift_lanes(s, n, sub, _mm512_setzero_ps()));
}
#endif

// The running row sum l of the online softmax, kept as kSumLanes partial sums that are reduced
// once per row at the end instead of once per key block.
template <class F> constexpr int kSumLanes = 1;
template <class F> inline void exp2_shift_acc(F* __restrict s, int64_t n, F sub, F* __restrict acc) {
  acc[0] += exp2_shift_sum(s, n, sub);
}
#if defined(__AVX512F__)
template <> constexpr int kSumLanes<float> = 16;
template <> inline void exp2_shift_acc<float>(float* __restrict s, int64_t n, float sub, float* __restrict acc) {
  _mm512_storeu_ps(acc, exp2_shift_lanes(s, n, sub, _mm512_loadu_ps(acc)));
}
#endif
#if defined(RAEKERN_CPU_VEC8)
// AVX2 + FMA: 2^x = 2^floor(x) · p(x − floor(x)) with the AVX-512 path's polynomial, scaled by
// cpu::scalef8 (valid for floor(x) in [-160, 63]). The clamps keep NaN (max/min return their second
// operand when either is NaN); x never exceeds 63 here (scores minus a running max that trails the
// true max by at most kLazyMax).
inline __m256 exp2_ps8(__m256 x) {
  static constexpr float c[] = {1.8762329452e-03f, 8.9925840313e-03f, 5.5823604462e-02f,
                                2.4015452989e-01f, 6.9315296818e-01f, 9.9999992692e-01f};
  x = _mm256_min_ps(_mm256_set1_ps(63.f), _mm256_max_ps(_mm256_set1_ps(-160.f), x));
  const __m256 fl = _mm256_floor_ps(x), f = _mm256_sub_ps(x, fl);
  __m256 p = _mm256_set1_ps(c[0]);
  for (size_t i = 1; i < std::size(c); ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c[i]));
  return raekern::cpu::scalef8(p, fl);
}

// p = 2^(s − sub) in place for i < n; returns a + Σ p as 8 lanes.
inline __m256 exp2_shift_lanes8(float* __restrict s, int64_t n, float sub, __m256 a) {
  const __m256 vs = _mm256_set1_ps(sub);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 p = exp2_ps8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vs));
    _mm256_storeu_ps(s + i, p);
    a = _mm256_add_ps(a, p);
  }
  if (i < n) {
    alignas(32) float t[8] = {};
    for (int64_t j = i; j < n; ++j) t[j - i] = std::exp2(s[j] - sub);
    for (int64_t j = i; j < n; ++j) s[j] = t[j - i];
    a = _mm256_add_ps(a, _mm256_load_ps(t));
  }
  return a;
}
template <> inline float exp2_shift_sum<float>(float* __restrict s, int64_t n, float sub) {
  return raekern::cpu::hsum8(exp2_shift_lanes8(s, n, sub, _mm256_setzero_ps()));
}
template <> constexpr int kSumLanes<float> = 8;
template <> inline void exp2_shift_acc<float>(float* __restrict s, int64_t n, float sub, float* __restrict acc) {
  _mm256_storeu_ps(acc, exp2_shift_lanes8(s, n, sub, _mm256_loadu_ps(acc)));
}
#endif
template <class F> inline F lanes_sum(const F* acc) {
  F t = 0;
  for (int i = 0; i < kSumLanes<F>; ++i) t += acc[i];
  return t;
}

#if defined(__AVX512BF16__)
// Like exp2_shift_sum with the scores still unscaled: p = 2^(mul·s − sub), at bf16 precision. p (n
// rounded up to 32 with zeros) is written as bf16 for the tile product and the 16 lane sums are added
// to acc16 (the caller reduces them once per row, not once per key block).
inline void exp2_shift_acc_bf16(const float* __restrict s, int64_t n, int64_t n32, float mul, float sub,
                                uint16_t* __restrict p, float* __restrict acc16) {
  const __m512 vm = _mm512_set1_ps(mul), vs = _mm512_set1_ps(sub);
  __m512 acc = _mm512_loadu_ps(acc16);
  for (int64_t i = 0; i < n32; i += 16) {
    __m512 e = exp2_ps_bf16(_mm512_sub_ps(mul_rounded(_mm512_loadu_ps(s + i), vm), vs));
    if (i + 16 > n) e = _mm512_maskz_mov_ps(n > i ? __mmask16((1u << (n - i)) - 1u) : __mmask16(0), e);
    acc = _mm512_add_ps(acc, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), (__m256i)_mm512_cvtneps_pbh(e));
  }
  _mm512_storeu_ps(acc16, acc);
}
#endif

// Online softmax with a lazy running max: m moves only when a key block's max exceeds it by more
// than kLazyMax (log2 units), so after the first blocks the O and l rescale is skipped; the
// probabilities 2^(s − m) then stay below 2^kLazyMax, harmless in fp32 and bf16 alike.
// Returns the factor for O and l (1: nothing to rescale); m = -inf (first block) gives 0.
constexpr float kLazyMax = 8.f;
template <class F> inline F lazy_max_update(F& m, F block_max) {
  if (block_max <= m + F(kLazyMax)) return F(1);
  const F alpha = std::exp2(m - block_max);
  m = block_max;
  return alpha;
}

#if defined(__AVX512F__)
// lazy_max_update for 16 score rows at once (rows i·lds, n >= 1 columns, scores times `mul`): the 16
// row maxima come out of one register transpose instead of 16 horizontal reductions, whose latency
// the softmax would otherwise wait on row after row. m[0, 16) is updated; alpha[0, 16) receives the
// factors (exactly 1 for rows whose max did not move). Returns false when no row moved.
// A negative `mul` (a negative softmax scale) turns the largest scaled score into the smallest raw one.
template <bool kNegMul> inline __m512 extreme_ps(__m512 a, __m512 b) {
  return kNegMul ? _mm512_min_ps(a, b) : _mm512_max_ps(a, b);
}
template <bool kNegMul>
inline __m512 row_extremes16(const float* s, int64_t lds, int64_t n) {
  __m512 r[16];
  const __mmask16 tail = (n % 16) ? __mmask16((1u << (n % 16)) - 1u) : __mmask16(0xffff);
  const int64_t last = (n - 1) / 16 * 16;
  const __m512 fill = _mm512_set1_ps(kNegMul ? INFINITY : -INFINITY);
  for (int i = 0; i < 16; ++i) {
    const float* row = s + i * lds;
    __m512 v = _mm512_mask_loadu_ps(fill, tail, row + last);
    for (int64_t j = 0; j < last; j += 16) v = extreme_ps<kNegMul>(v, _mm512_loadu_ps(row + j));
    r[i] = v;
  }
  raekern::cpu::transpose16(r);
  for (int i = 1; i < 16; ++i) r[0] = extreme_ps<kNegMul>(r[0], r[i]);
  return r[0];
}
inline bool lazy_max_update16(const float* s, int64_t lds, int64_t n, float mul, float* m, float* alpha) {
  const __m512 ext = mul < 0.f ? row_extremes16<true>(s, lds, n) : row_extremes16<false>(s, lds, n);
  const __m512 bm = mul_rounded(ext, _mm512_set1_ps(mul)), mo = _mm512_loadu_ps(m);
  const __mmask16 moved = _mm512_cmp_ps_mask(bm, _mm512_add_ps(mo, _mm512_set1_ps(kLazyMax)), _CMP_NLE_UQ);
  if (!moved) return false;
  const __m512 mn = _mm512_mask_mov_ps(mo, moved, bm);
  _mm512_storeu_ps(m, mn);
  _mm512_storeu_ps(alpha, _mm512_mask_mov_ps(_mm512_set1_ps(1.f), moved, exp2_ps(_mm512_sub_ps(mo, mn))));
  return true;
}
#endif

template <class F> inline F row_max(const F* __restrict s, int64_t n) {
  F m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = s[i] > m ? s[i] : m;
  return m;
}

#if defined(__AVX512F__)
template <> inline float row_max<float>(const float* __restrict s, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + i));
  if (i < n) {
    const __mmask16 mk = __mmask16((1u << (n - i)) - 1u);
    m = _mm512_mask_max_ps(m, mk, m, raekern::cpu::load16(s + i, mk));
  }
  return hmax(m);
}
#endif
#if !defined(__AVX512F__) && defined(__AVX2__)
template <> inline float row_max<float>(const float* __restrict s, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + i));
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = t[0];
  for (int l = 1; l < 8; ++l) r = t[l] > r ? t[l] : r;
  for (; i < n; ++i) r = s[i] > r ? s[i] : r;
  return r;
}
#endif

}  // namespace raekern::attention::cpu
