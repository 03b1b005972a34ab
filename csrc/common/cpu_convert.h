// Row conversions between storage types and fp32/fp64 accumulator buffers, explicitly vectorised
// (AVX-512 / AVX2+F16C when compiled for them). GCC does not vectorise c10::BFloat16's scalar
// rounding, so without these a bf16 kernel runs its conversions one element at a time.
// Rounding matches c10: round-to-nearest-even, NaN stays NaN.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
// GCC 12 reports its own AVX-512 intrinsics as "maybe uninitialized" once inlined (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "common/cpu_utils.h"

namespace raekern::cpu {

// dst[i] = float(src[i * stride]) for i < n.
template <class T>
inline void widen_row(const T* __restrict src, int64_t stride, int64_t n, acc_t<T>* __restrict dst) {
  load_row(src, stride, n, dst);
}

template <class T>
inline void narrow_row(const acc_t<T>* __restrict src, int64_t n, T* __restrict dst) {
  store_row(src, n, dst);
}

namespace detail {
inline uint16_t bf16_bits_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
#if defined(__AVX2__)
// 8 fp32 lanes -> bf16 bits, the same rounding. packus saturates at 0xffff, above every rounded value.
inline __m128i bf16_bits8(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                               _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
  r = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), _mm256_set1_epi32(0x7fc0),
                         _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
#endif
}  // namespace detail

template <>
inline void widen_row<c10::BFloat16>(const c10::BFloat16* __restrict src, int64_t stride, int64_t n,
                                     float* __restrict dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u = uint32_t(s[i * stride]) << 16;
      std::memcpy(dst + i, &u, 4);
    }
    return;
  }
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; i + 16 <= n; i += 16) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
  if (i < n) {
    __mmask16 m = __mmask16((1u << (n - i)) - 1);
    __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + i));
    _mm512_mask_storeu_ps(dst + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    return;
  }
#elif defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
#endif
  for (; i < n; ++i) {
    uint32_t u = uint32_t(s[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

template <>
inline void narrow_row<c10::BFloat16>(const float* __restrict src, int64_t n,
                                      c10::BFloat16* __restrict dst) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  for (; i + 16 <= n; i += 16) {
    __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), reinterpret_cast<__m256i&>(v));
  }
  if (i < n) {
    __mmask16 m = __mmask16((1u << (n - i)) - 1);
    __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i));
    _mm256_mask_storeu_epi16(d + i, m, reinterpret_cast<__m256i&>(v));
    return;
  }
#elif defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
  const __m512i qnan = _mm512_set1_epi32(0x7fc0);
  for (; i + 16 <= n; i += 16) {
    __m512 f = _mm512_loadu_ps(src + i);
    __m512i u = _mm512_castps_si512(f);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, bias), _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
    r = _mm512_srli_epi32(r, 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), qnan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtepi32_epi16(r));
  }
#elif defined(__AVX2__)
  // 8 lanes at a time: the scalar loop cost a bf16 kernel on an AVX2 CPU more than its arithmetic.
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), detail::bf16_bits8(_mm256_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) d[i] = detail::bf16_bits_rne(src[i]);
}

template <>
inline void widen_row<c10::Half>(const c10::Half* __restrict src, int64_t stride, int64_t n,
                                 float* __restrict dst) {
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
    return;
  }
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_maskz_cvtph_ps(__mmask16(0xffff),  // maskz: GCC 12 warns on the unmasked form
                                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void narrow_row<c10::Half>(const float* __restrict src, int64_t n, c10::Half* __restrict dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_maskz_cvtps_ph(__mmask16(0xffff), _mm512_loadu_ps(src + i),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}


// 16 lanes of fp32 loaded from / stored to any storage type, with a lane mask for row tails.
// Kernels write their hot row loops with these when RAEKERN_CPU_VEC16 is defined.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define RAEKERN_CPU_VEC16 1
// Mask of the first `left` of 16 lanes; 0 when nothing is left.
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// Full masks take the plain load / store. Zen 5 streams zero-masking loads with a run-time mask at
// half the rate of plain ones even when every lane is set (x + g*y over 28 MB on 2 cores: 37 vs 74
// GB/s, 2026-12-02); the branch is predictable and costs nothing measurable on Zen 4 or Intel.
inline __m256i load16_bits(const void* p, __mmask16 m) {
  return m == __mmask16(0xffff) ? _mm256_loadu_si256(static_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
}
// f(i, mask) over [0, n) in steps of 16: the full steps with a constant all-lanes mask (so the masked
// loads and stores of an inlined body fold to plain ones), then the tail.
template <class F>
__attribute__((always_inline)) inline void for16(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) f(i, __mmask16(0xffff));
  if (i < n) f(i, tail_mask(n - i));
}

template <class T> inline __m512 load16(const T* p, __mmask16 m);
template <> inline __m512 load16<float>(const float* p, __mmask16 m) {
  return m == __mmask16(0xffff) ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
template <> inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p, __mmask16 m) {
  __m512i v = _mm512_cvtepu16_epi32(load16_bits(p, m));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
template <> inline __m512 load16<c10::Half>(const c10::Half* p, __mmask16 m) {
  return _mm512_maskz_cvtph_ps(__mmask16(0xffff), load16_bits(p, m));
}

inline float hsum16(__m512 v) { return _mm512_reduce_add_ps(v); }

// fp32 lanes -> 16-bit storage bits (round to nearest even).
inline __m256i bf16_bits(__m512 f) {
#if defined(__AVX512BF16__)
  __m256bh v = _mm512_cvtneps_pbh(f);
  return reinterpret_cast<__m256i&>(v);
#else
  __m512i u = _mm512_castps_si512(f);
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                               _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  r = _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q),
                            _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

inline void store16_bits(void* p, __m256i bits, __mmask16 m) {
  if (m == __mmask16(0xffff)) _mm256_storeu_si256(static_cast<__m256i*>(p), bits);
  else _mm256_mask_storeu_epi16(p, m, bits);
}
// The storage bits of 16 fp32 lanes as a 16-bit type (round to nearest even).
template <class T> inline __m256i store_bits16(__m512 v);
template <> inline __m256i store_bits16<c10::BFloat16>(__m512 v) { return bf16_bits(v); }
template <> inline __m256i store_bits16<c10::Half>(__m512 v) {
  return _mm512_maskz_cvtps_ph(__mmask16(0xffff), v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <class T> inline void store16(T* p, __m512 v, __mmask16 m) { store16_bits(p, store_bits16<T>(v), m); }
template <> inline void store16<float>(float* p, __m512 v, __mmask16 m) {
  if (m == __mmask16(0xffff)) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, m, v);
}

// Non-temporal store of 16 full lanes (no read-for-ownership of the destination line): for outputs
// far larger than the caches. p must be 64-byte (fp32) / 32-byte (16-bit types) aligned; callers
// issue _mm_sfence() before other threads may read the data.
template <class T> inline void stream16(T* p, __m512 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), store_bits16<T>(v));
}
template <> inline void stream16<float>(float* p, __m512 v) { _mm512_stream_ps(p, v); }
// store16, or stream16 for a full vector when `stream` (its start cache-line aligned for fp32).
template <class T> inline void put16(T* p, __m512 v, __mmask16 m, bool stream) {
  if (stream && m == __mmask16(0xffff)) stream16(p, v);
  else store16(p, v, m);
}

// The value v takes once stored as T (identity for fp32).
template <class T> inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(v)), 16));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_maskz_cvtph_ps(__mmask16(0xffff),
                                 _mm512_maskz_cvtps_ph(__mmask16(0xffff), v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// 8 lanes of fp32 loaded from / stored to any storage type: the AVX2 counterpart of load16 /
// store16 for kernels with an 8-lane path (full vectors; the overloads with a count serve row tails).
#define RAEKERN_CPU_VEC8 1
template <class T> inline __m256 load8(const T* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
template <> inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <class T> inline void store8(T* p, __m256 v);
template <> inline void store8<float>(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
template <> inline void store8<c10::BFloat16>(c10::BFloat16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), detail::bf16_bits8(v));
}
template <> inline void store8<c10::Half>(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// One 64-byte line, 64 / sizeof(T) channels as 8-lane vectors v[0..], written with non-temporal
// stores; p 64-byte aligned, callers fence (_mm_sfence) before other threads read it.
template <class T> inline void stream_line8(T* p, const __m256* v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v[0]);
    _mm256_stream_ps(p + 8, v[1]);
  } else {
    const auto bits = [](__m256 x) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) return detail::bf16_bits8(x);
      else return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    };
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_set_m128i(bits(v[1]), bits(v[0])));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p + 16), _mm256_set_m128i(bits(v[3]), bits(v[2])));
  }
}
// The first min(left, 8) lanes, the others zero (AVX-512's masked forms; row tails only, through a
// small stack copy since AVX2 has no masked 16-bit loads).
template <class T> inline __m256 load8(const T* p, int64_t left) {
  if (left >= 8) return load8(p);
  T t[8] = {};
  std::memcpy(t, p, std::max<int64_t>(left, 0) * sizeof(T));
  return load8(t);
}
template <class T> inline void store8(T* p, __m256 v, int64_t left) {
  if (left >= 8) return store8(p, v);
  T t[8];
  store8(t, v);
  std::memcpy(p, t, std::max<int64_t>(left, 0) * sizeof(T));
}
// All ones in the first min(left, 8) lanes: the masked arithmetic of a row tail.
inline __m256 lanes_below(int64_t left) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(left, 8))), iota));
}
inline float hsum8(__m256 v) {
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}
// The value v takes once stored as T (identity for fp32).
template <class T> inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(detail::bf16_bits8(v)), 16));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}
#endif

}  // namespace raekern::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
