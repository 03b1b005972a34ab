// Per-row helpers of the fusion CPU kernels: non-affine LayerNorm statistics and its backward on a
// contiguous accumulator row (the row is already widened to fp32/fp64, so both passes hit L1).
#pragma once
#include <cmath>
#include <cstdint>

namespace raekern::fusion::cpu {

// Two-pass mean/variance: ViT hidden states carry channels with |x| in the hundreds, where the
// one-pass E[x²] − E[x]² formula loses the variance to cancellation in fp32. The row is first
// shifted by its first value (exact for nearby values), so a large common offset costs no low bits
// in the mean either. Returns the mean of the shifted row: normalise with row_normalize(x, n, mean, rstd).
template <class A>
inline void row_moments(A* __restrict x, int64_t n, A eps, A& mean, A& rstd) {
  const A shift = x[0];
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    x[i] -= shift;
    s += x[i];
  }
  const A mu = s / A(n);
  A v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t i = 0; i < n; ++i) {
    const A d = x[i] - mu;
    v += d * d;
  }
  mean = mu;
  rstd = A(1) / std::sqrt(v / A(n) + eps);
}

// x ← (x − mean)·rstd in place.
template <class A>
inline void row_normalize(A* __restrict x, int64_t n, A mean, A rstd) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - mean) * rstd;
}

template <class A>
inline A row_dot(const A* __restrict a, const A* __restrict b, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class A>
inline A row_sum(const A* __restrict a, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i];
  return s;
}

// Backward of y = (x − mean)·rstd given y and dy: dx = rstd·(dy − mean(dy) − y·mean(dy·y)).
// Writes dx over dy.
template <class A>
inline void row_layernorm_backward(const A* __restrict y, A* __restrict dy, int64_t n, A rstd) {
  A s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < n; ++i) {
    s1 += dy[i];
    s2 += dy[i] * y[i];
  }
  const A m1 = s1 / A(n), m2 = s2 / A(n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dy[i] = rstd * (dy[i] - m1 - y[i] * m2);
}

// tanh that GCC vectorises (libm's tanhf is an opaque call without -ffast-math). Cephes' single
// precision scheme: an odd polynomial below |x| = 0.625, (1 − e)/(1 + e) with e = exp(−2|x|) above;
// within 2 ulp of libm. fp64 (the gradcheck path) keeps std::tanh.
inline float exp_neg(float x /* <= 0 */) {
  x = x < -87.f ? -87.f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return y * scale;
}

inline float tanh_f(float x) {
  const float a = __builtin_fabsf(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float e = exp_neg(-2.f * a);
  const float big = __builtin_copysignf((1.f - e) / (1.f + e), x);
  return a < 0.625f ? small : big;
}

template <class A> inline A tanh_any(A x) { return std::tanh(x); }
template <> inline float tanh_any<float>(float x) { return tanh_f(x); }

// LayerNorm backward of one layer row, in three passes over L1-resident data (the row is never
// normalised in memory). With xs = x − x[0] (shifted as in row_moments), μ = mean(xs), ρ = rstd,
// y = (xs − μ)·ρ and dy = c·g + gm:
//   dx = ρ·(dy − mean(dy) − y·mean(dy·y)) = ρc·g + ρ·gm − ρ·mean(dy) − ρ²·mean(dy·y)·(xs − μ),
// where Σdy = c·Σg + Σgm is known per token, and Σ dy·(xs − μ) is summed beside the variance
// (after μ is known, so no cancellation against a large mean).
template <class A>
struct RowGrad {
  A k_g, k_gm, k_0, k_x, mu;  // dx = k_g·g + k_gm·gm − k_0 − k_x·(xs − μ)
  A gy;                       // Σ g·y: this row's contribution to d weights / c
};

template <class A>
inline RowGrad<A> row_grad_coefs(A* __restrict xs, const A* __restrict g, const A* __restrict gm, int64_t n,
                                 A c, A gsum, A gmsum, A eps) {
  const A shift = xs[0];
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const A v = xs[i] - shift;
    xs[i] = v;
    s += v;
  }
  const A mu = s / A(n);
  A var = 0, sg = 0, sgm = 0;
  if (gm) {
#pragma omp simd reduction(+ : var, sg, sgm)
    for (int64_t i = 0; i < n; ++i) {
      const A d = xs[i] - mu;
      var += d * d;
      sg += g[i] * d;
      sgm += gm[i] * d;
    }
  } else {
#pragma omp simd reduction(+ : var, sg)
    for (int64_t i = 0; i < n; ++i) {
      const A d = xs[i] - mu;
      var += d * d;
      sg += g[i] * d;
    }
  }
  const A rstd = A(1) / std::sqrt(var / A(n) + eps);
  const A dsum = c * gsum + gmsum;
  const A dyy = rstd * (c * sg + sgm);
  RowGrad<A> r;
  r.k_g = rstd * c;
  r.k_gm = rstd;
  r.k_0 = rstd * dsum / A(n);
  r.k_x = rstd * rstd * dyy / A(n);
  r.mu = mu;
  r.gy = rstd * sg;
  return r;
}

template <class A>
inline void row_grad_apply(const RowGrad<A>& r, const A* __restrict xs, const A* __restrict g,
                           const A* __restrict gm, int64_t n, A* __restrict dx) {
  if (gm) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dx[i] = r.k_g * g[i] + r.k_gm * gm[i] - r.k_0 - r.k_x * (xs[i] - r.mu);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dx[i] = r.k_g * g[i] - r.k_0 - r.k_x * (xs[i] - r.mu);
  }
}

}  // namespace raekern::fusion::cpu
