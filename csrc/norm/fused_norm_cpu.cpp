// CPU kernels of the norm family (see norm_params.h for the fused row operation) and the CPU
// registration of its ten ops. One task = a range of tokens of one sample, so per-sample operands
// (shift/scale/gate of shape [B, 1, D]) are widened once per task and their gradients are summed in
// task-local fp32 buffers; only those [tasks, D] partial sums leave the kernel.
// Each row is read from memory once: it is widened into an L1-resident fp32 buffer and every later
// step (statistics, normalisation, both outputs) works on that buffer with vectorised loops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_cache.h"
#include "common/cpu_convert.h"
#include "common/dispatch.h"
#include "norm/norm_host.h"

namespace raekern::norm {
namespace {

using cpu::acc_t;

template <class T>
inline const T* row_of(const Operand& o, int64_t b, int64_t n) {
  return static_cast<const T*>(o.ptr) + b * o.sb + n * o.sn;
}

template <class T>
inline void widen(const Operand& o, int64_t b, int64_t n, int64_t D, acc_t<T>* dst) {
  cpu::widen_row<T>(row_of<T>(o, b, n), o.sd, D, dst);
}

template <class T>
inline void narrow(const acc_t<T>* src, int64_t D, T* dst) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    if (src != dst) std::memcpy(dst, src, D * sizeof(T));
  } else {
    cpu::narrow_row<T>(src, D, dst);
  }
}

// Buffers of one worker thread; `n` rows of D accumulator values.
template <class A>
struct Scratch {
  std::vector<A> mem;
  int64_t D;
  Scratch(int64_t rows, int64_t D) : mem(rows * D), D(D) {}
  A* operator[](int i) { return mem.data() + i * D; }
};

template <class A>
inline void fill(A* p, int64_t D, A v) {
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) p[i] = v;
}

// Row statistics of xb; returns {mean, rstd} (mean = 0 for RMSNorm).
template <class A>
inline std::pair<A, A> row_stats(const A* __restrict xb, int64_t D, Kind kind, double eps) {
  const A inv_d = A(1) / A(D);
  A mean = 0, ss = 0;
  if (kind == Kind::Layer) {
    // Summed relative to the first value: a constant row gets mean == x exactly (s * (1/D) is not
    // exact, and rstd = 1/sqrt(eps) would turn that rounding into an output of ~1 instead of 0).
    const A c = xb[0];
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < D; ++i) s += xb[i] - c;
    mean = c + s * inv_d;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += (xb[i] - mean) * (xb[i] - mean);
  } else {
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += xb[i] * xb[i];
  }
  return {mean, A(1) / std::sqrt(ss * inv_d + A(eps))};
}

// Small problems run on the calling thread: waking the pool costs more than the work.
inline int64_t grain_for(int64_t tasks, int64_t elements) {
  return elements < (int64_t(1) << 15) ? std::max<int64_t>(tasks, 1) : 1;
}

// Output size from which the forward streams its stores past the caches.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// The next token's row of a per-token operand that is not laid out right after this one (a chunk of
// an adaLN output: rows 6*D apart), or nullptr. The hardware prefetchers follow each row but restart
// cold at every jump; rows read through this pointer are prefetched one token ahead.
template <class T>
inline const T* next_strided_row(const Operand& o, int64_t b, int64_t n, int64_t n_end, int64_t D) {
  if (!o.ptr || o.sn == 0 || o.sn == D || n + 1 >= n_end) return nullptr;
  return row_of<T>(o, b, n + 1);
}

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

// Full vectors of rows whose starts are cache-line aligned go around the cache when `stream`.
template <class T>
inline void put16(T* p, __m512 v, __mmask16 m, bool stream) {
  if (stream && m == __mmask16(0xffff)) cpu::stream16(p, v);
  else cpu::store16(p, v, m);
}


// One pass over the row: xb = x + gate*y (rounded to T, as stored in x_out), and its statistics.
template <class T>
inline void vec_residual_stats(const T* x, const T* gate, const T* y, T* x_out, int64_t D, acc_t<T>* xb,
                               Kind kind, double eps, acc_t<T>& mean, acc_t<T>& rstd, bool stream,
                               const T* pf_gate) {
  if constexpr (has_vec<T>) {
  const auto put = [stream](T* p, __m512 v, __mmask16 m) { put16(p, v, m, stream); };
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
  const auto put = [stream](T* p, __m512 v, __mmask16 m) { put16(p, v, m, stream); };
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
  const auto put = [stream](T* p, __m512 v, __mmask16 m) { put16(p, v, m, stream); };
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
  const auto put = [stream](void* p, __m512 v, __mmask16 m) { put16(static_cast<T*>(p), v, m, stream); };
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

template <class T>
void forward_kernel(const FwdParams& p) {
  using A = acc_t<T>;
  const int64_t B = p.B, N = p.N, D = p.D;
  const TaskPlan plan = plan_tasks(B, N, at::get_num_threads(), 1);
  const bool residual = p.gate.ptr != nullptr, norm = p.kind != Kind::None;
  // out = xhat * ca + cb with ca = weight*(1+scale), cb = bias*(1+scale) + shift: recomputed per
  // token only when shift or scale vary per token, otherwise once per sample.
  const bool coef_per_row = (p.shift.ptr && p.shift.sn != 0) || (p.scale.ptr && p.scale.sn != 0);
  const bool gate_per_row = residual && p.gate.sn != 0;
  // Hand-vectorised rows need unit feature strides; fp64 (reference precision) uses the generic path.
  const bool vec_rows = has_vec<T> && p.x.sd == 1 && (!residual || (p.gate.sd == 1 && p.y.sd == 1));
  // Outputs much larger than the caches are written with non-temporal stores (saves the
  // read-for-ownership of every output line); needs cache-line aligned rows.
  const int64_t out_bytes = B * N * D * int64_t(sizeof(T)) * ((residual ? 1 : 0) + (norm ? 1 : 0));
  // On Zen 4 the streamed forward lost wherever its reads and writes fit the L3 (fp32 2048x1152:
  // rms_norm 1.21x and per-sample norm_modulate 1.16-1.22x slower in two sessions' A/Bs), and gained or
  // broke even beyond it (residual and per-token forms at the same shape 1.2-1.5x faster streamed):
  // benchmarks/results/2026-12-01-cpu-epyc-2core-stream-ab*.txt. Sapphire Rapids streamed faster at
  // 2048x1152 and keeps the size rule alone.
  const int64_t per_row_reads = 1 + (residual ? 1 : 0) + (gate_per_row ? 1 : 0) +
                                (p.shift.ptr && p.shift.sn != 0 ? 1 : 0) + (p.scale.ptr && p.scale.sn != 0 ? 1 : 0);
  const bool fits_llc = cpu::cpu_is_amd() && !cpu::stream_bytes_setting() &&
                        out_bytes + B * N * D * int64_t(sizeof(T)) * per_row_reads <= cpu::llc_bytes();
  const bool stream = kStreams && vec_rows && !fits_llc && out_bytes >= cpu::stream_threshold(kStreamBytes) && (D * int64_t(sizeof(T))) % 64 == 0 &&
                      (!p.out || reinterpret_cast<uintptr_t>(p.out) % 64 == 0) &&
                      (!p.x_out || reinterpret_cast<uintptr_t>(p.x_out) % 64 == 0);
  // Per-token shift/scale: fold them into the output loop instead of precomputing coefficients.
  const bool vec_token = vec_rows && coef_per_row && (!p.shift.ptr || p.shift.sd == 1) &&
                         (!p.scale.ptr || p.scale.sd == 1);
  const A* w = static_cast<const A*>(p.weight);
  const A* bias = static_cast<const A*>(p.bias);
  const bool plain = !w && !bias && !p.shift.ptr && !p.scale.ptr;  // out = xhat
  A* mean_out = static_cast<A*>(p.mean);
  A* rstd_out = static_cast<A*>(p.rstd);

  at::parallel_for(0, B * plan.chunks, grain_for(B * plan.chunks, B * N * D), [&](int64_t t0, int64_t t1) {
    Scratch<A> s(6, D);
    A *xb = s[0], *ca = s[1], *cb = s[2], *gb = s[3], *t1b = s[4], *t2b = s[5];
    int64_t coef_b = -1, gate_b = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / plan.chunks, n0 = (t % plan.chunks) * plan.rows_per_task;
      const int64_t n1 = std::min(N, n0 + plan.rows_per_task);
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t row = b * N + n;
        T* xo = residual ? static_cast<T*>(p.x_out) + row * D : nullptr;
        A mean = 0, rstd = 0;
        // Stage 1: xb = x (+ gate*y), x_out written, statistics.
        if (vec_rows) {
          vec_residual_stats<T>(row_of<T>(p.x, b, n), residual ? row_of<T>(p.gate, b, n) : nullptr,
                                residual ? row_of<T>(p.y, b, n) : nullptr, xo, D, xb, p.kind, p.eps, mean, rstd, stream,
                                residual ? next_strided_row<T>(p.gate, b, n, n1, D) : nullptr);
        } else {
          widen<T>(p.x, b, n, D, xb);
          if (residual) {
            if (gate_per_row || gate_b != b) {
              widen<T>(p.gate, b, n, D, gb);
              gate_b = b;
            }
            widen<T>(p.y, b, n, D, t1b);
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) xb[i] += gb[i] * t1b[i];
            // Normalise the rounded residual, as an unfused x' = x + g*y; h = norm(x') would.
            cpu::narrow_row<T>(xb, D, xo);
            if constexpr (!std::is_same_v<T, A>) cpu::widen_row<T>(xo, 1, D, xb);
          }
          if (norm) std::tie(mean, rstd) = row_stats(xb, D, p.kind, p.eps);
        }
        if (!norm) continue;
        mean_out[row] = mean;
        rstd_out[row] = rstd;
        T* out = static_cast<T*>(p.out) + row * D;
        if (vec_token) {
          vec_output_token<T>(xb, w, bias, p.shift.ptr ? row_of<T>(p.shift, b, n) : nullptr,
                              p.scale.ptr ? row_of<T>(p.scale, b, n) : nullptr, rstd, mean, D, out, stream,
                              next_strided_row<T>(p.shift, b, n, n1, D), next_strided_row<T>(p.scale, b, n, n1, D));
          continue;
        }
        if (coef_per_row || coef_b != b) {
          coef_b = b;
          if (p.scale.ptr) widen<T>(p.scale, b, n, D, t1b);
          else fill(t1b, D, A(0));
          if (p.shift.ptr) widen<T>(p.shift, b, n, D, t2b);
          else fill(t2b, D, A(0));
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) {
            ca[i] = A(1) + t1b[i];
            cb[i] = t2b[i];
          }
          if (bias) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) cb[i] += bias[i] * ca[i];
          }
          if (w) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) ca[i] *= w[i];
          }
        }
        if (vec_rows) {
          const bool more = n + 1 < n1;
          vec_output<T>(xb, plain ? nullptr : ca, p.shift.ptr || bias ? cb : nullptr, rstd, mean, D, out, stream,
                        more ? row_of<T>(p.x, b, n + 1) : nullptr, more && !stream ? out + D : nullptr);
        } else {
          // Through a scratch row: GCC's loop writing `out` directly ran several times slower.
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) t1b[i] = (xb[i] - mean) * rstd * ca[i] + cb[i];
          narrow<T>(t1b, D, out);
        }
      }
    }
#ifdef RAEKERN_CPU_VEC16
    if (stream) _mm_sfence();  // make the streamed lines visible before the join
#endif
  });
}

template <class T>
void backward_kernel(const BwdParams& p) {
  using A = acc_t<T>;
  const int64_t B = p.B, N = p.N, D = p.D;
  const bool residual = p.gate.ptr != nullptr;
  const bool norm = p.kind != Kind::None && p.dout.ptr != nullptr;
  const bool scale_per_row = p.scale.ptr && p.scale.sn != 0;
  const bool gate_per_row = residual && p.gate.sn != 0;
  const A* w = static_cast<const A*>(p.weight);
  const A* bias = static_cast<const A*>(p.bias);
  const A* mean_in = static_cast<const A*>(p.mean);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const A inv_d = A(1) / A(D);
  A* partials = static_cast<A*>(p.partials);
  const int64_t np = p.num_partials;
  const auto unit = [](const Operand& o) { return !o.ptr || o.sd == 1; };
  // Hand-vectorised rows need unit feature strides; fp64 (reference precision) uses the generic path.
  const bool vec_rows = has_vec<T> && p.xin.sd == 1 && unit(p.dout) && unit(p.dxo) && unit(p.scale) &&
                        unit(p.gate) && unit(p.y);
  // As in the forward: outputs far larger than the caches bypass them (no read-for-ownership).
  const auto aligned = [](const void* q) { return !q || reinterpret_cast<uintptr_t>(q) % 64 == 0; };
  int64_t out_rows = 1 + (residual ? 1 : 0);
  for (const GradSlot* sl : {&p.dgate, &p.dshift, &p.dscale})
    if (sl->mode == GradMode::PerRow) out_rows += 1;
  const bool stream = kStreams && vec_rows && B * N * D * int64_t(sizeof(T)) * out_rows >= cpu::stream_threshold(kStreamBytes) &&
                      (D * int64_t(sizeof(T))) % 64 == 0 && aligned(p.dx) && aligned(p.dy) &&
                      aligned(p.dgate.ptr) && aligned(p.dshift.ptr) && aligned(p.dscale.ptr);

  at::parallel_for(0, B * p.chunks, grain_for(B * p.chunks, B * N * D), [&](int64_t t0, int64_t t1) {
    Scratch<A> s(7 + 5, D);
    A *xh = s[0], *g = s[1], *ops = s[2], *gb = s[3], *yb = s[4], *tb = s[5], *hb = s[6];
    // Task-local sums, one per reduced gradient, in the slot order of the partial workspace.
    A* acc = s[7];
    auto acc_of = [&](const GradSlot& sl) { return sl.partial >= 0 ? acc + sl.partial * D : nullptr; };
    A *acc_gate = acc_of(p.dgate), *acc_shift = acc_of(p.dshift), *acc_scale = acc_of(p.dscale);
    A *acc_w = acc_of(p.dweight), *acc_b = acc_of(p.dbias);
    int64_t scale_b = -1, gate_b = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.chunks, n0 = (t % p.chunks) * p.rows_per_task;
      const int64_t n1 = std::min(N, n0 + p.rows_per_task);
      fill(acc, np * D, A(0));
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t row = b * N + n;
        if (!norm && p.kind != Kind::None) {  // no gradient reached `out`
          for (const GradSlot* sl : {&p.dshift, &p.dscale})
            if (sl->mode == GradMode::PerRow) std::memset(static_cast<T*>(sl->ptr) + row * D, 0, D * sizeof(T));
        }
        if constexpr (has_vec<T>) {
          if (vec_rows) {
            const auto row_ptr = [&](const GradSlot& sl) -> void* {
              return sl.mode == GradMode::PerRow ? static_cast<T*>(sl.ptr) + row * D : nullptr;
            };
            BwdRowPtrs r;
            r.x = row_of<T>(p.xin, b, n);
            r.dout = norm ? row_of<T>(p.dout, b, n) : nullptr;
            r.dxo = p.dxo.ptr ? row_of<T>(p.dxo, b, n) : nullptr;
            r.scale = p.scale.ptr ? row_of<T>(p.scale, b, n) : nullptr;
            r.gate = residual ? row_of<T>(p.gate, b, n) : nullptr;
            r.y = residual ? row_of<T>(p.y, b, n) : nullptr;
            r.next_scale = norm ? next_strided_row<T>(p.scale, b, n, n1, D) : nullptr;
            r.next_gate = residual ? next_strided_row<T>(p.gate, b, n, n1, D) : nullptr;
            r.dx = static_cast<T*>(p.dx) + row * D;
            r.dy = residual ? static_cast<T*>(p.dy) + row * D : nullptr;
            r.dshift_row = row_ptr(p.dshift), r.dscale_row = row_ptr(p.dscale), r.dgate_row = row_ptr(p.dgate);
            r.acc_shift = acc_shift, r.acc_scale = acc_scale, r.acc_w = acc_w, r.acc_b = acc_b;
            r.acc_gate = acc_gate;
            const A rstd = norm ? rstd_in[row] : A(0);
            const A mean = norm && p.kind == Kind::Layer ? mean_in[row] : A(0);
            vec_backward_row<T>(r, w, bias, mean, rstd, D, p.kind == Kind::Layer, g, stream);
            continue;
          }
        }
        if (norm) {
          const A rstd = rstd_in[row];
          const A mean = p.kind == Kind::Layer ? mean_in[row] : A(0);
          widen<T>(p.xin, b, n, D, xh);
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) xh[i] = (xh[i] - mean) * rstd;
          widen<T>(p.dout, b, n, D, g);
          if (p.scale.ptr && (scale_per_row || scale_b != b)) {
            scale_b = b;
            widen<T>(p.scale, b, n, D, ops);
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) ops[i] += A(1);
          } else if (!p.scale.ptr && scale_b != b) {
            scale_b = b;
            fill(ops, D, A(1));
          }
          // Gradients of the modulation: d shift = g, d scale = g * h with h = xhat * w + bias.
          if (p.dshift.mode == GradMode::PerRow) {
            narrow<T>(g, D, static_cast<T*>(p.dshift.ptr) + row * D);
          } else if (acc_shift) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) acc_shift[i] += g[i];
          }
          if (p.dscale.mode != GradMode::Absent) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) hb[i] = xh[i];
            if (w) {
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) hb[i] *= w[i];
            }
            if (bias) {
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) hb[i] += bias[i];
            }
            if (p.dscale.mode == GradMode::PerRow) {
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) hb[i] *= g[i];
              narrow<T>(hb, D, static_cast<T*>(p.dscale.ptr) + row * D);
            } else {
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) acc_scale[i] += g[i] * hb[i];
            }
          }
          // g <- d h = g * (1 + scale); then the affine gradients; then g <- d xhat.
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) g[i] *= ops[i];
          if (acc_w) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) acc_w[i] += g[i] * xh[i];
          }
          if (acc_b) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) acc_b[i] += g[i];
          }
          if (w) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) g[i] *= w[i];
          }
          A s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t i = 0; i < D; ++i) {
            s1 += g[i];
            s2 += g[i] * xh[i];
          }
          const A c1 = p.kind == Kind::Layer ? s1 * inv_d : A(0), c2 = s2 * inv_d;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) g[i] = rstd * (g[i] - c1 - xh[i] * c2);
          if (p.dxo.ptr) {
            widen<T>(p.dxo, b, n, D, tb);
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) g[i] += tb[i];
          }
        } else if (p.dxo.ptr) {
          widen<T>(p.dxo, b, n, D, g);
        } else {
          fill(g, D, A(0));
        }
        if (residual) {
          // x' = x + gate * y: d y = gate * d x', d gate = d x' * y.
          if (gate_per_row || gate_b != b) {
            gate_b = b;
            widen<T>(p.gate, b, n, D, gb);
          }
          widen<T>(p.y, b, n, D, yb);
          if (p.dgate.mode == GradMode::PerRow) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) tb[i] = g[i] * yb[i];
            narrow<T>(tb, D, static_cast<T*>(p.dgate.ptr) + row * D);
          } else {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) acc_gate[i] += g[i] * yb[i];
          }
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) tb[i] = gb[i] * g[i];
          narrow<T>(tb, D, static_cast<T*>(p.dy) + row * D);
        }
        narrow<T>(g, D, static_cast<T*>(p.dx) + row * D);
      }
      if (np > 0) std::memcpy(partials + t * np * D, acc, np * D * sizeof(A));
    }
#ifdef RAEKERN_CPU_VEC16
    if (stream) _mm_sfence();  // make the streamed lines visible before the join
#endif
  });
}

void forward_cpu(const FwdParams& p, at::ScalarType st) {
  RAEKERN_DISPATCH_FLOATING(st, "raekern.norm_forward", [&] { forward_kernel<scalar_t>(p); });
}

void backward_cpu(const BwdParams& p, at::ScalarType st) {
  RAEKERN_DISPATCH_FLOATING(st, "raekern.norm_backward", [&] { backward_kernel<scalar_t>(p); });
}

int64_t cpu_workers(const at::Tensor&) { return at::get_num_threads(); }

// Tasks of at least 8 tokens keep the partial-sum workspace small next to the data.
}  // namespace

const Backend kCpu{forward_cpu, backward_cpu, cpu_workers, 8};

TORCH_LIBRARY_IMPL(raekern, CPU, m) { register_impls<&kCpu>(m); }

}  // namespace raekern::norm
