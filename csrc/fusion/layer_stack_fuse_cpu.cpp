// CPU kernels of layer_stack_fuse (RAEv2 multi-layer fusion): one pass over the L layers forward,
// one pass over the L layers and the gradient backward, never an [L, B, N, D] intermediate.
//
// Work is split into tiles of kTile consecutive patch tokens of one sample. A tile's fp32 output
// (kTile·D) stays in L2 while the L layers stream through it layer by layer (each layer's tile is
// one contiguous stream for the prefetcher); the channels-first write then moves whole cache lines.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_utils.h"
#include "common/dispatch.h"
#include "fusion/fusion_args.h"
#include "fusion/latent_tile.h"
#include "fusion/row_math.h"

namespace raekern::fusion::cpu {
namespace {

using raekern::cpu::acc_t;
using raekern::cpu::load_row;
using raekern::cpu::narrow;
using raekern::cpu::store_row;

constexpr const char* kOp = "layer_stack_fuse";

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

  // Loads token n (patch index) of layer l, sample b, and normalises it; returns rstd (1 if raw).
  A load(int64_t l, int64_t b, int64_t n, A* row) const {
    const T* src = ptr[l] + b * sb[l] + (s.P + n) * st[l];
    load_row(src, sd[l], s.D, row);
    if (!normalize) return A(1);
    A mean, rstd;
    row_moments(row, s.D, eps, mean, rstd);
    row_normalize(row, s.D, mean, rstd);
    return rstd;
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
  raekern::cpu::parallel_rows(s.B * tiles, kTile * s.D * sizeof(T), [&](int64_t lo, int64_t hi) {
    std::vector<A> row(s.D);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / tiles, n0 = (task % tiles) * kTile, n1 = std::min(s.N, n0 + kTile);
      A* acc = part.data() + task * s.D;
      for (int64_t n = n0; n < n1; ++n) {
        k.load(s.L - 1, b, n, row.data());
#pragma omp simd
        for (int64_t d = 0; d < s.D; ++d) acc[d] += row[d];
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
  raekern::cpu::parallel_rows(s.B * tiles, s.L * kTile * s.D * sizeof(T), [&](int64_t lo, int64_t hi) {
    std::vector<A> accv(kTile * s.D), rowv(s.D);
    A* acc = accv.data();
    A* row = rowv.data();
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / tiles, n0 = (task % tiles) * kTile, tn = std::min(s.N, n0 + kTile) - n0;
      std::fill(acc, acc + tn * s.D, A(0));
      for (int64_t l = 0; l < s.L; ++l) {
        for (int64_t t = 0; t < tn; ++t) {
          k.load(l, b, n0 + t, row);
          const A c = k.coef(l, b, n0 + t);
          A* a = acc + t * s.D;
#pragma omp simd
          for (int64_t d = 0; d < s.D; ++d) a[d] += c * row[d];
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
        for (int64_t t = 0; t < tn; ++t) store_row(acc + t * s.D, s.D, out + (b * s.N + n0 + t) * s.D);
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
      load_row(gp + b * g.stride(0) + (n0 + t) * g.stride(1), g.stride(2), s.D, G + t * s.D);
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
    Stack<T> k(layers, s, w, normalize, eps);
    std::vector<A> lsv;
    if (v.defined()) lsv = latent_scale(v.data_ptr<A>(), s.D * s.N, A(latent_eps), true);
    const A* lscale = lsv.empty() ? nullptr : lsv.data();
    const int64_t tiles = (s.N + kTile - 1) / kTile;
    // The token-mean term sends (1/N)·Σ_n g[b, n] to every token of the last layer.
    std::vector<A> gmean;
    if (add_last_token_mean) {
      std::vector<A> part(s.B * tiles * s.D, A(0));
      raekern::cpu::parallel_rows(s.B * tiles, kTile * s.D * sizeof(T), [&](int64_t lo, int64_t hi) {
        std::vector<A> G(kTile * s.D);
        for (int64_t task = lo; task < hi; ++task) {
          const int64_t b = task / tiles, n0 = (task % tiles) * kTile, tn = std::min(s.N, n0 + kTile) - n0;
          load_grad_tile<T>(grad, s, lscale, b, n0, tn, G.data());
          A* p = part.data() + task * s.D;
          for (int64_t t = 0; t < tn; ++t) {
            const A* gt = G.data() + t * s.D;
#pragma omp simd
            for (int64_t d = 0; d < s.D; ++d) p[d] += gt[d];
          }
        }
      });
      gmean.assign(s.B * s.D, A(0));
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t t = 0; t < tiles; ++t)
          for (int64_t d = 0; d < s.D; ++d) gmean[b * s.D + d] += part[(b * tiles + t) * s.D + d];
      for (auto& x : gmean) x /= A(s.N);
    }
    const int nthreads = at::get_num_threads();
    std::vector<double> dw_part(want_dw && s.reduce == Reduce::kLayerWeights ? nthreads * s.L : 0, 0.0);
    A* dwp = want_dw ? dw.data_ptr<A>() : nullptr;
    std::vector<T*> dptr;
    for (auto& t : dl) dptr.push_back(t.data_ptr<T>());

    raekern::cpu::parallel_rows(s.B * tiles, 2 * s.L * kTile * s.D * sizeof(T), [&](int64_t lo, int64_t hi) {
      std::vector<A> Gv(kTile * s.D), rowv(s.D), dyv(s.D);
      A *G = Gv.data(), *row = rowv.data(), *dy = dyv.data();
      double* my_dw = dw_part.empty() ? nullptr : dw_part.data() + at::get_thread_num() * s.L;
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / tiles, n0 = (task % tiles) * kTile, tn = std::min(s.N, n0 + kTile) - n0;
        load_grad_tile<T>(grad, s, lscale, b, n0, tn, G);
        for (int64_t l = 0; l < s.L; ++l) {
          const bool last_mean = add_last_token_mean && l == s.L - 1;
          for (int64_t t = 0; t < tn; ++t) {
            const int64_t n = n0 + t;
            const A rstd = k.load(l, b, n, row);
            const A* gt = G + t * s.D;
            if (want_dw) {
              const A dot = row_dot(gt, row, s.D);
              if (s.reduce == Reduce::kTokenWeights) dwp[(b * s.N + n) * s.L + l] = dot;
              else my_dw[l] += double(dot);
            }
            const A c = k.coef(l, b, n);
            if (last_mean) {
              const A* gm = gmean.data() + b * s.D;
#pragma omp simd
              for (int64_t d = 0; d < s.D; ++d) dy[d] = c * gt[d] + gm[d];
            } else {
#pragma omp simd
              for (int64_t d = 0; d < s.D; ++d) dy[d] = c * gt[d];
            }
            if (normalize) row_layernorm_backward(row, dy, s.D, rstd);
            store_row(dy, s.D, dptr[l] + (b * s.T + s.P + n) * s.D);
          }
        }
      }
    });
    if (want_dw && s.reduce == Reduce::kLayerWeights) {
      for (int64_t l = 0; l < s.L; ++l) {
        double acc = 0;
        for (int th = 0; th < nthreads; ++th) acc += dw_part[th * s.L + l];
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
  at::Tensor out = channels_first ? at::empty({s.B, s.D, grid_h, grid_w}, layers[0].options())
                                  : at::empty({s.B, s.N, s.D}, layers[0].options());
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
  for (int64_t l = 0; l < s.L; ++l) dl.push_back(at::empty({s.B, s.T, s.D}, layers[0].options()));
  at::Tensor dw;
  const bool want_dw = weights_grad && weights.has_value();
  if (want_dw)
    dw = at::zeros(s.reduce == Reduce::kTokenWeights ? at::IntArrayRef{s.B, s.N, s.L} : at::IntArrayRef{s.L},
                   layers[0].options().dtype(acc_dtype(st)));
  else
    dw = at::empty({0}, layers[0].options().dtype(weights.has_value() ? weights->scalar_type() : st));
  for (auto& t : dl)
    if (s.P > 0) t.narrow(1, 0, s.P).zero_();
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
