// Transcendentals on 16 fp32 lanes (AVX-512; 8 lanes on AVX2-only builds) for the CPU kernels. GCC
// does not vectorise libm calls without -ffast-math, and it leaves even a hand-written scalar polynomial scalar once the
// loop holds a select and a floor: a kernel whose elementwise tail calls tanh then runs at a few
// GB/s however its memory loops are written. These follow the scalar Cephes schemes operation by
// operation (same constants, same range split), so a vector and a scalar tail agree to 1-2 ulp.
#pragma once
#include "common/cpu_convert.h"

// GCC 12 reports the intrinsics' own _mm512_undefined_ps() operands (max, roundscale, cvtps_epi32,
// the reductions, and as plainly uninitialized the unpack/shuffle operands of transpose16) once they
// are inlined into a kernel (GCC bug 105593, a false positive). The warning fires where the kernel is
// compiled, so this covers the including unit.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#if defined(RAEKERN_CPU_VEC16)
namespace raekern::cpu {

// e^x for x <= 0 (clamped at -87, where e^x leaves the normal range): Cephes expf, n = round(x/ln2),
// r = x − n·ln2 in two parts, degree-5 polynomial, scaled by 2^n through the exponent bits.
inline __m512 exp_neg16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.f), x);  // operand order: a NaN x passes through (vmaxps returns the second)
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

// tanh: odd polynomial below |x| = 0.625, (1 − e)/(1 + e) with e = e^(−2|x|) above, sign restored.
inline __m512 tanh16(__m512 x) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(int(0x80000000u)));
  const __m512 a = _mm512_andnot_ps(sign, x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
  const __m512 e = exp_neg16(_mm512_mul_ps(_mm512_set1_ps(-2.f), a));
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 big = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __m512 big_signed = _mm512_or_ps(big, _mm512_and_ps(sign, x));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ), big_signed, small);
}

// In-register transpose of a 16×16 fp32 block: r[i] lane j becomes r[j] lane i. Three stages of
// in-lane shuffles (unpack, shuffle_ps) and two of 128-bit lane shuffles, 64 shuffles in all.
inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + c], 128-bit lane k: rows 4g..4g+3 of column 4k + c.
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 xe = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), xo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 ye = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 yo = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(xe, ye, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(xe, ye, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(xo, yo, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(xo, yo, 0xDD);
  }
}

}  // namespace raekern::cpu
#elif defined(RAEKERN_CPU_VEC8)
namespace raekern::cpu {

// In-register transpose of an 8×8 fp32 block (AVX2): r[i] lane j becomes r[j] lane i. Unpacks and
// in-lane shuffles within each 128-bit half, then the halves swapped across (24 shuffles).
inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 2; ++g) {
    u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

// p·2^n for integral n in [-160, 63] (AVX2 has no vscalefps): 2^(n+64) is a normal number and the
// product with it exact; the final 2^-64 rounds a result in the denormal range once, as scalef does.
inline __m256 scalef8(__m256 p, __m256 n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127 + 64)), 23);
  return _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(0x1p-64f));
}

// exp_neg16 / tanh16 on 8 lanes (AVX2 + FMA builds), operation by operation.
inline __m256 exp_neg8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.f), x);  // a NaN x passes through (vmaxps returns the second operand)
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

inline __m256 tanh8(__m256 x) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(int(0x80000000u)));
  const __m256 a = _mm256_andnot_ps(sign, x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  const __m256 e = exp_neg8(_mm256_mul_ps(_mm256_set1_ps(-2.f), a));
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 big = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  const __m256 big_signed = _mm256_or_ps(big, _mm256_and_ps(sign, x));
  return _mm256_blendv_ps(big_signed, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}

}  // namespace raekern::cpu
#endif

namespace raekern::cpu {
// Software prefetch of the 64-byte lines in [p, p + bytes): for rows that start a new 4 KiB page,
// where the hardware streamer stops and has to be trained again. For a destination, prefetchw also
// takes the line in exclusive state, so the store that follows does not wait for ownership.
inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}
inline void prefetchw_lines(void* p, int64_t bytes) {
  char* c = static_cast<char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 1, 3);
}
}  // namespace raekern::cpu
