// CPU kernels of depth_route (DRoRAE aggregation after the expert MLPs): per token, the router
// logits become depth weights, the L expert rows are reduced, bounded and added to the base row.
// One pass over the experts forward; backward re-reads each token's L rows from cache, not DRAM.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/cpu_cache.h"
#include "common/cpu_convert.h"
#include "common/cpu_utils.h"
#include "common/cpu_vec_math.h"
#include "common/dispatch.h"
#include "fusion/dynamic_tasks.h"
#include "fusion/fusion_args.h"
#include "fusion/row_math.h"
#include "common/output_alloc.h"

namespace raekern::fusion::cpu {
namespace {

using raekern::cpu::acc_t;
using raekern::cpu::narrow_row;
using raekern::cpu::widen_row;

// Gradient outputs from this size (and beyond the last-level cache) are written with non-temporal stores.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// F.normalize's floor on the norm: logits that are all ~0 give weights ~0 instead of NaN.
constexpr double kL2Floor = 1e-12;

template <class A>
void depth_weights(Energy e, const A* a, int64_t L, A* w, A& norm) {
  norm = 0;
  switch (e) {
    case Energy::kL2: {
      A s = 0;
      for (int64_t l = 0; l < L; ++l) s += a[l] * a[l];
      norm = std::max(std::sqrt(s), A(kL2Floor));
      for (int64_t l = 0; l < L; ++l) w[l] = a[l] / norm;
      break;
    }
    case Energy::kSoftmax: {
      A m = a[0];
      for (int64_t l = 1; l < L; ++l) m = std::max(m, a[l]);
      A s = 0;
      for (int64_t l = 0; l < L; ++l) s += (w[l] = std::exp(a[l] - m));
      for (int64_t l = 0; l < L; ++l) w[l] /= s;
      break;
    }
    case Energy::kNone:
      for (int64_t l = 0; l < L; ++l) w[l] = a[l];
      break;
  }
}

template <class A>
void depth_weights_backward(Energy e, const A* w, A norm, const A* gw, int64_t L, A* ga) {
  A dot = 0;
  for (int64_t l = 0; l < L; ++l) dot += w[l] * gw[l];
  switch (e) {
    case Energy::kL2: {
      // Below the floor the weights are a / floor, a linear map.
      const bool floored = norm <= A(kL2Floor);
      for (int64_t l = 0; l < L; ++l) ga[l] = floored ? gw[l] / norm : (gw[l] - w[l] * dot) / norm;
      break;
    }
    case Energy::kSoftmax:
      for (int64_t l = 0; l < L; ++l) ga[l] = w[l] * (gw[l] - dot);
      break;
    case Energy::kNone:
      for (int64_t l = 0; l < L; ++l) ga[l] = gw[l];
      break;
  }
}

template <class T>
struct Route {
  using A = acc_t<T>;
  RouteShape s;
  std::vector<const T*> ptr;
  std::vector<int64_t> sb, sn, sd;
  const A* logits;  // [B, N, L] contiguous
  const A* gamma;   // [1] or [D] or null
  const T* base;
  int64_t bsb, bsn, bsd;
  A cap;

  Route(at::TensorList experts, const RouteShape& shape, const at::Tensor& lg, const at::Tensor& base_t,
        const at::Tensor& gm, double c)
      : s(shape), logits(lg.data_ptr<A>()), gamma(gm.defined() ? gm.data_ptr<A>() : nullptr),
        base(base_t.data_ptr<T>()), bsb(base_t.stride(0)), bsn(base_t.stride(1)), bsd(base_t.stride(2)),
        cap(A(c)) {
    for (const auto& t : experts) {
      ptr.push_back(t.data_ptr<T>());
      sb.push_back(t.stride(0));
      sn.push_back(t.stride(1));
      sd.push_back(t.stride(2));
    }
  }

  // fp32/fp64 rows with unit stride are read where they live; others are widened into scratch.
  static constexpr bool kDirect = std::is_same_v<T, A>;
  const T* expert_ptr(int64_t l, int64_t b, int64_t n) const { return ptr[l] + b * sb[l] + n * sn[l]; }
  const A* expert_row(int64_t l, int64_t b, int64_t n, A* scratch) const {
    const T* src = expert_ptr(l, b, n);
    if constexpr (kDirect)
      if (sd[l] == 1) return reinterpret_cast<const A*>(src);
    widen_row(src, sd[l], s.D, scratch);
    return scratch;
  }
  void load_base(int64_t b, int64_t n, A* row) const { widen_row(base + b * bsb + n * bsn, bsd, s.D, row); }

  // f = Σ_l w_l e_l for token (b, n); also returns the weights and the L2 norm used by them.
  void fuse(int64_t b, int64_t n, A* w, A& norm, A* f, A* row) const {
    depth_weights(s.energy, logits + (b * s.N + n) * s.L, s.L, w, norm);
    std::fill(f, f + s.D, A(0));
    for (int64_t l = 0; l < s.L; ++l) {
      const A* __restrict e = expert_row(l, b, n, row);
      const A c = w[l];
#pragma omp simd
      for (int64_t d = 0; d < s.D; ++d) f[d] += c * e[d];
    }
  }

  A gate(int64_t d) const { return s.gamma_numel == 0 ? A(1) : gamma[s.gamma_numel == 1 ? 0 : d]; }
};

template <class A>
A row_norm(const A* x, int64_t n) { return std::sqrt(row_dot(x, x, n)); }

// The vector kernels (AVX-512 16 lanes, AVX2 8) take fp32/bf16/fp16 rows that are contiguous in D,
// with bound tanh or none (the norm cap needs whole-row norms before any element is final: it keeps
// the row loops).
template <class T>
bool route_vectorised(const Route<T>& k) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    if (k.s.bound == Bound::kNormCap || k.bsd != 1) return false;
    for (int64_t l = 0; l < k.s.L; ++l)
      if (k.sd[l] != 1) return false;
    return true;
  }
}

#if defined(RAEKERN_CPU_VEC16)
using raekern::cpu::load16;
using raekern::cpu::store16;
using raekern::cpu::tail_mask;

// f = Σ_l w_l e_l for 16 channels starting at d. Two partial sums: the FMA chain over the layers is
// latency-bound otherwise. Forward and backward must form f identically (the backward recomputes it).
template <class T>
inline __m512 depth_sum16(const T* const* rows, const float* w, int64_t L, int64_t d, __mmask16 m) {
  __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps();
  int64_t l = 0;
  for (; l + 2 <= L; l += 2) {
    f0 = _mm512_fmadd_ps(_mm512_set1_ps(w[l]), load16(rows[l] + d, m), f0);
    f1 = _mm512_fmadd_ps(_mm512_set1_ps(w[l + 1]), load16(rows[l + 1] + d, m), f1);
  }
  if (l < L) f0 = _mm512_fmadd_ps(_mm512_set1_ps(w[l]), load16(rows[l] + d, m), f0);
  return _mm512_add_ps(f0, f1);
}

// One token forward, 16 channels at a time: f = Σ_l w_l e_l stays in a register across the L expert
// rows (no fp32 row buffer, no widening pass for 16-bit storage), then the bound and the base add.
template <class T>
void route_token_forward_vec(const Route<T>& k, int64_t b, int64_t n, const float* w, const float* gate,
                             const T** rows, T* out) {
  const auto& s = k.s;
  for (int64_t l = 0; l < s.L; ++l) rows[l] = k.expert_ptr(l, b, n);
  const T* bp = k.base + b * k.bsb + n * k.bsn;
  raekern::cpu::for16(s.D, [&](int64_t d, __mmask16 m) {
    const __m512 f = depth_sum16(rows, w, s.L, d, m);
    const __m512 base = load16(bp + d, m);
    const __m512 o = s.bound == Bound::kTanh
                         ? _mm512_fmadd_ps(raekern::cpu::load16(gate + d, m), raekern::cpu::tanh16(f), base)
                         : _mm512_add_ps(base, f);
    store16(out + d, o, m);
  });
}
constexpr int kRouteLanes = 16;
inline float lanes_sum(const float* v) { return _mm512_reduce_add_ps(_mm512_loadu_ps(v)); }
#elif defined(RAEKERN_CPU_VEC8)
// AVX2 + FMA builds: the 16-lane kernels above 8 lanes at a time, in the same order.
using raekern::cpu::lanes_below;
using raekern::cpu::load8;
using raekern::cpu::store8;

template <class T>
inline __m256 depth_sum8(const T* const* rows, const float* w, int64_t L, int64_t d, int64_t left) {
  __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
  int64_t l = 0;
  for (; l + 2 <= L; l += 2) {
    f0 = _mm256_fmadd_ps(_mm256_set1_ps(w[l]), load8(rows[l] + d, left), f0);
    f1 = _mm256_fmadd_ps(_mm256_set1_ps(w[l + 1]), load8(rows[l + 1] + d, left), f1);
  }
  if (l < L) f0 = _mm256_fmadd_ps(_mm256_set1_ps(w[l]), load8(rows[l] + d, left), f0);
  return _mm256_add_ps(f0, f1);
}

template <class T>
void route_token_forward_vec(const Route<T>& k, int64_t b, int64_t n, const float* w, const float* gate,
                             const T** rows, T* out) {
  const auto& s = k.s;
  for (int64_t l = 0; l < s.L; ++l) rows[l] = k.expert_ptr(l, b, n);
  const T* bp = k.base + b * k.bsb + n * k.bsn;
  for (int64_t d = 0; d < s.D; d += 8) {
    const int64_t left = s.D - d;
    const __m256 f = depth_sum8(rows, w, s.L, d, left);
    const __m256 base = load8(bp + d, left);
    const __m256 o = s.bound == Bound::kTanh ? _mm256_fmadd_ps(load8(gate + d, left), raekern::cpu::tanh8(f), base)
                                             : _mm256_add_ps(base, f);
    store8(out + d, o, left);
  }
}
constexpr int kRouteLanes = 8;
inline float lanes_sum(const float* v) { return raekern::cpu::hsum8(_mm256_loadu_ps(v)); }
#endif

template <class T>
void route_forward(const Route<T>& k, T* out) {
  using A = acc_t<T>;
  const auto& s = k.s;
#if defined(RAEKERN_CPU_VEC16) || defined(RAEKERN_CPU_VEC8)
  if constexpr (!std::is_same_v<T, double>) {
  if (route_vectorised(k)) {
    parallel_tasks(s.B * s.N, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> gv(s.D, 1.f), w(s.L);
      std::vector<const T*> rows(s.L);
      if (s.gamma_numel) for (int64_t d = 0; d < s.D; ++d) gv[d] = float(k.gate(d));
      for (int64_t tok = lo; tok < hi; ++tok) {
        const int64_t b = tok / s.N, n = tok % s.N;
        float norm;
        depth_weights(s.energy, k.logits + tok * s.L, s.L, w.data(), norm);
        route_token_forward_vec(k, b, n, w.data(), gv.data(), rows.data(), out + tok * s.D);
      }
    });
    return;
  }
  }
#endif
  parallel_tasks(s.B * s.N, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> fv(s.D), rowv(s.D), basev(s.D), gv(s.D, A(1)), w(s.L);
    A *f = fv.data(), *row = rowv.data(), *bs = basev.data(), *g = gv.data();
    if (s.gamma_numel) for (int64_t d = 0; d < s.D; ++d) g[d] = k.gate(d);
    for (int64_t tok = lo; tok < hi; ++tok) {
      const int64_t b = tok / s.N, n = tok % s.N;
      A norm;
      k.fuse(b, n, w.data(), norm, f, row);
      k.load_base(b, n, bs);
      switch (s.bound) {
        case Bound::kTanh:
#pragma omp simd
          for (int64_t d = 0; d < s.D; ++d) bs[d] += g[d] * tanh_any(f[d]);
          break;
        case Bound::kNormCap: {
          const A nf = row_norm(f, s.D), limit = k.cap * row_norm(bs, s.D);
          const A scale = nf > limit ? limit / nf : A(1);
#pragma omp simd
          for (int64_t d = 0; d < s.D; ++d) bs[d] += scale * f[d];
          break;
        }
        case Bound::kNone:
#pragma omp simd
          for (int64_t d = 0; d < s.D; ++d) bs[d] += f[d];
          break;
      }
      narrow_row(bs, s.D, out + tok * s.D);
    }
  });
}

#if defined(RAEKERN_CPU_VEC16)
// One token backward in a single sweep over its channels, 16 at a time: f is rebuilt from the L
// expert rows, and while those lanes are still in L1 they give every layer's Σ gf·e_l (one partial
// vector per layer in gw_acc) and every layer's gradient row w_l·gf. gbase = g for tanh and none.
// `stream`: the L + 1 gradient rows (cache-line aligned) are written around the caches.
template <class T>
void route_token_backward_vec(const Route<T>& k, int64_t b, int64_t n, const float* w, const float* gate,
                              const T* grow, const T** rows, T* const* ge, T* gbase, float* gw_acc,
                              float* gamma_acc, bool stream) {
  const auto& s = k.s;
  for (int64_t l = 0; l < s.L; ++l) rows[l] = k.expert_ptr(l, b, n);
  std::fill(gw_acc, gw_acc + 16 * s.L, 0.f);
  const auto put = [stream](T* p, __m512 v, __mmask16 m) { raekern::cpu::put16(p, v, m, stream); };
  // gbase = g and gf for 16 channels (and the γ partial sums).
  const auto head = [&](int64_t d, __mmask16 m, __m512& g) {
    const __m512 f = depth_sum16(rows, w, s.L, d, m);
    g = load16(grow + d, m);
    if (s.bound != Bound::kTanh) return g;
    const __m512 th = raekern::cpu::tanh16(f);
    // Lanes past D are zeroed: there f = w·0 is NaN for an infinite weight (an inf logit with
    // energy 'none'), and gw_acc sums all 16 lanes.
    if (gamma_acc)
      raekern::cpu::store16(gamma_acc + d, _mm512_add_ps(raekern::cpu::load16(gamma_acc + d, m), _mm512_mul_ps(g, th)), m);
    return _mm512_maskz_mov_ps(m, _mm512_mul_ps(_mm512_mul_ps(g, raekern::cpu::load16(gate + d, m)),
                                                _mm512_fnmadd_ps(th, th, _mm512_set1_ps(1.f))));
  };
  int64_t d0 = 0;
  if constexpr (sizeof(T) == 2) {
    // 16-bit rows in steps of 32 channels, so every streamed write fills a whole 64-byte line: with
    // 13 output streams, half lines leave the write-combining buffers partial.
    const auto put32 = [stream](T* p, __m512 lo, __m512 hi) {
      if (stream) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(p),
                            _mm512_inserti64x4(_mm512_castsi256_si512(raekern::cpu::store_bits16<T>(lo)),
                                               raekern::cpu::store_bits16<T>(hi), 1));
      } else {
        store16(p, lo, __mmask16(0xffff));
        store16(p + 16, hi, __mmask16(0xffff));
      }
    };
    for (; d0 + 32 <= s.D; d0 += 32) {
      __m512 g0, g1;
      const __m512 gf0 = head(d0, __mmask16(0xffff), g0), gf1 = head(d0 + 16, __mmask16(0xffff), g1);
      put32(gbase + d0, g0, g1);
      for (int64_t l = 0; l < s.L; ++l) {
        float* acc = gw_acc + 16 * l;
        const __m512 e0 = load16(rows[l] + d0, __mmask16(0xffff)), e1 = load16(rows[l] + d0 + 16, __mmask16(0xffff));
        _mm512_storeu_ps(acc, _mm512_fmadd_ps(gf1, e1, _mm512_fmadd_ps(gf0, e0, _mm512_loadu_ps(acc))));
        const __m512 wl = _mm512_set1_ps(w[l]);
        put32(ge[l] + d0, _mm512_mul_ps(wl, gf0), _mm512_mul_ps(wl, gf1));
      }
    }
  }
  raekern::cpu::for16(s.D - d0, [&](int64_t i, __mmask16 m) {
    const int64_t d = d0 + i;
    __m512 g;
    const __m512 gf = head(d, m, g);
    put(gbase + d, g, m);
    for (int64_t l = 0; l < s.L; ++l) {
      float* acc = gw_acc + 16 * l;
      _mm512_storeu_ps(acc, _mm512_fmadd_ps(gf, load16(rows[l] + d, m), _mm512_loadu_ps(acc)));
      put(ge[l] + d, _mm512_mul_ps(_mm512_set1_ps(w[l]), gf), m);
    }
  });
}
#elif defined(RAEKERN_CPU_VEC8)
template <class T>
void route_token_backward_vec(const Route<T>& k, int64_t b, int64_t n, const float* w, const float* gate,
                              const T* grow, const T** rows, T* const* ge, T* gbase, float* gw_acc,
                              float* gamma_acc, bool stream) {
  const auto& s = k.s;
  for (int64_t l = 0; l < s.L; ++l) rows[l] = k.expert_ptr(l, b, n);
  std::fill(gw_acc, gw_acc + 8 * s.L, 0.f);
  // gbase = g and gf for 8 channels (and the γ partial sums).
  const auto head = [&](int64_t d, int64_t left, __m256& g) {
    const __m256 f = depth_sum8(rows, w, s.L, d, left);
    g = load8(grow + d, left);
    if (s.bound != Bound::kTanh) return g;
    const __m256 th = raekern::cpu::tanh8(f);
    if (gamma_acc) store8(gamma_acc + d, _mm256_add_ps(load8(gamma_acc + d, left), _mm256_mul_ps(g, th)), left);
    // Lanes past D are zeroed (see the 16-lane kernel).
    return _mm256_and_ps(lanes_below(left), _mm256_mul_ps(_mm256_mul_ps(g, load8(gate + d, left)),
                                                          _mm256_fnmadd_ps(th, th, _mm256_set1_ps(1.f))));
  };
  // Whole 64-byte lines per step (16 fp32 / 32 16-bit channels): streamed, each of the L + 1 gradient
  // rows is then written a full line at a time, as in the 16-lane kernel.
  constexpr int kV = int(64 / (8 * sizeof(T)));
  int64_t d0 = 0;
  for (; d0 + 8 * kV <= s.D; d0 += 8 * kV) {
    __m256 g[kV], gf[kV];
    for (int j = 0; j < kV; ++j) gf[j] = head(d0 + 8 * j, 8, g[j]);
    const auto put = [&](T* p, const __m256* v) {
      if (stream) raekern::cpu::stream_line8(p, v);
      else
        for (int j = 0; j < kV; ++j) store8(p + 8 * j, v[j]);
    };
    put(gbase + d0, g);
    for (int64_t l = 0; l < s.L; ++l) {
      float* acc = gw_acc + 8 * l;
      __m256 a = _mm256_loadu_ps(acc), o[kV];
      const __m256 wl = _mm256_set1_ps(w[l]);
      for (int j = 0; j < kV; ++j) {
        a = _mm256_fmadd_ps(gf[j], load8(rows[l] + d0 + 8 * j), a);
        o[j] = _mm256_mul_ps(wl, gf[j]);
      }
      _mm256_storeu_ps(acc, a);
      put(ge[l] + d0, o);
    }
  }
  for (int64_t d = d0; d < s.D; d += 8) {
    const int64_t left = s.D - d;
    __m256 g;
    const __m256 gf = head(d, left, g);
    store8(gbase + d, g, left);
    for (int64_t l = 0; l < s.L; ++l) {
      float* acc = gw_acc + 8 * l;
      _mm256_storeu_ps(acc, _mm256_fmadd_ps(gf, load8(rows[l] + d, left), _mm256_loadu_ps(acc)));
      store8(ge[l] + d, _mm256_mul_ps(_mm256_set1_ps(w[l]), gf), left);
    }
  }
}
#endif

template <class T>
void route_backward(const Route<T>& k, const at::Tensor& grad, std::vector<at::Tensor>& ge, at::Tensor& glog,
                    at::Tensor& gbase, at::Tensor& ggamma) {
  using A = acc_t<T>;
  const auto& s = k.s;
  const T* gp = grad.data_ptr<T>();
  const int64_t gsb = grad.stride(0), gsn = grad.stride(1), gsd = grad.stride(2);
  std::vector<T*> gep;
  for (auto& t : ge) gep.push_back(t.data_ptr<T>());
  A* glp = glog.data_ptr<A>();
  T* gbp = gbase.data_ptr<T>();
  const int nthreads = at::get_num_threads();
  std::vector<A> gamma_part(s.gamma_numel ? nthreads * s.D : 0, A(0));
  bool done = false;
#if defined(RAEKERN_CPU_VEC16) || defined(RAEKERN_CPU_VEC8)
  if constexpr (!std::is_same_v<T, double>) {
  if (route_vectorised(k) && gsd == 1) {
    done = true;
    // The L + 1 gradient rows per token, beyond the last-level cache, go around it (stream_rows).
    const int64_t row_bytes = s.D * int64_t(sizeof(T)), out_bytes = (s.L + 1) * s.B * s.N * row_bytes;
    std::vector<const void*> starts(gep.begin(), gep.end());
    starts.push_back(gbp);
    const bool stream = raekern::cpu::stream_rows(out_bytes, row_bytes, kStreamBytes, starts);
    // Static partition, as below: bit-identical γ gradients across runs.
    at::parallel_for(0, s.B * s.N, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> gatev(s.D, 1.f), w(s.L), gw(s.L), ga(s.L), gw_acc(kRouteLanes * s.L);
      std::vector<const T*> rows(s.L);
      std::vector<T*> dst(s.L);
      if (s.gamma_numel) for (int64_t d = 0; d < s.D; ++d) gatev[d] = float(k.gate(d));
      float* my_gamma = gamma_part.empty() ? nullptr : gamma_part.data() + at::get_thread_num() * s.D;
      for (int64_t tok = lo; tok < hi; ++tok) {
        const int64_t b = tok / s.N, n = tok % s.N;
        float norm;
        depth_weights(s.energy, k.logits + tok * s.L, s.L, w.data(), norm);
        for (int64_t l = 0; l < s.L; ++l) dst[l] = gep[l] + tok * s.D;
        route_token_backward_vec(k, b, n, w.data(), gatev.data(), gp + b * gsb + n * gsn, rows.data(), dst.data(),
                                 gbp + tok * s.D, gw_acc.data(), my_gamma, stream);
        for (int64_t l = 0; l < s.L; ++l) gw[l] = lanes_sum(gw_acc.data() + kRouteLanes * l);
        depth_weights_backward(s.energy, w.data(), norm, gw.data(), s.L, ga.data());
        std::copy(ga.begin(), ga.end(), glp + tok * s.L);
      }
      if (stream) _mm_sfence();
    });
  }
  }
#endif
  if (!done) {

  // Static partition (not parallel_tasks): each thread's gamma partial then covers the same tokens
  // on every run, so the gradient is bit-identical across runs for a given thread count.
  at::parallel_for(0, s.B * s.N, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> fv(s.D), rowv(s.D), basev(s.D), gv(s.D), gfv(s.D), gatev(s.D, A(1)), w(s.L), gw(s.L),
        ga(s.L);
    A *f = fv.data(), *row = rowv.data(), *bs = basev.data(), *g = gv.data(), *gf = gfv.data(),
      *gate = gatev.data();
    if (s.gamma_numel) for (int64_t d = 0; d < s.D; ++d) gate[d] = k.gate(d);
    A* my_gamma = gamma_part.empty() ? nullptr : gamma_part.data() + at::get_thread_num() * s.D;
    for (int64_t tok = lo; tok < hi; ++tok) {
      const int64_t b = tok / s.N, n = tok % s.N;
      A norm;
      k.fuse(b, n, w.data(), norm, f, row);
      widen_row(gp + b * gsb + n * gsn, gsd, s.D, g);
      // gbase starts as g; the norm cap adds its dependence on ‖base‖.
      std::copy(g, g + s.D, bs);
      switch (s.bound) {
        case Bound::kTanh:
#pragma omp simd
          for (int64_t d = 0; d < s.D; ++d) {
            const A th = tanh_any(f[d]);
            gf[d] = g[d] * gate[d] * (A(1) - th * th);
            row[d] = g[d] * th;
          }
          if (my_gamma) {
#pragma omp simd
            for (int64_t d = 0; d < s.D; ++d) my_gamma[d] += row[d];
          }
          break;
        case Bound::kNormCap: {
          k.load_base(b, n, row);
          const A nf = row_norm(f, s.D), nb = row_norm(row, s.D), limit = k.cap * nb;
          // !(nf <= limit), not nf > limit: a NaN norm (the forward left it uncapped, so its output is
          // NaN) takes this branch and gives NaN gradients, as the reference's autograd does.
          if (!(nf <= limit)) {
            // Δ = c·‖base‖·f/‖f‖: project g off f̂, and send c·(f̂·g) along base/‖base‖.
            const A fg = row_dot(f, g, s.D) / nf;
            const A sc = limit / nf, fgn = fg / nf;
#pragma omp simd
            for (int64_t d = 0; d < s.D; ++d) gf[d] = sc * (g[d] - f[d] * fgn);
            if (nb > 0) {
              const A cb = k.cap * fg / nb;
#pragma omp simd
              for (int64_t d = 0; d < s.D; ++d) bs[d] += cb * row[d];
            }
          } else {
            std::copy(g, g + s.D, gf);
          }
          break;
        }
        case Bound::kNone:
          std::copy(g, g + s.D, gf);
          break;
      }
      narrow_row(bs, s.D, gbp + tok * s.D);
      for (int64_t l = 0; l < s.L; ++l) {
        gw[l] = row_dot(gf, k.expert_row(l, b, n, row), s.D);
        const A c = w[l];
        T* dst = gep[l] + tok * s.D;
        A* __restrict ge_row = Route<T>::kDirect ? reinterpret_cast<A*>(dst) : row;
#pragma omp simd
        for (int64_t d = 0; d < s.D; ++d) ge_row[d] = c * gf[d];
        if constexpr (!Route<T>::kDirect) narrow_row(row, s.D, dst);
      }
      depth_weights_backward(s.energy, w.data(), norm, gw.data(), s.L, ga.data());
      std::copy(ga.begin(), ga.end(), glp + tok * s.L);
    }
  });
  }
  if (s.gamma_numel) {
    A* gg = ggamma.data_ptr<A>();
    for (int64_t d = 0; d < s.D; ++d) {
      double acc = 0;
      for (int th = 0; th < nthreads; ++th) acc += gamma_part[th * s.D + d];
      if (s.gamma_numel == 1) gg[0] += A(acc);
      else gg[d] = A(acc);
    }
  }
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor depth_route_cpu(at::TensorList experts_in, const at::Tensor& router_logits, const at::Tensor& base,
                           c10::string_view energy, c10::string_view bound, const std::optional<at::Tensor>& gamma,
                           double cap) {
  const std::vector<at::Tensor> experts = unstack(experts_in);
  const RouteShape s = parse_depth_route(experts, router_logits, base, std::string(energy), std::string(bound),
                                         gamma, cap, "depth_route");
  at::Tensor out = ::raekern::empty_output({s.B, s.N, s.D}, base.options());
  if (out.numel() == 0) return out;
  const auto acc = acc_of(base.scalar_type());
  const at::Tensor lg = router_logits.to(acc).contiguous();
  const at::Tensor gm = gamma.has_value() ? gamma->to(acc).contiguous().reshape(-1) : at::Tensor();
  RAEKERN_DISPATCH_FLOATING(base.scalar_type(), "depth_route_cpu", [&] {
    Route<scalar_t> k(experts, s, lg, base, gm, cap);
    route_forward(k, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> depth_route_backward_cpu(
    const at::Tensor& grad, at::TensorList experts_in, const at::Tensor& router_logits, const at::Tensor& base,
    c10::string_view energy, c10::string_view bound, const std::optional<at::Tensor>& gamma, double cap) {
  const char* op = "depth_route_backward";
  const std::vector<at::Tensor> experts = unstack(experts_in);
  const RouteShape s =
      parse_depth_route(experts, router_logits, base, std::string(energy), std::string(bound), gamma, cap, op);
  RAEKERN_CHECK(grad.sizes() == base.sizes() && grad.scalar_type() == base.scalar_type(), op, "grad",
                "must match base (shape ", base.sizes(), ", dtype ", base.scalar_type(), "), got ", grad.sizes(),
                " ", grad.scalar_type());
  const auto acc = acc_of(base.scalar_type());
  LayerGrads ge = layer_grads(is_stacked(experts_in), s.L, {s.B, s.N, s.D}, base.options());
  at::Tensor glog = ::raekern::empty_output({s.B, s.N, s.L}, base.options().dtype(acc));
  at::Tensor gbase = ::raekern::empty_output({s.B, s.N, s.D}, base.options());
  at::Tensor ggamma = gamma.has_value() ? at::zeros(gamma->sizes(), base.options().dtype(acc))
                                        : ::raekern::empty_output({0}, base.options());
  if (s.B * s.N > 0 && s.D > 0) {
    const at::Tensor lg = router_logits.to(acc).contiguous();
    const at::Tensor gm = gamma.has_value() ? gamma->to(acc).contiguous().reshape(-1) : at::Tensor();
    RAEKERN_DISPATCH_FLOATING(base.scalar_type(), "depth_route_backward_cpu", [&] {
      Route<scalar_t> k(experts, s, lg, base, gm, cap);
      route_backward(k, grad, ge.rows, glog, gbase, ggamma);
    });
  } else {
    glog.zero_();
  }
  glog = glog.to(router_logits.scalar_type());
  if (gamma.has_value()) ggamma = ggamma.to(gamma->scalar_type());
  return {ge.ret, glog, gbase, ggamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CPU, m) {
  m.impl("depth_route", &depth_route_cpu);
  m.impl("depth_route_backward", &depth_route_backward_cpu);
}

}  // namespace raekern::fusion::cpu
