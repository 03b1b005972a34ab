// CPU kernels of layer_stack_fuse (RAEv2 multi-layer fusion): one pass over the L layers forward,
// one pass over the L layers and the gradient backward, never an [L, B, N, D] intermediate.
//
// Work is split into tiles of kTile consecutive patch tokens of one sample. A tile's fp32 output
// (kTile·D) stays in L2 while the L layers stream through it layer by layer (each layer's tile is
// one contiguous stream for the prefetcher); the channels-first write then moves whole cache lines.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cpu_cache.h"
#include "common/cpu_convert.h"
#include "common/cpu_utils.h"
#include "common/cpu_vec_math.h"
#include "common/dispatch.h"
#include "fusion/dynamic_tasks.h"
#include "fusion/fusion_args.h"
#include "fusion/latent_tile.h"
#include "fusion/row_math.h"
#include "common/output_alloc.h"

namespace raekern::fusion::cpu {
namespace {

using raekern::cpu::acc_t;
using raekern::cpu::narrow;

constexpr const char* kOp = "layer_stack_fuse";
// Layer-gradient bytes from which the backward streams them (and only beyond half the L3, stream_rows).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

#if defined(RAEKERN_CPU_VEC16)
using raekern::cpu::load16;
using raekern::cpu::tail_mask;

// row_moments on a row read from storage: buf = x − x[0] (fp32), mean of buf and rstd, by the same two
// passes. The reductions keep four independent partial vectors: with one, each 16-lane add waits for
// the previous one (4-cycle latency), and the LayerNorm, not memory, bounds the layer fusion.
template <class T>
inline void row_moments_vec(const T* __restrict src, int64_t D, float eps, float* __restrict buf, float& mean,
                            float& rstd, const T* next) {
  const __m512 shift = _mm512_set1_ps(raekern::cpu::to_f(src[0]));
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    // The next row, one row ahead, spread over this one's first pass.
    if (next) raekern::cpu::prefetch_lines(next + d, 64 * int64_t(sizeof(T)));
    const __m512 v0 = _mm512_sub_ps(load16(src + d, 0xffff), shift);
    const __m512 v1 = _mm512_sub_ps(load16(src + d + 16, 0xffff), shift);
    const __m512 v2 = _mm512_sub_ps(load16(src + d + 32, 0xffff), shift);
    const __m512 v3 = _mm512_sub_ps(load16(src + d + 48, 0xffff), shift);
    _mm512_storeu_ps(buf + d, v0);
    _mm512_storeu_ps(buf + d + 16, v1);
    _mm512_storeu_ps(buf + d + 32, v2);
    _mm512_storeu_ps(buf + d + 48, v3);
    a0 = _mm512_add_ps(a0, v0);
    a1 = _mm512_add_ps(a1, v1);
    a2 = _mm512_add_ps(a2, v2);
    a3 = _mm512_add_ps(a3, v3);
  }
  for (; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 v = _mm512_maskz_sub_ps(m, load16(src + d, m), shift);
    raekern::cpu::store16(buf + d, v, m);
    a0 = _mm512_add_ps(a0, v);
  }
  const float mu = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) / float(D);
  const __m512 vm = _mm512_set1_ps(mu);
  a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (d = 0; d + 64 <= D; d += 64) {
    const __m512 v0 = _mm512_sub_ps(_mm512_loadu_ps(buf + d), vm);
    const __m512 v1 = _mm512_sub_ps(_mm512_loadu_ps(buf + d + 16), vm);
    const __m512 v2 = _mm512_sub_ps(_mm512_loadu_ps(buf + d + 32), vm);
    const __m512 v3 = _mm512_sub_ps(_mm512_loadu_ps(buf + d + 48), vm);
    a0 = _mm512_fmadd_ps(v0, v0, a0);
    a1 = _mm512_fmadd_ps(v1, v1, a1);
    a2 = _mm512_fmadd_ps(v2, v2, a2);
    a3 = _mm512_fmadd_ps(v3, v3, a3);
  }
  for (; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 v = _mm512_maskz_sub_ps(m, raekern::cpu::load16(buf + d, m), vm);
    a0 = _mm512_fmadd_ps(v, v, a0);
  }
  const float var = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  mean = mu;
  rstd = 1.f / std::sqrt(var / float(D) + eps);
}

// The same moments read twice from the row itself (in L1 after the first pass), with no shifted copy:
// for the token-major forward below. Returns the shift x[0]; the sums match row_moments_vec's.
template <class T>
inline float row_moments_src(const T* __restrict src, int64_t D, float eps, float& mean, float& rstd,
                             const T* next) {
  const float x0 = raekern::cpu::to_f(src[0]);
  const __m512 shift = _mm512_set1_ps(x0);
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    if (next) raekern::cpu::prefetch_lines(next + d, 64 * int64_t(sizeof(T)));
    for (int j = 0; j < 4; ++j) a[j] = _mm512_add_ps(a[j], _mm512_sub_ps(load16(src + d + 16 * j, 0xffff), shift));
  }
  for (; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    a[0] = _mm512_add_ps(a[0], _mm512_maskz_sub_ps(m, load16(src + d, m), shift));
  }
  const float mu = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]))) / float(D);
  const __m512 vm = _mm512_set1_ps(mu);
  for (auto& v : a) v = _mm512_setzero_ps();
  for (d = 0; d + 64 <= D; d += 64) {
    for (int j = 0; j < 4; ++j) {
      const __m512 v = _mm512_sub_ps(_mm512_sub_ps(load16(src + d + 16 * j, 0xffff), shift), vm);
      a[j] = _mm512_fmadd_ps(v, v, a[j]);
    }
  }
  for (; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 v = _mm512_maskz_sub_ps(m, _mm512_sub_ps(load16(src + d, m), shift), vm);
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
    const float x0 = row_moments_src(rows[l], D, eps, mean, rstd, next ? next[l] : nullptr);
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

template <class T>
struct Stack {
  using A = acc_t<T>;
  StackShape s;
  std::vector<const T*> ptr;
  std::vector<int64_t> sb, st, sd;
  const A* w = nullptr;  // [L] or [B, N, L] in the accumulator type
  A uniform = 1;         // weight of every layer for mean/sum
  bool normalize = true;
  A eps = 0;

  Stack(at::TensorList layers, const StackShape& shape, const at::Tensor& wacc, bool norm, double e)
      : s(shape), normalize(norm), eps(A(e)) {
    for (const auto& t : layers) {
      ptr.push_back(t.data_ptr<T>());
      sb.push_back(t.stride(0));
      st.push_back(t.stride(1));
      sd.push_back(t.stride(2));
    }
    if (wacc.defined()) w = wacc.data_ptr<A>();
    uniform = s.reduce == Reduce::kMean ? A(1) / A(s.L) : A(1);
  }

  A coef(int64_t l, int64_t b, int64_t n) const {
    switch (s.reduce) {
      case Reduce::kLayerWeights: return w[l];
      case Reduce::kTokenWeights: return w[(b * s.N + n) * s.L + l];
      default: return uniform;
    }
  }

  const T* row_ptr(int64_t l, int64_t b, int64_t n) const { return ptr[l] + b * sb[l] + (s.P + n) * st[l]; }

  // acc += c·LN(h_l[b, P + n]) (or c·h if raw) without normalising the row in memory:
  // acc += (c·rstd)·(xs − μ) with xs the shifted row from row_moments. row is scratch.
  // next: the row the caller reads after this one (prefetched), or null.
  void accumulate(int64_t l, int64_t b, int64_t n, A c, A* __restrict row, A* __restrict acc,
                  const T* next = nullptr) const {
#if defined(RAEKERN_CPU_VEC16) || defined(RAEKERN_CPU_VEC8)
    if constexpr (!std::is_same_v<T, double>) {
      if (normalize && sd[l] == 1) {
        float mean, rstd;
        row_moments_vec(row_ptr(l, b, n), s.D, eps, row, mean, rstd, sd[l] == 1 ? next : nullptr);
        const float k = c * rstd;
#pragma omp simd
        for (int64_t d = 0; d < s.D; ++d) acc[d] += k * (row[d] - mean);
        return;
      }
    }
#endif
    raekern::cpu::widen_row(row_ptr(l, b, n), sd[l], s.D, row);
    if (!normalize) {
#pragma omp simd
      for (int64_t d = 0; d < s.D; ++d) acc[d] += c * row[d];
      return;
    }
    A mean, rstd;
    row_moments(row, s.D, eps, mean, rstd);
    const A k = c * rstd;
#pragma omp simd
    for (int64_t d = 0; d < s.D; ++d) acc[d] += k * (row[d] - mean);
  }
};

template <class A>
A* tls_buffer(std::vector<A>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(n);
  return v.data();
}

// Σ over all patch tokens of the last normalised layer, divided by N: [B, D].
template <class T>
std::vector<acc_t<T>> last_token_mean(const Stack<T>& k) {
  using A = acc_t<T>;
  const auto& s = k.s;
  const int64_t tiles = (s.N + kTile - 1) / kTile;
  std::vector<A> part(s.B * tiles * s.D, A(0));
  parallel_tasks(s.B * tiles, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> row(s.D);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / tiles, n0 = (task % tiles) * kTile, n1 = std::min(s.N, n0 + kTile);
      A* acc = part.data() + task * s.D;
      for (int64_t n = n0; n < n1; ++n) {
        k.accumulate(s.L - 1, b, n, A(1), row.data(), acc, n + 1 < n1 ? k.row_ptr(s.L - 1, b, n + 1) : nullptr);
      }
    }
  });
  std::vector<A> out(s.B * s.D, A(0));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t = 0; t < tiles; ++t) {
      const A* p = part.data() + (b * tiles + t) * s.D;
      A* o = out.data() + b * s.D;
      for (int64_t d = 0; d < s.D; ++d) o[d] += p[d];
    }
  for (auto& v : out) v /= A(s.N);
  return out;
}

template <class T>
void fuse_forward(const Stack<T>& k, const acc_t<T>* tmean, const acc_t<T>* lmean, const acc_t<T>* lscale,
                  T* out) {
  using A = acc_t<T>;
  const auto& s = k.s;
  const int64_t tiles = (s.N + kTile - 1) / kTile;
  [[maybe_unused]] bool token_major = false;
#if defined(RAEKERN_CPU_VEC16)
  // Normalised 16-bit layers with unit channel stride take the token-major kernel. fp32 keeps the
  // layer-major tiles: its token rows are a page each at D = 1024, and seven of them per token kept
  // restarting the prefetchers (Zen 5, interleaved A/B at the bench shape: token-major 0.85x, bf16 1.38x).
  token_major = sizeof(T) == 2 && k.normalize;
  for (int64_t l = 0; l < s.L; ++l) token_major = token_major && k.sd[l] == 1;
#endif
  parallel_tasks(s.B * tiles, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> accv(kTile * s.D), rowv(s.D), coefs(s.L), stats(3 * s.L);
    std::vector<const T*> rows(s.L), nexts(s.L);
    A* acc = accv.data();
    A* row = rowv.data();
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / tiles, n0 = (task % tiles) * kTile, tn = std::min(s.N, n0 + kTile) - n0;
#if defined(RAEKERN_CPU_VEC16)
      if constexpr (!std::is_same_v<T, double>) {
        if (token_major) {
          for (int64_t t = 0; t < tn; ++t) {
            const int64_t n = n0 + t;
            for (int64_t l = 0; l < s.L; ++l) {
              rows[l] = k.row_ptr(l, b, n);
              nexts[l] = t + 1 < tn ? k.row_ptr(l, b, n + 1) : nullptr;
              coefs[l] = k.coef(l, b, n);
            }
            fuse_token_vec(rows.data(), coefs.data(), s.L, s.D, k.eps, tmean ? tmean + b * s.D : nullptr,
                           t + 1 < tn ? nexts.data() : nullptr, stats.data(), acc + t * s.D,
                           s.channels_first ? nullptr : out + (b * s.N + n) * s.D);
          }
          if (s.channels_first) store_tile_cf(acc, tn, s.D, s.N, b, n0, lmean, lscale, out);
          continue;
        }
      }
#endif
      std::fill(acc, acc + tn * s.D, A(0));
      for (int64_t l = 0; l < s.L; ++l) {
        for (int64_t t = 0; t < tn; ++t) {
          const T* next = t + 1 < tn ? k.row_ptr(l, b, n0 + t + 1) : l + 1 < s.L ? k.row_ptr(l + 1, b, n0) : nullptr;
          k.accumulate(l, b, n0 + t, k.coef(l, b, n0 + t), row, acc + t * s.D, next);
        }
      }
      if (tmean) {
        const A* m = tmean + b * s.D;
        for (int64_t t = 0; t < tn; ++t) {
          A* a = acc + t * s.D;
#pragma omp simd
          for (int64_t d = 0; d < s.D; ++d) a[d] += m[d];
        }
      }
      if (s.channels_first) {
        store_tile_cf(acc, tn, s.D, s.N, b, n0, lmean, lscale, out);
      } else {
        for (int64_t t = 0; t < tn; ++t) raekern::cpu::narrow_row(acc + t * s.D, s.D, out + (b * s.N + n0 + t) * s.D);
      }
    }
  });
}

// Loads the output gradient of tokens [n0, n0+tn) of sample b as rows [tn, D], undoing the
// channels-first layout and the latent standardisation (d out / d fused = rstd_latent).
template <class T>
void load_grad_tile(const at::Tensor& g, const StackShape& s, const acc_t<T>* lscale, int64_t b, int64_t n0,
                    int64_t tn, acc_t<T>* G) {
  const T* gp = g.data_ptr<T>();
  if (!s.channels_first) {
    for (int64_t t = 0; t < tn; ++t)
      raekern::cpu::widen_row(gp + b * g.stride(0) + (n0 + t) * g.stride(1), g.stride(2), s.D, G + t * s.D);
    return;
  }
  load_tile_cf<T, acc_t<T>>(gp, g.stride(0), g.stride(1), g.stride(2), g.stride(3), g.size(3), s.D, s.N, b, n0, tn,
                            nullptr, lscale, G);
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_acc(const std::optional<at::Tensor>& t, at::ScalarType st) {
  if (!t.has_value()) return at::Tensor();
  return t->to(acc_dtype(st)).contiguous();
}

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

template <class T>
void fuse_backward(const at::Tensor& grad, at::TensorList layers, const StackShape& s, const at::Tensor& w,
                   const at::Tensor& v, bool normalize, double eps, bool add_last_token_mean, double latent_eps,
                   bool want_dw, at::Tensor& dw, std::vector<at::Tensor>& dl) {
    using A = acc_t<T>;
    constexpr bool kDirect = std::is_same_v<T, A>;  // fp32/fp64: read and write rows in place, no staging
    Stack<T> k(layers, s, w, normalize, eps);
    std::vector<A> lsv;
    if (v.defined()) lsv = latent_scale(v.data_ptr<A>(), s.D * s.N, A(latent_eps), true);
    const A* lscale = lsv.empty() ? nullptr : lsv.data();
    const int64_t tiles = (s.N + kTile - 1) / kTile;
    const int64_t D = s.D;
    // The token-mean term sends (1/N)·Σ_n g[b, n] to every token of the last layer.
    std::vector<A> gmean, gmsum;
    if (add_last_token_mean) {
      std::vector<A> part(s.B * tiles * D, A(0));
      parallel_tasks(s.B * tiles, 1, [&](int64_t lo, int64_t hi) {
        std::vector<A> G(kTile * D);
        for (int64_t task = lo; task < hi; ++task) {
          const int64_t b = task / tiles, n0 = (task % tiles) * kTile, tn = std::min(s.N, n0 + kTile) - n0;
          load_grad_tile<T>(grad, s, lscale, b, n0, tn, G.data());
          A* p = part.data() + task * D;
          for (int64_t t = 0; t < tn; ++t) {
            const A* gt = G.data() + t * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) p[d] += gt[d];
          }
        }
      });
      gmean.assign(s.B * D, A(0));
      gmsum.assign(s.B, A(0));
      for (int64_t b = 0; b < s.B; ++b) {
        for (int64_t t = 0; t < tiles; ++t)
          for (int64_t d = 0; d < D; ++d) gmean[b * D + d] += part[(b * tiles + t) * D + d];
        for (int64_t d = 0; d < D; ++d) gmean[b * D + d] /= A(s.N);
        gmsum[b] = row_sum(gmean.data() + b * D, D);
      }
    }
    // One partial [L] weight gradient per task (not per thread): tasks are claimed dynamically, so a
    // per-thread sum would depend on which thread took which tiles and the result would vary by a
    // rounding from run to run; per-task partials are reduced in task order below.
    const int64_t ntasks = s.B * tiles;
    std::vector<double> dw_part(want_dw && s.reduce == Reduce::kLayerWeights ? ntasks * s.L : 0, 0.0);
    A* dwp = want_dw ? dw.data_ptr<A>() : nullptr;
    std::vector<T*> dptr;
    for (auto& t : dl) dptr.push_back(t.data_ptr<T>());
#if defined(RAEKERN_CPU_VEC16) || defined(RAEKERN_CPU_VEC8)
    // The L layer gradients are written once and never read back: beyond the last-level cache they go
    // around it (saves the read-for-ownership, a third of this kernel's traffic).
    const bool stream = normalize && !std::is_same_v<T, double> &&
                        raekern::cpu::stream_rows(s.L * s.B * s.T * D * int64_t(sizeof(T)), D * int64_t(sizeof(T)),
                                                  kStreamBytes, std::vector<const void*>(dptr.begin(), dptr.end()));
#endif

    parallel_tasks(s.B * tiles, 1, [&](int64_t lo, int64_t hi) {
      std::vector<A> Gv(kTile * D), rowv(D), dxv(D), gsum(kTile);
      A *G = Gv.data(), *row = rowv.data(), *dxb = dxv.data();
      for (int64_t task = lo; task < hi; ++task) {
        double* my_dw = dw_part.empty() ? nullptr : dw_part.data() + task * s.L;
        const int64_t b = task / tiles, n0 = (task % tiles) * kTile, tn = std::min(s.N, n0 + kTile) - n0;
        // The prefix tokens get zero gradient; zeroed here, not by L separate tensor ops (each of
        // which would be one more parallel region to wake the pool for).
        if (n0 == 0 && s.P > 0)
          for (int64_t l = 0; l < s.L; ++l) std::fill(dptr[l] + b * s.T * D, dptr[l] + (b * s.T + s.P) * D, T(0));
        load_grad_tile<T>(grad, s, lscale, b, n0, tn, G);
        for (int64_t t = 0; t < tn; ++t) gsum[t] = row_sum(G + t * D, D);
        for (int64_t l = 0; l < s.L; ++l) {
          const bool last_mean = add_last_token_mean && l == s.L - 1;
          const A* gm = last_mean ? gmean.data() + b * D : nullptr;
          const A gms = last_mean ? gmsum[b] : A(0);
          for (int64_t t = 0; t < tn; ++t) {
            const int64_t n = n0 + t;
            const A* gt = G + t * D;
            const A c = k.coef(l, b, n);
            T* dst = dptr[l] + (b * s.T + s.P + n) * D;
            A* dx = kDirect ? reinterpret_cast<A*>(dst) : dxb;
            const T* src = k.ptr[l] + b * k.sb[l] + (s.P + n) * k.st[l];
            A gy;
#if defined(RAEKERN_CPU_VEC16) || defined(RAEKERN_CPU_VEC8)
            if constexpr (!std::is_same_v<T, double>) {
              if (normalize && k.sd[l] == 1) {
                const bool more = t + 1 < tn;
                const T* next = more ? src + k.st[l] : nullptr;
                gy = row_grad_vec(src, gt, gm, D, c, gsum[t], gms, k.eps, row, dst, next,
                                  more && !stream ? dst + D : nullptr, stream);
                if (want_dw) {
                  if (s.reduce == Reduce::kTokenWeights) dwp[(b * s.N + n) * s.L + l] = gy;
                  else my_dw[l] += double(gy);
                }
                continue;
              }
            }
#endif
            if (normalize) {
              raekern::cpu::widen_row(src, k.sd[l], D, row);
              const RowGrad<A> r = row_grad_coefs(row, gt, gm, D, c, gsum[t], gms, k.eps);
              row_grad_apply(r, row, gt, gm, D, dx);
              gy = r.gy;
            } else {
              raekern::cpu::widen_row(src, k.sd[l], D, row);
              gy = want_dw ? row_dot(gt, row, D) : A(0);
              if (gm) {
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) dx[d] = c * gt[d] + gm[d];
              } else {
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) dx[d] = c * gt[d];
              }
            }
            if (want_dw) {
              if (s.reduce == Reduce::kTokenWeights) dwp[(b * s.N + n) * s.L + l] = gy;
              else my_dw[l] += double(gy);
            }
            if constexpr (!kDirect) raekern::cpu::narrow_row(dxb, D, dst);
          }
        }
      }
#if defined(RAEKERN_CPU_VEC16) || defined(RAEKERN_CPU_VEC8)
      if (stream) _mm_sfence();
#endif
    });
    if (want_dw && s.reduce == Reduce::kLayerWeights) {
      for (int64_t l = 0; l < s.L; ++l) {
        double acc = 0;
        for (int64_t task = 0; task < ntasks; ++task) acc += dw_part[task * s.L + l];
        dwp[l] = A(acc);
      }
    }
}

at::Tensor layer_stack_fuse_cpu(at::TensorList layers, const std::optional<at::Tensor>& weights,
                                int64_t skip_tokens, bool normalize, double eps, c10::string_view reduce,
                                bool add_last_token_mean, bool channels_first, int64_t grid_h, int64_t grid_w,
                                const std::optional<at::Tensor>& latent_mean,
                                const std::optional<at::Tensor>& latent_var, double latent_eps) {
  const StackShape s = parse_layer_stack(layers, weights, skip_tokens, std::string(reduce), channels_first,
                                         grid_h, grid_w, latent_mean, latent_var, kOp);
  const auto st = layers[0].scalar_type();
  const at::Tensor w = as_acc(weights, st), m = as_acc(latent_mean, st), v = as_acc(latent_var, st);
  at::Tensor out = channels_first ? ::raekern::empty_output({s.B, s.D, grid_h, grid_w}, layers[0].options())
                                  : ::raekern::empty_output({s.B, s.N, s.D}, layers[0].options());
  if (out.numel() == 0) return out;
  RAEKERN_DISPATCH_FLOATING(st, "layer_stack_fuse_cpu", [&] {
    using A = acc_t<scalar_t>;
    Stack<scalar_t> k(layers, s, w, normalize, eps);
    std::vector<A> tm;
    if (add_last_token_mean) tm = last_token_mean(k);
    std::vector<A> ls;
    if (v.defined()) ls = latent_scale(v.data_ptr<A>(), s.D * s.N, A(latent_eps), true);
    fuse_forward(k, tm.empty() ? nullptr : tm.data(), m.defined() ? m.data_ptr<A>() : nullptr,
                 ls.empty() ? nullptr : ls.data(), out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> layer_stack_fuse_backward_cpu(
    const at::Tensor& grad, at::TensorList layers, const std::optional<at::Tensor>& weights, int64_t skip_tokens,
    bool normalize, double eps, c10::string_view reduce, bool add_last_token_mean, bool channels_first,
    const std::optional<at::Tensor>& latent_var, double latent_eps, bool weights_grad) {
  const int64_t gh = channels_first && grad.dim() == 4 ? grad.size(2) : 0;
  const int64_t gw = channels_first && grad.dim() == 4 ? grad.size(3) : 0;
  const StackShape s = parse_layer_stack(layers, weights, skip_tokens, std::string(reduce), channels_first, gh,
                                         gw, latent_var, latent_var, "layer_stack_fuse_backward");
  RAEKERN_CHECK(grad.scalar_type() == layers[0].scalar_type(), "layer_stack_fuse_backward", "grad",
                "must have the layers' dtype ", layers[0].scalar_type(), ", got ", grad.scalar_type());
  if (channels_first) {
    RAEKERN_CHECK(grad.dim() == 4 && grad.size(0) == s.B && grad.size(1) == s.D, "layer_stack_fuse_backward",
                  "grad", "must have shape [B, D, H, W], got ", grad.sizes());
  } else {
    RAEKERN_CHECK(grad.dim() == 3 && grad.size(0) == s.B && grad.size(1) == s.N && grad.size(2) == s.D,
                  "layer_stack_fuse_backward", "grad", "must have shape [B, N, D], got ", grad.sizes());
  }
  const auto st = layers[0].scalar_type();
  const at::Tensor w = as_acc(weights, st), v = as_acc(latent_var, st);
  std::vector<at::Tensor> dl;
  for (int64_t l = 0; l < s.L; ++l) dl.push_back(::raekern::empty_output({s.B, s.T, s.D}, layers[0].options()));
  at::Tensor dw;
  const bool want_dw = weights_grad && weights.has_value();
  if (want_dw)
    dw = at::zeros(s.reduce == Reduce::kTokenWeights ? at::IntArrayRef{s.B, s.N, s.L} : at::IntArrayRef{s.L},
                   layers[0].options().dtype(acc_dtype(st)));
  else
    dw = ::raekern::empty_output({0}, layers[0].options().dtype(weights.has_value() ? weights->scalar_type() : st));
  if (s.B == 0 || s.D == 0) return {dl, want_dw ? dw.to(weights->scalar_type()) : dw};

  RAEKERN_DISPATCH_FLOATING(st, "layer_stack_fuse_backward_cpu", [&] {
    fuse_backward<scalar_t>(grad, layers, s, w, v, normalize, eps, add_last_token_mean, latent_eps, want_dw, dw, dl);
  });
  if (want_dw) dw = dw.to(weights->scalar_type());
  return {dl, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CPU, m) {
  m.impl("layer_stack_fuse", &layer_stack_fuse_cpu);
  m.impl("layer_stack_fuse_backward", &layer_stack_fuse_backward_cpu);
}

}  // namespace raekern::fusion::cpu
