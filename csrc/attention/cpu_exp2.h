// Vectorised 2^x for the softmax (the scores are kept in log2 units, so exp becomes exp2).
#pragma once
#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
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

// 2^x = 2^round(x) · 2^f, |f| <= 1/2; degree-6 Taylor of e^(f·ln2): relative error < 1.3e-7.
// Inputs below -127 (including -inf) return 0 exactly.
inline __m512 exp2_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-127.f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));
  const __m512 r = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, r);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(live, p, r);
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
template <> inline float exp2_shift_sum<float>(float* __restrict s, int64_t n, float sub) {
  const __m512 vs = _mm512_set1_ps(sub);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + i), vs));
    _mm512_storeu_ps(s + i, p);
    acc = _mm512_add_ps(acc, p);
  }
  if (i < n) {
    const __mmask16 mk = __mmask16((1u << (n - i)) - 1u);
    const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + i), vs));
    _mm512_mask_storeu_ps(s + i, mk, p);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(mk, p));
  }
  return hsum(acc);
}
#endif

#if defined(__AVX512BF16__)
// Like exp2_shift_sum, but writes p rounded to bf16 (n rounded up to 32 with zeros) in one pass.
inline float exp2_shift_sum_bf16(const float* __restrict s, int64_t n, int64_t n32, float sub,
                                 uint16_t* __restrict p) {
  const __m512 vs = _mm512_set1_ps(sub);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n32; i += 16) {
    const __mmask16 mk = n - i >= 16 ? __mmask16(0xffff) : n > i ? __mmask16((1u << (n - i)) - 1u) : 0;
    const __m512 e = _mm512_maskz_mov_ps(mk, exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + i), vs)));
    acc = _mm512_add_ps(acc, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return hsum(acc);
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
    m = _mm512_mask_max_ps(m, mk, m, _mm512_maskz_loadu_ps(mk, s + i));
  }
  return hmax(m);
}
#endif

}  // namespace raekern::attention::cpu
