// Row functions of the norm family's CPU kernels, one set per instruction set: AVX-512 (16 lanes),
// AVX2 + FMA (8 lanes, CPUs without AVX-512) and empty stand-ins where neither exists (has_vec<T> is
// then false and the drivers in fused_norm_cpu.cpp take their generic loops). Each function works on
// one row: the forward's residual + statistics pass, its output pass (per-sample coefficients or
// per-token modulation) and the backward's two sweeps.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/cpu_convert.h"
#include "norm/norm_params.h"

// GCC 12's false "uninitialized" reports on inlined AVX-512 intrinsics (bug 105593; see
// common/cpu_vec_math.h) fire in the including unit.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace raekern::norm::rows {

using raekern::cpu::acc_t;

// Pointers of one row for the vectorised backward (vec_backward_row below).
struct BwdRowPtrs {
  const void *x, *dout, *dxo, *scale, *gate, *y;
  const void *next_scale, *next_gate;  // prefetched: see next_strided_row
  void *dx, *dy, *dshift_row, *dscale_row, *dgate_row;
  float *acc_shift, *acc_scale, *acc_w, *acc_b, *acc_gate;
};

#ifdef RAEKERN_CPU_VEC16
template <class T> constexpr bool has_vec = !std::is_same_v<T, double>;
constexpr bool kStreams = true;  // outputs may bypass the caches (non-temporal stores)

template <class T>
inline void prefetch16(const T* p) {
  if (p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// One pass over the row: xb = x + gate*y (rounded to T, as stored in x_out), and its statistics.
template <class T>
inline void vec_residual_stats(const T* x, const T* gate, const T* y, T* x_out, int64_t D, acc_t<T>* xb,
                               Kind kind, double eps, acc_t<T>& mean, acc_t<T>& rstd, bool stream,
                               const T* pf_gate) {
  if constexpr (has_vec<T>) {
  const auto put = [stream](T* p, __m512 v, __mmask16 m) { cpu::put16(p, v, m, stream); };
  if (kind == Kind::None) {  // gated_residual alone: a pure stream, no row buffer
    cpu::for16(D, [&](int64_t i, __mmask16 m) {
      if (pf_gate) prefetch16(pf_gate + i);
      __m512 r = _mm512_fmadd_ps(cpu::load16(gate + i, m), cpu::load16(y + i, m), cpu::load16(x + i, m));
      put(x_out + i, r, m);
    });
    return;
  }
  // Two independent accumulator chains per sum (even / odd vectors): one chain is bound by the add
  // latency, not by the loads, on rows that sit in L1/L2.
  __m512 vs0 = _mm512_setzero_ps(), vss0 = _mm512_setzero_ps(), vs1 = vs0, vss1 = vs0;
  const auto row16 = [&](int64_t i, __mmask16 m) {  // xb[i, i+16) (and x_out) from the inputs
    __m512 r = cpu::load16(x + i, m);
    if (gate) {
      if (pf_gate) prefetch16(pf_gate + i);
      r = _mm512_fmadd_ps(cpu::load16(gate + i, m), cpu::load16(y + i, m), r);
      put(x_out + i, r, m);
      r = cpu::round16<T>(r);
    }
    cpu::store16(xb + i, r, m);
    return r;
  };
  // The sum is taken relative to the row's first value c: a constant row then has mean == c
  // exactly (sum * (1/D) is not exact, and rstd = 1/sqrt(eps) would amplify that rounding).
  const __mmask16 m0 = cpu::tail_mask(D);
  const __m512 r0 = row16(0, m0);
  const __m512 vc = _mm512_set1_ps(_mm512_cvtss_f32(r0));
  // LayerNorm needs the sum here (its variance comes from a second pass), RMSNorm the sum of squares.
  const bool layer = kind == Kind::Layer;
  const auto add = [&](__m512 r, __mmask16 m, __m512& sum, __m512& sumsq) {
    if (layer) sum = _mm512_add_ps(sum, _mm512_maskz_sub_ps(m, r, vc));
    else sumsq = _mm512_fmadd_ps(r, r, sumsq);
  };
  // Full vectors pass a constant mask, so the masked loads and stores fold to plain ones.
  const auto step = [&](int64_t i, __mmask16 m, __m512& sum, __m512& sumsq) { add(row16(i, m), m, sum, sumsq); };
  constexpr __mmask16 kAll = 0xffff;
  add(r0, m0, vs1, vss1);
  int64_t i0 = 16;
  for (; i0 + 32 <= D; i0 += 32) {
    step(i0, kAll, vs0, vss0);
    step(i0 + 16, kAll, vs1, vss1);
  }
  if (i0 < D) step(i0, cpu::tail_mask(D - i0), vs0, vss0);
  if (i0 + 16 < D) step(i0 + 16, cpu::tail_mask(D - i0 - 16), vs1, vss1);
  const __m512 vs = _mm512_add_ps(vs0, vs1), vss = _mm512_add_ps(vss0, vss1);
  if (kind == Kind::None) return;
  const float inv_d = 1.f / float(D);
  float ss;
  if (kind == Kind::Layer) {
    // Second pass from L1 for the variance: E[x^2] - mean^2 cancels badly for large means.
    mean = _mm512_cvtss_f32(vc) + cpu::hsum16(vs) * inv_d;
    const __m512 vm = _mm512_set1_ps(mean);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    const auto dev = [&](int64_t i, __mmask16 m, __m512& acc) {
      const __m512 d = _mm512_maskz_sub_ps(m, cpu::load16(xb + i, m), vm);
      acc = _mm512_fmadd_ps(d, d, acc);
    };
    int64_t i = 0;
    for (; i + 32 <= D; i += 32) {
      dev(i, kAll, acc0);
      dev(i + 16, kAll, acc1);
    }
    if (i < D) dev(i, cpu::tail_mask(D - i), acc0);
    if (i + 16 < D) dev(i + 16, cpu::tail_mask(D - i - 16), acc1);
    ss = cpu::hsum16(_mm512_add_ps(acc0, acc1));
  } else {
    mean = 0.f;
    ss = cpu::hsum16(vss);
  }
  rstd = 1.f / std::sqrt(ss * inv_d + float(eps));
  }
}

// out = (xb - mean) * rstd * ca + cb, stored as T; ca == nullptr: no affine and no modulation (the
// plain norms, RAE's non-affine LayerNorm), out = (xb - mean) * rstd. Subtracting before scaling
// keeps a constant row exactly 0 (rstd = 1/sqrt(eps) would amplify the rounding of a folded mean*rstd).
// While a row is written from L1, the next row's input (pf_x) and output lines (pf_out, unless the
// output streams) are fetched: the shapes of a DiT sit in L3, and a row's first pass otherwise
// waits on every line of it (the streamer restarts at each row's page boundary).
template <class T>
inline void vec_output(const acc_t<T>* xb, const acc_t<T>* ca, const acc_t<T>* cb, acc_t<T> rstd,
                       acc_t<T> mean, int64_t D, T* out, bool stream, const T* pf_x, T* pf_out) {
  if constexpr (has_vec<T>) {
  const auto put = [stream](T* p, __m512 v, __mmask16 m) { cpu::put16(p, v, m, stream); };
  const __m512 vr = _mm512_set1_ps(rstd), vm = _mm512_set1_ps(mean);
  const int64_t full = D & ~int64_t(15);
  const auto fetch = [&](int64_t i) {
    if (pf_x) _mm_prefetch(reinterpret_cast<const char*>(pf_x + i), _MM_HINT_T0);
    if (pf_out) _m_prefetchw(pf_out + i);
  };
  if (!ca) {
    for (int64_t i = 0; i < full; i += 16) {
      fetch(i);
      put(out + i, _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xb + i), vm), vr), __mmask16(0xffff));
    }
  } else if (!cb) {
    // No shift or bias (rms_norm / layer_norm with a weight only): two L1 loads per vector, not three;
    // on Zen 4 (one 512-bit load per cycle) the third was most of the gap to the unweighted form.
    for (int64_t i = 0; i < full; i += 16) {
      fetch(i);
      const __m512 h = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xb + i), vm), vr);
      put(out + i, _mm512_mul_ps(h, _mm512_loadu_ps(ca + i)), __mmask16(0xffff));
    }
  } else {
    for (int64_t i = 0; i < full; i += 16) {
      fetch(i);
      const __m512 h = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xb + i), vm), vr);
      put(out + i, _mm512_fmadd_ps(h, _mm512_loadu_ps(ca + i), _mm512_loadu_ps(cb + i)), __mmask16(0xffff));
    }
  }
  if (full < D) {
    const __mmask16 m = cpu::tail_mask(D - full);
    __m512 h = _mm512_mul_ps(_mm512_sub_ps(cpu::load16(xb + full, m), vm), vr);
    if (ca) h = cb ? _mm512_fmadd_ps(h, cpu::load16(ca + full, m), cpu::load16(cb + full, m))
               : _mm512_mul_ps(h, cpu::load16(ca + full, m));
    put(out + full, h, m);
  }
  }
}

// Per-token modulation: out = (xhat * w + bias) * (1 + scale) + shift, shift/scale read from memory.
template <class T>
inline void vec_output_token(const acc_t<T>* xb, const acc_t<T>* w, const acc_t<T>* bias, const T* shift,
                             const T* scale, acc_t<T> rstd, acc_t<T> mean, int64_t D, T* out, bool stream,
                             const T* pf_shift, const T* pf_scale) {
  if constexpr (has_vec<T>) {
  const auto put = [stream](T* p, __m512 v, __mmask16 m) { cpu::put16(p, v, m, stream); };
  const __m512 vr = _mm512_set1_ps(rstd), vm = _mm512_set1_ps(mean), one = _mm512_set1_ps(1.f);
  cpu::for16(D, [&](int64_t i, __mmask16 m) {
    __m512 h = _mm512_mul_ps(_mm512_sub_ps(cpu::load16(xb + i, m), vm), vr);
    prefetch16(pf_shift ? pf_shift + i : nullptr);
    prefetch16(pf_scale ? pf_scale + i : nullptr);
    if (w) h = _mm512_mul_ps(h, cpu::load16(w + i, m));
    if (bias) h = _mm512_add_ps(h, cpu::load16(bias + i, m));
    const __m512 sc = scale ? _mm512_add_ps(one, cpu::load16(scale + i, m)) : one;
    const __m512 sh = shift ? cpu::load16(shift + i, m) : _mm512_setzero_ps();
    put(out + i, _mm512_fmadd_ps(h, sc, sh), m);
  });
  }
}

// Backward of one row in two sweeps over 16-lane chunks, every conversion and gradient fused into
// them. Sweep 1 forms d h = g * (1 + scale) * w (kept in fp32 in `gw`), the modulation and affine
// gradients and the two row sums; sweep 2 re-derives xhat from the (L1-resident) input row and writes
// dx, dy and the gate gradient. Per-sample / shared gradients accumulate into the task's fp32 sums.

template <class T>
inline void vec_backward_row(const BwdRowPtrs& r, const float* w, const float* bias, float mean, float rstd,
                             int64_t D, bool layer, float* __restrict gw, bool stream) {
  if constexpr (has_vec<T>) {
  const auto put = [stream](void* p, __m512 v, __mmask16 m) { cpu::put16(static_cast<T*>(p), v, m, stream); };
  const __m512 vr = _mm512_set1_ps(rstd), vm = _mm512_set1_ps(mean), one = _mm512_set1_ps(1.f);
  const T* x = static_cast<const T*>(r.x);
  float c1 = 0.f, c2 = 0.f;
  if (r.dout) {
    const T* dout = static_cast<const T*>(r.dout);
    const T* scale = static_cast<const T*>(r.scale);
    const bool need_h = r.dscale_row || r.acc_scale;
    __m512 vs1 = _mm512_setzero_ps(), vs2 = _mm512_setzero_ps();
    cpu::for16(D, [&](int64_t i, __mmask16 m) {
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(cpu::load16(x + i, m), vm), vr);
      prefetch16(static_cast<const T*>(r.next_scale) ? static_cast<const T*>(r.next_scale) + i : nullptr);
      __m512 g = cpu::load16(dout + i, m);  // zero in the tail lanes, so no sum sees them
      const __m512 wv = w ? cpu::load16(w + i, m) : one;
      if (r.dshift_row) put(static_cast<T*>(r.dshift_row) + i, g, m);
      else if (r.acc_shift)
        cpu::store16(r.acc_shift + i, _mm512_add_ps(cpu::load16(r.acc_shift + i, m), g), m);
      if (need_h) {
        __m512 h = _mm512_mul_ps(xh, wv);
        if (bias) h = _mm512_add_ps(h, cpu::load16(bias + i, m));
        if (r.dscale_row) put(static_cast<T*>(r.dscale_row) + i, _mm512_mul_ps(g, h), m);
        else cpu::store16(r.acc_scale + i, _mm512_fmadd_ps(g, h, cpu::load16(r.acc_scale + i, m)), m);
      }
      if (scale) g = _mm512_mul_ps(g, _mm512_add_ps(one, cpu::load16(scale + i, m)));
      if (r.acc_w)
        cpu::store16(r.acc_w + i, _mm512_fmadd_ps(g, xh, cpu::load16(r.acc_w + i, m)), m);
      if (r.acc_b) cpu::store16(r.acc_b + i, _mm512_add_ps(cpu::load16(r.acc_b + i, m), g), m);
      g = _mm512_mul_ps(g, wv);
      vs1 = _mm512_add_ps(vs1, g);
      vs2 = _mm512_fmadd_ps(g, xh, vs2);
      cpu::store16(gw + i, g, m);
    });
    const float inv_d = 1.f / float(D);
    c1 = layer ? cpu::hsum16(vs1) * inv_d : 0.f;
    c2 = cpu::hsum16(vs2) * inv_d;
  }
  const __m512 vc1 = _mm512_set1_ps(c1), vc2 = _mm512_set1_ps(c2);
  const T* dxo = static_cast<const T*>(r.dxo);
  const T* gate = static_cast<const T*>(r.gate);
  const T* y = static_cast<const T*>(r.y);
  cpu::for16(D, [&](int64_t i, __mmask16 m) {
    __m512 d = _mm512_setzero_ps();
    if (r.dout) {
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(cpu::load16(x + i, m), vm), vr);
      d = _mm512_mul_ps(vr, _mm512_sub_ps(_mm512_sub_ps(cpu::load16(gw + i, m), vc1), _mm512_mul_ps(xh, vc2)));
    }
    if (dxo) d = _mm512_add_ps(d, cpu::load16(dxo + i, m));
    if (gate) {
      prefetch16(r.next_gate ? static_cast<const T*>(r.next_gate) + i : nullptr);
      const __m512 yv = cpu::load16(y + i, m);
      if (r.dgate_row) put(static_cast<T*>(r.dgate_row) + i, _mm512_mul_ps(d, yv), m);
      else cpu::store16(r.acc_gate + i, _mm512_fmadd_ps(d, yv, cpu::load16(r.acc_gate + i, m)), m);
      put(static_cast<T*>(r.dy) + i, _mm512_mul_ps(cpu::load16(gate + i, m), d), m);
    }
    put(static_cast<T*>(r.dx) + i, d, m);
  });
  }
}
#elif defined(RAEKERN_CPU_VEC8)
// AVX2 + FMA (no AVX-512, e.g. Zen 3): the row functions 8 lanes at a time in the same
// arithmetic order as the AVX-512 ones above, row tails through cpu::load8 / store8's zero-filled
// copies; outputs are stored normally. The portable path's widen / compute / narrow buffers left the
// forward at 0.4x-0.9x torch.compile on a Zen 3 (measured 2026-12-01).
template <class T> constexpr bool has_vec = !std::is_same_v<T, double>;
constexpr bool kStreams = false;

using cpu::lanes_below;

template <class T>
inline void vec_residual_stats(const T* x, const T* gate, const T* y, T* x_out, int64_t D, acc_t<T>* xb,
                               Kind kind, double eps, acc_t<T>& mean, acc_t<T>& rstd, bool, const T* pf_gate) {
  if constexpr (has_vec<T>) {
  if (kind == Kind::None) {  // gated_residual alone: a pure stream, no row buffer
    for (int64_t i = 0; i < D; i += 8) {
      const int64_t left = D - i;
      if (pf_gate) __builtin_prefetch(pf_gate + i);
      cpu::store8(x_out + i, _mm256_fmadd_ps(cpu::load8(gate + i, left), cpu::load8(y + i, left), cpu::load8(x + i, left)), left);
    }
    return;
  }
  __m256 vs0 = _mm256_setzero_ps(), vss0 = vs0, vs1 = vs0, vss1 = vs0;
  const auto row8 = [&](int64_t i, int64_t left) {  // xb[i, i+8) (and x_out) from the inputs
    __m256 r = cpu::load8(x + i, left);
    if (gate) {
      if (pf_gate) __builtin_prefetch(pf_gate + i);
      r = _mm256_fmadd_ps(cpu::load8(gate + i, left), cpu::load8(y + i, left), r);
      cpu::store8(x_out + i, r, left);
      r = cpu::round8<T>(r);
    }
    cpu::store8(xb + i, r, left);
    return r;
  };
  // Sums relative to the row's first value, as in the AVX-512 path (a constant row keeps mean == c).
  const __m256 r0 = row8(0, D);
  const __m256 vc = _mm256_set1_ps(_mm256_cvtss_f32(r0));
  const bool layer = kind == Kind::Layer;
  const auto add = [&](__m256 r, int64_t left, __m256& sum, __m256& sumsq) {
    if (layer) {
      const __m256 d = _mm256_sub_ps(r, vc);
      sum = _mm256_add_ps(sum, left >= 8 ? d : _mm256_and_ps(d, lanes_below(left)));
    } else {
      sumsq = _mm256_fmadd_ps(r, r, sumsq);  // tail lanes are zero
    }
  };
  const auto step = [&](int64_t i, __m256& sum, __m256& sumsq) { add(row8(i, D - i), D - i, sum, sumsq); };
  add(r0, D, vs1, vss1);
  int64_t i0 = 8;
  for (; i0 + 16 <= D; i0 += 16) {
    step(i0, vs0, vss0);
    step(i0 + 8, vs1, vss1);
  }
  if (i0 < D) step(i0, vs0, vss0);
  if (i0 + 8 < D) step(i0 + 8, vs1, vss1);
  const float inv_d = 1.f / float(D);
  float ss;
  if (layer) {
    mean = _mm256_cvtss_f32(vc) + cpu::hsum8(_mm256_add_ps(vs0, vs1)) * inv_d;
    const __m256 vm = _mm256_set1_ps(mean);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    const auto dev = [&](int64_t i, __m256& acc) {
      const int64_t left = D - i;
      __m256 d = _mm256_sub_ps(cpu::load8(xb + i, left), vm);
      if (left < 8) d = _mm256_and_ps(d, lanes_below(left));
      acc = _mm256_fmadd_ps(d, d, acc);
    };
    int64_t i = 0;
    for (; i + 16 <= D; i += 16) {
      dev(i, acc0);
      dev(i + 8, acc1);
    }
    if (i < D) dev(i, acc0);
    if (i + 8 < D) dev(i + 8, acc1);
    ss = cpu::hsum8(_mm256_add_ps(acc0, acc1));
  } else {
    mean = 0.f;
    ss = cpu::hsum8(_mm256_add_ps(vss0, vss1));
  }
  rstd = 1.f / std::sqrt(ss * inv_d + float(eps));
  }
}

template <class T>
inline void vec_output(const acc_t<T>* xb, const acc_t<T>* ca, const acc_t<T>* cb, acc_t<T> rstd,
                       acc_t<T> mean, int64_t D, T* out, bool, const T* pf_x, T* pf_out) {
  if constexpr (has_vec<T>) {
  const __m256 vr = _mm256_set1_ps(rstd), vm = _mm256_set1_ps(mean);
  const int64_t full = D & ~int64_t(7);
  const auto fetch = [&](int64_t i) {
    if (pf_x) __builtin_prefetch(pf_x + i);
    if (pf_out) __builtin_prefetch(pf_out + i, 1);
  };
  if (!ca) {
    for (int64_t i = 0; i < full; i += 8) {
      fetch(i);
      cpu::store8(out + i, _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xb + i), vm), vr));
    }
  } else if (!cb) {
    for (int64_t i = 0; i < full; i += 8) {
      fetch(i);
      const __m256 h = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xb + i), vm), vr);
      cpu::store8(out + i, _mm256_mul_ps(h, _mm256_loadu_ps(ca + i)));
    }
  } else {
    for (int64_t i = 0; i < full; i += 8) {
      fetch(i);
      const __m256 h = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xb + i), vm), vr);
      cpu::store8(out + i, _mm256_fmadd_ps(h, _mm256_loadu_ps(ca + i), _mm256_loadu_ps(cb + i)));
    }
  }
  if (full < D) {
    const int64_t left = D - full;
    __m256 h = _mm256_mul_ps(_mm256_sub_ps(cpu::load8(xb + full, left), vm), vr);
    if (ca) h = cb ? _mm256_fmadd_ps(h, cpu::load8(ca + full, left), cpu::load8(cb + full, left))
               : _mm256_mul_ps(h, cpu::load8(ca + full, left));
    cpu::store8(out + full, h, left);
  }
  }
}

template <class T>
inline void vec_output_token(const acc_t<T>* xb, const acc_t<T>* w, const acc_t<T>* bias, const T* shift,
                             const T* scale, acc_t<T> rstd, acc_t<T> mean, int64_t D, T* out, bool,
                             const T* pf_shift, const T* pf_scale) {
  if constexpr (has_vec<T>) {
  const __m256 vr = _mm256_set1_ps(rstd), vm = _mm256_set1_ps(mean), one = _mm256_set1_ps(1.f);
  for (int64_t i = 0; i < D; i += 8) {
    const int64_t left = D - i;
    __m256 h = _mm256_mul_ps(_mm256_sub_ps(cpu::load8(xb + i, left), vm), vr);
    if (pf_shift) __builtin_prefetch(pf_shift + i);
    if (pf_scale) __builtin_prefetch(pf_scale + i);
    if (w) h = _mm256_mul_ps(h, cpu::load8(w + i, left));
    if (bias) h = _mm256_add_ps(h, cpu::load8(bias + i, left));
    const __m256 sc = scale ? _mm256_add_ps(one, cpu::load8(scale + i, left)) : one;
    const __m256 sh = shift ? cpu::load8(shift + i, left) : _mm256_setzero_ps();
    cpu::store8(out + i, _mm256_fmadd_ps(h, sc, sh), left);
  }
  }
}

// The AVX-512 backward's two sweeps, 8 lanes at a time (tail lanes load as zero, so no sum sees them).
template <class T>
inline void vec_backward_row(const BwdRowPtrs& r, const float* w, const float* bias, float mean, float rstd,
                             int64_t D, bool layer, float* __restrict gw, bool) {
  if constexpr (has_vec<T>) {
  const auto put = [](void* p, __m256 v, int64_t left) { cpu::store8(static_cast<T*>(p), v, left); };
  const auto acc_add = [](float* a, __m256 v, int64_t left) { cpu::store8(a, _mm256_add_ps(cpu::load8(a, left), v), left); };
  const __m256 vr = _mm256_set1_ps(rstd), vm = _mm256_set1_ps(mean), one = _mm256_set1_ps(1.f);
  const T* x = static_cast<const T*>(r.x);
  float c1 = 0.f, c2 = 0.f;
  if (r.dout) {
    const T* dout = static_cast<const T*>(r.dout);
    const T* scale = static_cast<const T*>(r.scale);
    const T* next_scale = static_cast<const T*>(r.next_scale);
    const bool need_h = r.dscale_row || r.acc_scale;
    __m256 vs1 = _mm256_setzero_ps(), vs2 = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
      const int64_t left = D - i;
      __m256 xh = _mm256_mul_ps(_mm256_sub_ps(cpu::load8(x + i, left), vm), vr);
      if (left < 8) xh = _mm256_and_ps(xh, lanes_below(left));  // -mean·rstd in the tail lanes otherwise
      if (next_scale) __builtin_prefetch(next_scale + i);
      __m256 g = cpu::load8(dout + i, left);
      const __m256 wv = w ? cpu::load8(w + i, left) : one;
      if (r.dshift_row) put(static_cast<T*>(r.dshift_row) + i, g, left);
      else if (r.acc_shift) acc_add(r.acc_shift + i, g, left);
      if (need_h) {
        __m256 h = _mm256_mul_ps(xh, wv);
        if (bias) h = _mm256_add_ps(h, cpu::load8(bias + i, left));
        if (r.dscale_row) put(static_cast<T*>(r.dscale_row) + i, _mm256_mul_ps(g, h), left);
        else acc_add(r.acc_scale + i, _mm256_mul_ps(g, h), left);
      }
      if (scale) g = _mm256_mul_ps(g, _mm256_add_ps(one, cpu::load8(scale + i, left)));
      if (r.acc_w) acc_add(r.acc_w + i, _mm256_mul_ps(g, xh), left);
      if (r.acc_b) acc_add(r.acc_b + i, g, left);
      g = _mm256_mul_ps(g, wv);
      vs1 = _mm256_add_ps(vs1, g);
      vs2 = _mm256_fmadd_ps(g, xh, vs2);
      cpu::store8(gw + i, g, left);
    }
    const float inv_d = 1.f / float(D);
    c1 = layer ? cpu::hsum8(vs1) * inv_d : 0.f;
    c2 = cpu::hsum8(vs2) * inv_d;
  }
  const __m256 vc1 = _mm256_set1_ps(c1), vc2 = _mm256_set1_ps(c2);
  const T* dxo = static_cast<const T*>(r.dxo);
  const T* gate = static_cast<const T*>(r.gate);
  const T* y = static_cast<const T*>(r.y);
  const T* next_gate = static_cast<const T*>(r.next_gate);
  for (int64_t i = 0; i < D; i += 8) {
    const int64_t left = D - i;
    __m256 d = _mm256_setzero_ps();
    if (r.dout) {
      const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(cpu::load8(x + i, left), vm), vr);
      d = _mm256_mul_ps(vr, _mm256_sub_ps(_mm256_sub_ps(cpu::load8(gw + i, left), vc1), _mm256_mul_ps(xh, vc2)));
    }
    if (dxo) d = _mm256_add_ps(d, cpu::load8(dxo + i, left));
    if (gate) {
      if (next_gate) __builtin_prefetch(next_gate + i);
      const __m256 yv = cpu::load8(y + i, left);
      if (r.dgate_row) put(static_cast<T*>(r.dgate_row) + i, _mm256_mul_ps(d, yv), left);
      else acc_add(r.acc_gate + i, _mm256_mul_ps(d, yv), left);
      put(static_cast<T*>(r.dy) + i, _mm256_mul_ps(cpu::load8(gate + i, left), d), left);
    }
    put(static_cast<T*>(r.dx) + i, d, left);
  }
  }
}
#else
template <class T> constexpr bool has_vec = false;
constexpr bool kStreams = false;
template <class T>
inline void vec_output_token(const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, const T*, const T*, acc_t<T>,
                             acc_t<T>, int64_t, T*, bool, const T*, const T*) {}
template <class T>
inline void vec_residual_stats(const T*, const T*, const T*, T*, int64_t, acc_t<T>*, Kind, double, acc_t<T>&,
                               acc_t<T>&, bool, const T*) {}
template <class T>
inline void vec_output(const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, acc_t<T>, acc_t<T>, int64_t, T*, bool,
                       const T*, T*) {}
template <class T>
inline void vec_backward_row(const BwdRowPtrs&, const float*, const float*, float, float, int64_t, bool, float*,
                             bool) {}
#endif

}  // namespace raekern::norm::rows
