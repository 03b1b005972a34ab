// Argument parsing shared by the CPU and CUDA launchers of the fusion family: every check names the
// argument, and the result is a plain description of the problem the kernels iterate over.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/unbind.h>
#include <optional>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/output_alloc.h"

namespace raekern::fusion {

// How the L normalised layers are combined into one token.
enum class Reduce : int { kMean = 0, kSum = 1, kLayerWeights = 2, kTokenWeights = 3 };
enum class Energy : int { kL2 = 0, kSoftmax = 1, kNone = 2 };
enum class Bound : int { kTanh = 0, kNormCap = 1, kNone = 2 };

struct StackShape {
  int64_t L = 0, B = 0, T = 0, D = 0, P = 0, N = 0;
  Reduce reduce = Reduce::kMean;
  bool channels_first = false;
  bool stats = false;  // latent standardisation fused into the channels-first write
};

// The stacked form of a layer (or expert) list: one [L, B, T, D] tensor as the list's only entry, as
// DepthRoutedFusion's batched expert GEMM returns it. The kernels take its L views; the backward
// returns one [L, B, T, D] gradient. Split in Python instead, the autograd of that unbind would stack
// the L gradients again: a copy of the whole tensor in every backward.
inline bool is_stacked(at::TensorList list) { return list.size() == 1 && list[0].dim() == 4; }
inline std::vector<at::Tensor> unstack(at::TensorList list) {
  return is_stacked(list) ? list[0].unbind(0) : list.vec();
}

// Gradients of a layer list: `rows` are the L row tensors [B, T, D] the kernels write, `ret` what the
// op returns (the same tensors, or, for a stacked input, the one [L, B, T, D] tensor they are views of).
struct LayerGrads {
  std::vector<at::Tensor> rows, ret;
};
inline LayerGrads layer_grads(bool stacked, int64_t L, at::IntArrayRef row_shape, const at::TensorOptions& options) {
  LayerGrads g;
  if (stacked) {
    std::vector<int64_t> shape{L};
    shape.insert(shape.end(), row_shape.begin(), row_shape.end());
    const at::Tensor all = ::raekern::empty_output(shape, options);
    g.rows = all.unbind(0);
    g.ret = {all};
  } else {
    for (int64_t l = 0; l < L; ++l) g.rows.push_back(::raekern::empty_output(row_shape, options));
    g.ret = g.rows;
  }
  return g;
}

inline void check_layer_list(at::TensorList layers, const char* op, const char* arg, int64_t dim) {
  RAEKERN_CHECK(!layers.empty(), op, arg, "must hold at least one tensor");
  const at::Tensor& ref = layers[0];
  for (size_t l = 0; l < layers.size(); ++l) {
    const at::Tensor& t = layers[l];
    raekern::check_floating(t, op, arg);
    RAEKERN_CHECK(t.dim() == dim, op, arg, "entry ", l, " must have ", dim, " dimensions, got shape ",
                  t.sizes());
    RAEKERN_CHECK(t.sizes() == ref.sizes(), op, arg, "entries must share one shape: entry ", l,
                  " has shape ", t.sizes(), ", entry 0 has ", ref.sizes());
    RAEKERN_CHECK(t.scalar_type() == ref.scalar_type(), op, arg, "entries must share one dtype: entry ",
                  l, " is ", t.scalar_type(), ", entry 0 is ", ref.scalar_type());
    RAEKERN_CHECK(t.device() == ref.device(), op, arg, "entries must share one device: entry ", l,
                  " is on ", t.device(), ", entry 0 on ", ref.device());
  }
}

inline StackShape parse_layer_stack(at::TensorList layers, const std::optional<at::Tensor>& weights,
                                    int64_t skip_tokens, const std::string& reduce, bool channels_first,
                                    int64_t grid_h, int64_t grid_w,
                                    const std::optional<at::Tensor>& latent_mean,
                                    const std::optional<at::Tensor>& latent_var, const char* op) {
  check_layer_list(layers, op, "layers", 3);
  StackShape s;
  s.L = int64_t(layers.size());
  s.B = layers[0].size(0);
  s.T = layers[0].size(1);
  s.D = layers[0].size(2);
  RAEKERN_CHECK(skip_tokens >= 0 && skip_tokens < s.T, op, "skip_tokens",
                "must be in [0, T) with T = ", s.T, " tokens per layer, got ", skip_tokens);
  s.P = skip_tokens;
  s.N = s.T - s.P;
  if (reduce == "mean") {
    s.reduce = Reduce::kMean;
  } else if (reduce == "sum") {
    s.reduce = Reduce::kSum;
  } else if (reduce == "weighted") {
    RAEKERN_CHECK(weights.has_value(), op, "weights", "is required when reduce='weighted'");
    const at::Tensor& w = *weights;
    raekern::check_floating(w, op, "weights");
    raekern::check_same_device(w, layers[0], op, "weights");
    if (w.dim() == 1) {
      RAEKERN_CHECK(w.size(0) == s.L, op, "weights", "must have shape [L] = [", s.L,
                    "] or [B, N, L], got ", w.sizes());
      s.reduce = Reduce::kLayerWeights;
    } else {
      RAEKERN_CHECK(w.dim() == 3 && w.size(0) == s.B && w.size(1) == s.N && w.size(2) == s.L, op,
                    "weights", "must have shape [L] = [", s.L, "] or [B, N, L] = [", s.B, ", ", s.N, ", ",
                    s.L, "], got ", w.sizes());
      s.reduce = Reduce::kTokenWeights;
    }
  } else {
    RAEKERN_CHECK(false, op, "reduce", "must be one of 'mean', 'sum', 'weighted', got '", reduce, "'");
  }
  if (s.reduce == Reduce::kMean || s.reduce == Reduce::kSum)
    RAEKERN_CHECK(!weights.has_value(), op, "weights", "must be None unless reduce='weighted'");
  s.channels_first = channels_first;
  RAEKERN_CHECK(latent_mean.has_value() == latent_var.has_value(), op,
                latent_mean.has_value() ? "latent_var" : "latent_mean",
                "must be given together with the other latent statistic");
  s.stats = latent_mean.has_value();
  if (channels_first) {
    RAEKERN_CHECK(grid_h > 0 && grid_w > 0 && grid_h * grid_w == s.N, op, "grid",
                  "must be (H, W) with H*W = N = ", s.N, " patch tokens, got (", grid_h, ", ", grid_w, ")");
  } else {
    RAEKERN_CHECK(!s.stats, op, "latent_mean", "requires channels_first=True (the statistics are [D, H, W])");
  }
  if (s.stats) {
    for (const auto& [t, name] : {std::pair{&*latent_mean, "latent_mean"}, std::pair{&*latent_var, "latent_var"}}) {
      raekern::check_floating(*t, op, name);
      raekern::check_same_device(*t, layers[0], op, name);
      RAEKERN_CHECK(t->dim() == 3 && t->size(0) == s.D && t->size(1) == grid_h && t->size(2) == grid_w, op,
                    name, "must have shape [D, H, W] = [", s.D, ", ", grid_h, ", ", grid_w, "], got ",
                    t->sizes());
    }
  }
  return s;
}

// Per-token view of a list of layers: base pointers and element strides, so a kernel reads each layer
// where it lives (views, slices and expanded tensors included).
struct LayerView {
  std::vector<const void*> ptr;
  std::vector<int64_t> sb, st, sd;
};

inline LayerView layer_view(at::TensorList layers) {
  LayerView v;
  for (const auto& t : layers) {
    v.ptr.push_back(t.data_ptr());
    v.sb.push_back(t.stride(0));
    v.st.push_back(t.stride(1));
    v.sd.push_back(t.stride(2));
  }
  return v;
}

inline Energy parse_energy(const std::string& e, const char* op) {
  if (e == "l2") return Energy::kL2;
  if (e == "softmax") return Energy::kSoftmax;
  if (e == "none") return Energy::kNone;
  RAEKERN_CHECK(false, op, "energy", "must be one of 'l2', 'softmax', 'none', got '", e, "'");
  return Energy::kNone;
}

inline Bound parse_bound(const std::string& b, const char* op) {
  if (b == "tanh") return Bound::kTanh;
  if (b == "norm_cap") return Bound::kNormCap;
  if (b == "none") return Bound::kNone;
  RAEKERN_CHECK(false, op, "bound", "must be one of 'tanh', 'norm_cap', 'none', got '", b, "'");
  return Bound::kNone;
}

struct RouteShape {
  int64_t L = 0, B = 0, N = 0, D = 0;
  Energy energy = Energy::kL2;
  Bound bound = Bound::kTanh;
  int64_t gamma_numel = 0;  // 0: no gate (γ = 1), 1: scalar, D: per channel
};

inline RouteShape parse_depth_route(at::TensorList experts, const at::Tensor& logits, const at::Tensor& base,
                                    const std::string& energy, const std::string& bound,
                                    const std::optional<at::Tensor>& gamma, double cap, const char* op) {
  check_layer_list(experts, op, "experts", 3);
  RouteShape s;
  s.L = int64_t(experts.size());
  s.B = experts[0].size(0);
  s.N = experts[0].size(1);
  s.D = experts[0].size(2);
  s.energy = parse_energy(energy, op);
  s.bound = parse_bound(bound, op);
  raekern::check_floating(base, op, "base");
  RAEKERN_CHECK(base.sizes() == experts[0].sizes(), op, "base", "must have the experts' shape [B, N, D] = ",
                experts[0].sizes(), ", got ", base.sizes());
  raekern::check_same_dtype(base, experts[0], op, "base");
  raekern::check_same_device(base, experts[0], op, "base");
  raekern::check_floating(logits, op, "router_logits");
  raekern::check_same_device(logits, experts[0], op, "router_logits");
  RAEKERN_CHECK(logits.dim() == 3 && logits.size(0) == s.B && logits.size(1) == s.N && logits.size(2) == s.L,
                op, "router_logits", "must have shape [B, N, L] = [", s.B, ", ", s.N, ", ", s.L,
                "] (one logit per expert), got ", logits.sizes());
  if (gamma.has_value()) {
    RAEKERN_CHECK(s.bound == Bound::kTanh, op, "gamma", "is only used with bound='tanh'");
    raekern::check_floating(*gamma, op, "gamma");
    raekern::check_same_device(*gamma, experts[0], op, "gamma");
    const int64_t n = gamma->numel();
    RAEKERN_CHECK((n == 1 && gamma->dim() <= 1) || (gamma->dim() == 1 && n == s.D), op, "gamma",
                  "must be a scalar, [1] or [D] = [", s.D, "], got shape ", gamma->sizes());
    s.gamma_numel = n == 1 ? 1 : s.D;
  }
  if (s.bound == Bound::kNormCap)
    RAEKERN_CHECK(cap > 0, op, "cap", "must be a positive ratio c (‖Δ‖ ≤ c·‖base‖) for bound='norm_cap', got ", cap);
  return s;
}

// Latent statistics [D, H, W] against tokens [B, N, D] (N = H*W).
inline void check_latent_stats(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& ref, int64_t D,
                               int64_t N, const char* op) {
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&var, "var"}}) {
    if (t == &mean && !mean.defined()) continue;
    raekern::check_floating(*t, op, name);
    raekern::check_same_device(*t, ref, op, name);
    RAEKERN_CHECK(t->dim() == 3 && t->size(0) == D && t->size(1) * t->size(2) == N, op, name,
                  "must have shape [D, H, W] with D = ", D, " and H*W = ", N, " tokens, got ", t->sizes());
  }
}

// Statistics beside a channels-first [B, D, H, W] tensor (mean may be undefined): the whole grid
// [D, H, W], not just H·W — the kernels take the grid's width from the statistics, so a transposed
// grid would be read with the wrong stride.
inline void check_latent_stats_cf(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& cf,
                                  const char* op) {
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&var, "var"}})
    RAEKERN_CHECK(!t->defined() || (t->dim() == 3 && t->sizes() == cf.sizes().slice(1)), op, name,
                  "must have shape [D, H, W] = ", cf.sizes().slice(1), ", got ", t->sizes());
  check_latent_stats(mean, var, cf, cf.size(1), cf.size(2) * cf.size(3), op);
}

}  // namespace raekern::fusion
