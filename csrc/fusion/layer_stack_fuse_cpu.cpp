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
#include "fusion/layer_rows_cpu.h"
#include "fusion/row_math.h"
#include "common/output_alloc.h"

namespace raekern::fusion::cpu {
namespace {

using raekern::cpu::acc_t;
using raekern::cpu::narrow;

constexpr const char* kOp = "layer_stack_fuse";
// Layer-gradient bytes from which the backward streams them (and only beyond half the L3, stream_rows).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

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

at::Tensor layer_stack_fuse_cpu(at::TensorList layers_in, const std::optional<at::Tensor>& weights,
                                int64_t skip_tokens, bool normalize, double eps, c10::string_view reduce,
                                bool add_last_token_mean, bool channels_first, int64_t grid_h, int64_t grid_w,
                                const std::optional<at::Tensor>& latent_mean,
                                const std::optional<at::Tensor>& latent_var, double latent_eps) {
  const std::vector<at::Tensor> layers = unstack(layers_in);
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
    const at::Tensor& grad, at::TensorList layers_in, const std::optional<at::Tensor>& weights, int64_t skip_tokens,
    bool normalize, double eps, c10::string_view reduce, bool add_last_token_mean, bool channels_first,
    const std::optional<at::Tensor>& latent_var, double latent_eps, bool weights_grad) {
  const std::vector<at::Tensor> layers = unstack(layers_in);
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
  LayerGrads grads = layer_grads(is_stacked(layers_in), s.L, {s.B, s.T, s.D}, layers[0].options());
  std::vector<at::Tensor>& dl = grads.rows;
  at::Tensor dw;
  const bool want_dw = weights_grad && weights.has_value();
  if (want_dw)
    dw = at::zeros(s.reduce == Reduce::kTokenWeights ? at::IntArrayRef{s.B, s.N, s.L} : at::IntArrayRef{s.L},
                   layers[0].options().dtype(acc_dtype(st)));
  else
    dw = ::raekern::empty_output({0}, layers[0].options().dtype(weights.has_value() ? weights->scalar_type() : st));
  if (s.B == 0 || s.D == 0) return {grads.ret, want_dw ? dw.to(weights->scalar_type()) : dw};

  RAEKERN_DISPATCH_FLOATING(st, "layer_stack_fuse_backward_cpu", [&] {
    fuse_backward<scalar_t>(grad, layers, s, w, v, normalize, eps, add_last_token_mean, latent_eps, want_dw, dw, dl);
  });
  if (want_dw) dw = dw.to(weights->scalar_type());
  return {grads.ret, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CPU, m) {
  m.impl("layer_stack_fuse", &layer_stack_fuse_cpu);
  m.impl("layer_stack_fuse_backward", &layer_stack_fuse_backward_cpu);
}

}  // namespace raekern::fusion::cpu
