// Row functions of the layer_stack_fuse CPU kernels, one set per instruction set: AVX-512 (16 lanes)
// and AVX2 + FMA (8 lanes, CPUs without AVX-512); neither exists on other builds, where the drivers in
// layer_stack_fuse_cpu.cpp take row_math.h's generic loops. Each works on one layer row read from
// storage: the LayerNorm moments (forward, layer-major), one token of the token-major forward, and the
// LayerNorm backward writing the row's gradient.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/cpu_convert.h"
#include "common/cpu_vec_math.h"

namespace raekern::fusion::cpu {

#if defined(RAEKERN_CPU_VEC16)
using raekern::cpu::load16;
using raekern::cpu::tail_mask;

// LayerNorm moments of a row read from storage, by row_moments' two passes: returns the shift x[0]
// and gives the mean of x − x[0] and rstd. With `buf`, the first pass also keeps x − x[0] there (fp32)
// for the caller and the second pass reads it back; without, the second pass re-reads the row (in L1
// after the first), for the token-major forward that reads each row once more anyway. The reductions
// keep four independent partial vectors: with one, each 16-lane add waits for the previous one
// (4-cycle latency), and the LayerNorm, not memory, bounds the layer fusion. `next`: the row read
// after this one, prefetched over the first pass.
template <class T>
inline float row_moments_vec(const T* __restrict src, int64_t D, float eps, float* __restrict buf, float& mean,
                             float& rstd, const T* next) {
  const float x0 = raekern::cpu::to_f(src[0]);
  const __m512 shift = _mm512_set1_ps(x0);
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    if (next) raekern::cpu::prefetch_lines(next + d, 64 * int64_t(sizeof(T)));
    for (int j = 0; j < 4; ++j) {
      const __m512 v = _mm512_sub_ps(load16(src + d + 16 * j, 0xffff), shift);
      if (buf) _mm512_storeu_ps(buf + d + 16 * j, v);
      a[j] = _mm512_add_ps(a[j], v);
    }
  }
  for (; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 v = _mm512_maskz_sub_ps(m, load16(src + d, m), shift);
    if (buf) raekern::cpu::store16(buf + d, v, m);
    a[0] = _mm512_add_ps(a[0], v);
  }
  const float mu = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]))) / float(D);
  const __m512 vm = _mm512_set1_ps(mu);
  // x − x[0] again: from buf, or recomputed from the row (the same fp32 value either way).
  const auto shifted = [&](int64_t i, __mmask16 m) {
    return buf ? raekern::cpu::load16(buf + i, m) : _mm512_sub_ps(load16(src + i, m), shift);
  };
  for (auto& v : a) v = _mm512_setzero_ps();
  for (d = 0; d + 64 <= D; d += 64) {
    for (int j = 0; j < 4; ++j) {
      const __m512 v = _mm512_sub_ps(shifted(d + 16 * j, 0xffff), vm);
      a[j] = _mm512_fmadd_ps(v, v, a[j]);
    }
  }
  for (; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 v = _mm512_maskz_sub_ps(m, shifted(d, m), vm);
    a[0] = _mm512_fmadd_ps(v, v, a[0]);
  }
  mean = mu;
  rstd = 1.f / std::sqrt(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]))) / float(D) + eps);
  return x0;
}

// One token of the normalised fusion, token-major: the moments of its L rows first, then each 16
// channels of Σ_l c_l·rstd_l·((x_l − x_l[0]) − μ_l) (+ the token mean) summed in a register and stored
// once. The layer-major loop instead wrote a shifted fp32 copy of every row and loaded and stored an
// fp32 accumulator row per layer: six L1 accesses per element and layer against two here, which bound
// the bf16 forward (55 % of the copy bandwidth on a Zen 5, 2026-12-02). `next`: the next token's rows.
template <class T>
void fuse_token_vec(const T* const* rows, const float* coef, int64_t L, int64_t D, float eps, const float* tmean,
                    const T* const* next, float* stats, float* acc_out, T* out) {
  for (int64_t l = 0; l < L; ++l) {
    float mean, rstd;
    const float x0 = row_moments_vec(rows[l], D, eps, nullptr, mean, rstd, next ? next[l] : nullptr);
    stats[3 * l] = x0;
    stats[3 * l + 1] = mean;
    stats[3 * l + 2] = coef[l] * rstd;
  }
  raekern::cpu::for16(D, [&](int64_t d, __mmask16 m) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; ++l) {
      const __m512 v = _mm512_sub_ps(_mm512_sub_ps(load16(rows[l] + d, m), _mm512_set1_ps(stats[3 * l])),
                                     _mm512_set1_ps(stats[3 * l + 1]));
      acc = _mm512_fmadd_ps(_mm512_set1_ps(stats[3 * l + 2]), v, acc);
    }
    if (tmean) acc = _mm512_add_ps(acc, raekern::cpu::load16(tmean + d, m));
    if (out) raekern::cpu::store16(out + d, acc, m);
    else raekern::cpu::store16(acc_out + d, acc, m);
  });
}
#elif defined(RAEKERN_CPU_VEC8)
// AVX2 + FMA (no AVX-512, e.g. Zen 3): the same two passes 8 lanes at a time, four partial vectors.
using raekern::cpu::lanes_below;
using raekern::cpu::load8;

template <class T>
inline void row_moments_vec(const T* __restrict src, int64_t D, float eps, float* __restrict buf, float& mean,
                            float& rstd, const T* next) {
  const __m256 shift = _mm256_set1_ps(raekern::cpu::to_f(src[0]));
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    if (next) raekern::cpu::prefetch_lines(next + d, 32 * int64_t(sizeof(T)));
    const __m256 v0 = _mm256_sub_ps(load8(src + d), shift), v1 = _mm256_sub_ps(load8(src + d + 8), shift);
    const __m256 v2 = _mm256_sub_ps(load8(src + d + 16), shift), v3 = _mm256_sub_ps(load8(src + d + 24), shift);
    _mm256_storeu_ps(buf + d, v0);
    _mm256_storeu_ps(buf + d + 8, v1);
    _mm256_storeu_ps(buf + d + 16, v2);
    _mm256_storeu_ps(buf + d + 24, v3);
    a0 = _mm256_add_ps(a0, v0);
    a1 = _mm256_add_ps(a1, v1);
    a2 = _mm256_add_ps(a2, v2);
    a3 = _mm256_add_ps(a3, v3);
  }
  for (; d < D; d += 8) {
    const __m256 v = _mm256_and_ps(_mm256_sub_ps(load8(src + d, D - d), shift), lanes_below(D - d));
    raekern::cpu::store8(buf + d, v, D - d);
    a0 = _mm256_add_ps(a0, v);
  }
  const float mu = raekern::cpu::hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) / float(D);
  const __m256 vm = _mm256_set1_ps(mu);
  a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (d = 0; d + 32 <= D; d += 32) {
    const __m256 v0 = _mm256_sub_ps(_mm256_loadu_ps(buf + d), vm), v1 = _mm256_sub_ps(_mm256_loadu_ps(buf + d + 8), vm);
    const __m256 v2 = _mm256_sub_ps(_mm256_loadu_ps(buf + d + 16), vm), v3 = _mm256_sub_ps(_mm256_loadu_ps(buf + d + 24), vm);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
    a2 = _mm256_fmadd_ps(v2, v2, a2);
    a3 = _mm256_fmadd_ps(v3, v3, a3);
  }
  for (; d < D; d += 8) {
    const __m256 v = _mm256_and_ps(_mm256_sub_ps(load8(buf + d, D - d), vm), lanes_below(D - d));
    a0 = _mm256_fmadd_ps(v, v, a0);
  }
  const float var = raekern::cpu::hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  mean = mu;
  rstd = 1.f / std::sqrt(var / float(D) + eps);
}
#endif

#if defined(RAEKERN_CPU_VEC16)
// row_grad_coefs + row_grad_apply on a row read from storage and a gradient row written to storage,
// with the reductions split over independent partial vectors (see row_moments_vec). Returns Σ g·y.
// `stream`: dst (cache-line aligned, whole lines) is written with non-temporal stores.
template <class T>
inline float row_grad_vec(const T* __restrict src, const float* __restrict g, const float* __restrict gm,
                          int64_t D, float c, float gsum, float gmsum, float eps, float* __restrict xs,
                          T* __restrict dst, const T* next, T* next_dst, bool stream) {
  const __m512 shift = _mm512_set1_ps(raekern::cpu::to_f(src[0]));
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    // The next source row and the next destination row, one row ahead.
    if (next) raekern::cpu::prefetch_lines(next + d, 32 * int64_t(sizeof(T)));
    if (next_dst) raekern::cpu::prefetchw_lines(next_dst + d, 32 * int64_t(sizeof(T)));
    const __m512 v0 = _mm512_sub_ps(load16(src + d, 0xffff), shift);
    const __m512 v1 = _mm512_sub_ps(load16(src + d + 16, 0xffff), shift);
    _mm512_storeu_ps(xs + d, v0);
    _mm512_storeu_ps(xs + d + 16, v1);
    a0 = _mm512_add_ps(a0, v0);
    a1 = _mm512_add_ps(a1, v1);
  }
  for (; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 v = _mm512_maskz_sub_ps(m, load16(src + d, m), shift);
    raekern::cpu::store16(xs + d, v, m);
    a0 = _mm512_add_ps(a0, v);
  }
  const float mu = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) / float(D);
  const __m512 vm = _mm512_set1_ps(mu);
  __m512 q0 = _mm512_setzero_ps(), q1 = q0, s0 = q0, s1 = q0, t0 = q0, t1 = q0;
  for (d = 0; d + 32 <= D; d += 32) {
    const __m512 v0 = _mm512_sub_ps(_mm512_loadu_ps(xs + d), vm);
    const __m512 v1 = _mm512_sub_ps(_mm512_loadu_ps(xs + d + 16), vm);
    q0 = _mm512_fmadd_ps(v0, v0, q0);
    q1 = _mm512_fmadd_ps(v1, v1, q1);
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(g + d), v0, s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(g + d + 16), v1, s1);
    if (gm) {
      t0 = _mm512_fmadd_ps(_mm512_loadu_ps(gm + d), v0, t0);
      t1 = _mm512_fmadd_ps(_mm512_loadu_ps(gm + d + 16), v1, t1);
    }
  }
  for (; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 v = _mm512_maskz_sub_ps(m, raekern::cpu::load16(xs + d, m), vm);
    q0 = _mm512_fmadd_ps(v, v, q0);
    s0 = _mm512_fmadd_ps(raekern::cpu::load16(g + d, m), v, s0);
    if (gm) t0 = _mm512_fmadd_ps(raekern::cpu::load16(gm + d, m), v, t0);
  }
  const float var = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1));
  const float sg = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  const float sgm = gm ? _mm512_reduce_add_ps(_mm512_add_ps(t0, t1)) : 0.f;
  const float rstd = 1.f / std::sqrt(var / float(D) + eps);
  const float dsum = c * gsum + gmsum;
  const float dyy = rstd * (c * sg + sgm);
  // dx = k_g·g + k_gm·gm − k_0 − k_x·(xs − μ), as row_grad_apply.
  const __m512 kg = _mm512_set1_ps(rstd * c), kgm = _mm512_set1_ps(rstd), k0 = _mm512_set1_ps(rstd * dsum / float(D));
  const __m512 kx = _mm512_set1_ps(rstd * rstd * dyy / float(D));
  raekern::cpu::for16(D, [&](int64_t d, __mmask16 m) {
    __m512 v = _mm512_mul_ps(kg, raekern::cpu::load16(g + d, m));
    if (gm) v = _mm512_fmadd_ps(kgm, raekern::cpu::load16(gm + d, m), v);
    v = _mm512_sub_ps(v, k0);
    v = _mm512_fnmadd_ps(kx, _mm512_sub_ps(raekern::cpu::load16(xs + d, m), vm), v);
    raekern::cpu::put16(dst + d, v, m, stream);
  });
  return rstd * sg;
}
#elif defined(RAEKERN_CPU_VEC8)
// The AVX-512 row_grad_vec 8 lanes at a time (AVX2 + FMA builds).
template <class T>
inline float row_grad_vec(const T* __restrict src, const float* __restrict g, const float* __restrict gm,
                          int64_t D, float c, float gsum, float gmsum, float eps, float* __restrict xs,
                          T* __restrict dst, const T* next, T* next_dst, bool stream) {
  const __m256 shift = _mm256_set1_ps(raekern::cpu::to_f(src[0]));
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    if (next) raekern::cpu::prefetch_lines(next + d, 16 * int64_t(sizeof(T)));
    if (next_dst) raekern::cpu::prefetchw_lines(next_dst + d, 16 * int64_t(sizeof(T)));
    const __m256 v0 = _mm256_sub_ps(load8(src + d), shift), v1 = _mm256_sub_ps(load8(src + d + 8), shift);
    _mm256_storeu_ps(xs + d, v0);
    _mm256_storeu_ps(xs + d + 8, v1);
    a0 = _mm256_add_ps(a0, v0);
    a1 = _mm256_add_ps(a1, v1);
  }
  for (; d < D; d += 8) {
    const __m256 v = _mm256_and_ps(_mm256_sub_ps(load8(src + d, D - d), shift), lanes_below(D - d));
    raekern::cpu::store8(xs + d, v, D - d);
    a0 = _mm256_add_ps(a0, v);
  }
  const float mu = raekern::cpu::hsum8(_mm256_add_ps(a0, a1)) / float(D);
  const __m256 vm = _mm256_set1_ps(mu);
  __m256 q0 = _mm256_setzero_ps(), q1 = q0, s0 = q0, s1 = q0, t0 = q0, t1 = q0;
  for (d = 0; d + 16 <= D; d += 16) {
    const __m256 v0 = _mm256_sub_ps(_mm256_loadu_ps(xs + d), vm), v1 = _mm256_sub_ps(_mm256_loadu_ps(xs + d + 8), vm);
    q0 = _mm256_fmadd_ps(v0, v0, q0);
    q1 = _mm256_fmadd_ps(v1, v1, q1);
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(g + d), v0, s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(g + d + 8), v1, s1);
    if (gm) {
      t0 = _mm256_fmadd_ps(_mm256_loadu_ps(gm + d), v0, t0);
      t1 = _mm256_fmadd_ps(_mm256_loadu_ps(gm + d + 8), v1, t1);
    }
  }
  for (; d < D; d += 8) {
    const int64_t left = D - d;
    const __m256 v = _mm256_and_ps(_mm256_sub_ps(load8(xs + d, left), vm), lanes_below(left));
    q0 = _mm256_fmadd_ps(v, v, q0);
    s0 = _mm256_fmadd_ps(load8(g + d, left), v, s0);
    if (gm) t0 = _mm256_fmadd_ps(load8(gm + d, left), v, t0);
  }
  const float var = raekern::cpu::hsum8(_mm256_add_ps(q0, q1));
  const float sg = raekern::cpu::hsum8(_mm256_add_ps(s0, s1));
  const float sgm = gm ? raekern::cpu::hsum8(_mm256_add_ps(t0, t1)) : 0.f;
  const float rstd = 1.f / std::sqrt(var / float(D) + eps);
  const float dsum = c * gsum + gmsum;
  const float dyy = rstd * (c * sg + sgm);
  const __m256 kg = _mm256_set1_ps(rstd * c), kgm = _mm256_set1_ps(rstd), k0 = _mm256_set1_ps(rstd * dsum / float(D));
  const __m256 kx = _mm256_set1_ps(rstd * rstd * dyy / float(D));
  const auto dx8 = [&](int64_t d, int64_t left) {
    __m256 v = _mm256_mul_ps(kg, load8(g + d, left));
    if (gm) v = _mm256_fmadd_ps(kgm, load8(gm + d, left), v);
    v = _mm256_sub_ps(v, k0);
    return _mm256_fnmadd_ps(kx, _mm256_sub_ps(load8(xs + d, left), vm), v);
  };
  d = 0;
  if (stream) {
    constexpr int kV = int(64 / (8 * sizeof(T)));  // 8-lane vectors per 64-byte line
    for (; d + 8 * kV <= D; d += 8 * kV) {
      __m256 v[kV];
      for (int j = 0; j < kV; ++j) v[j] = dx8(d + 8 * j, 8);
      raekern::cpu::stream_line8(dst + d, v);
    }
  }
  for (; d < D; d += 8) raekern::cpu::store8(dst + d, dx8(d, D - d), D - d);
  return rstd * sg;
}
#endif

}  // namespace raekern::fusion::cpu
