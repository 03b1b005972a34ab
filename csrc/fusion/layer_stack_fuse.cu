// CUDA launcher of layer_stack_fuse (+ backward). Not yet run on a GPU: compiled for sm_80/sm_90a.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/cuda_launch.h"
#include "fusion/cuda_dispatch.h"
#include "fusion/fusion_args.h"
#include "fusion/launch_shape.h"
#include "fusion/layer_stack_fuse_kernel.cuh"

namespace raekern::fusion::cuda {
namespace {

constexpr int kScalarItems = 8;  // scalar path: D ≤ 8·256
constexpr int kVecItems = 2;     // vector path: D ≤ 2·256·(16 B / element)

StackArgs make_args(at::TensorList layers, const StackShape& s, const at::Tensor& w, bool normalize, double eps,
                    const at::Tensor& m, const at::Tensor& v, double leps, const char* op) {
  RAEKERN_CHECK(s.L <= kMaxLayers, op, "layers", "may hold at most ", kMaxLayers, " tensors on CUDA, got ", s.L);
  StackArgs a{};
  for (int64_t l = 0; l < s.L; ++l) {
    a.layer[l] = layers[l].data_ptr();
    a.sb[l] = layers[l].stride(0);
    a.st[l] = layers[l].stride(1);
    a.sd[l] = layers[l].stride(2);
  }
  a.L = int(s.L);
  a.D = int(s.D);
  a.B = s.B;
  a.T = s.T;
  a.P = s.P;
  a.N = s.N;
  a.reduce = int(s.reduce);
  a.w = w.defined() ? w.data_ptr<float>() : nullptr;
  a.uniform = s.reduce == Reduce::kMean ? 1.f / float(s.L) : 1.f;
  a.normalize = normalize;
  a.eps = float(eps);
  a.channels_first = s.channels_first;
  a.lmean = m.defined() ? m.data_ptr<float>() : nullptr;
  a.lvar = v.defined() ? v.data_ptr<float>() : nullptr;
  a.leps = float(leps);
  return a;
}

at::Tensor f32(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

template <class F>
void with_layout(at::TensorList layers, int64_t D, int64_t elem, const char* op, F&& f) {
  if (rows_vectorizable(layers, D, elem)) {
    RAEKERN_CHECK(D <= kVecItems * kThreads * (16 / elem), op, "layers", "width D = ", D,
                  " exceeds the CUDA kernel's limit of ", kVecItems * kThreads * (16 / elem));
    f(std::integral_constant<int, 1>{});
  } else {
    RAEKERN_CHECK(D <= kScalarItems * kThreads, op, "layers", "width D = ", D,
                  " exceeds the CUDA kernel's limit of ", kScalarItems * kThreads, " for unaligned rows");
    f(std::integral_constant<int, 0>{});
  }
}

at::Tensor layer_stack_fuse_cuda(at::TensorList layers, const std::optional<at::Tensor>& weights,
                                 int64_t skip_tokens, bool normalize, double eps, c10::string_view reduce,
                                 bool add_last_token_mean, bool channels_first, int64_t grid_h, int64_t grid_w,
                                 const std::optional<at::Tensor>& latent_mean,
                                 const std::optional<at::Tensor>& latent_var, double latent_eps) {
  const char* op = "layer_stack_fuse";
  const StackShape s = parse_layer_stack(layers, weights, skip_tokens, std::string(reduce), channels_first, grid_h,
                                         grid_w, latent_mean, latent_var, op);
  RAEKERN_CHECK(layers[0].scalar_type() != at::kDouble, op, "layers", "float64 is CPU-only; got a CUDA float64 tensor");
  const c10::cuda::CUDAGuard guard(layers[0].device());
  at::Tensor out = channels_first ? at::empty({s.B, s.D, grid_h, grid_w}, layers[0].options())
                                  : at::empty({s.B, s.N, s.D}, layers[0].options());
  if (out.numel() == 0) return out;
  const at::Tensor w = f32(weights), m = f32(latent_mean), v = f32(latent_var);
  StackArgs a = make_args(layers, s, w, normalize, eps, m, v, latent_eps, op);
  at::Tensor tm;
  if (add_last_token_mean) {
    tm = at::zeros({s.B, s.D}, layers[0].options().dtype(at::kFloat));
  }
  const auto stream = current_stream();
  RAEKERN_FUSION_DISPATCH_CUDA(layers[0].scalar_type(), "layer_stack_fuse_cuda", [&] {
    using T = cuda_t<scalar_t>;
    with_layout(layers, s.D, sizeof(T), op, [&](auto vec) {
      constexpr int V = decltype(vec)::value ? 16 / int(sizeof(T)) : 1;
      constexpr int ITEMS = decltype(vec)::value ? kVecItems : kScalarItems;
      if (add_last_token_mean) {
        const dim3 grid(unsigned(std::min<int64_t>(s.N, 64)), unsigned(s.B));
        last_token_mean_kernel<T, V, ITEMS><<<grid, kThreads, 0, stream>>>(a, tm.data_ptr<float>());
        RAEKERN_CUDA_CHECK_LAUNCH();
        a.tmean = tm.data_ptr<float>();
      }
      layer_stack_fuse_kernel<T, V, ITEMS><<<unsigned(s.B * s.N), kThreads, 0, stream>>>(a, cuda_ptr<scalar_t>(out));
      RAEKERN_CUDA_CHECK_LAUNCH();
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> layer_stack_fuse_backward_cuda(
    const at::Tensor& grad_in, at::TensorList layers, const std::optional<at::Tensor>& weights, int64_t skip_tokens,
    bool normalize, double eps, c10::string_view reduce, bool add_last_token_mean, bool channels_first,
    const std::optional<at::Tensor>& latent_var, double latent_eps, bool weights_grad) {
  const char* op = "layer_stack_fuse_backward";
  const int64_t gh = channels_first && grad_in.dim() == 4 ? grad_in.size(2) : 0;
  const int64_t gw = channels_first && grad_in.dim() == 4 ? grad_in.size(3) : 0;
  const StackShape s = parse_layer_stack(layers, weights, skip_tokens, std::string(reduce), channels_first, gh, gw,
                                         latent_var, latent_var, op);
  RAEKERN_CHECK(grad_in.scalar_type() == layers[0].scalar_type() &&
                    grad_in.numel() == s.B * s.N * s.D,
                op, "grad", "must match the forward output (", s.B * s.N * s.D, " elements of ",
                layers[0].scalar_type(), "), got ", grad_in.sizes(), " ", grad_in.scalar_type());
  const c10::cuda::CUDAGuard guard(layers[0].device());
  const at::Tensor grad = grad_in.contiguous();
  std::vector<at::Tensor> dl;
  for (int64_t l = 0; l < s.L; ++l) {
    dl.push_back(at::empty({s.B, s.T, s.D}, layers[0].options()));
    if (s.P > 0) dl.back().narrow(1, 0, s.P).zero_();
  }
  const bool want_dw = weights_grad && weights.has_value();
  at::Tensor dw = want_dw ? at::zeros(weights->sizes(), layers[0].options().dtype(at::kFloat))
                          : at::empty({0}, layers[0].options().dtype(weights.has_value() ? weights->scalar_type()
                                                                                           : layers[0].scalar_type()));
  if (s.B * s.N > 0 && s.D > 0) {
    const at::Tensor w = f32(weights), v = f32(latent_var);
    StackArgs a = make_args(layers, s, w, normalize, eps, at::Tensor(), v, latent_eps, op);
    StackGradArgs g{};
    for (int64_t l = 0; l < s.L; ++l) g.dlayer[l] = dl[l].data_ptr();
    g.grad = grad.data_ptr();
    g.dw = want_dw ? dw.data_ptr<float>() : nullptr;
    at::Tensor gm;
    if (add_last_token_mean) gm = at::zeros({s.B, s.D}, layers[0].options().dtype(at::kFloat));
    const auto stream = current_stream();
    std::vector<at::Tensor> all(layers.begin(), layers.end());
    all.push_back(dl[0]);
    if (!channels_first) all.push_back(grad);
    RAEKERN_FUSION_DISPATCH_CUDA(layers[0].scalar_type(), "layer_stack_fuse_backward_cuda", [&] {
      using T = cuda_t<scalar_t>;
      with_layout(all, s.D, sizeof(T), op, [&](auto vec) {
        constexpr int V = decltype(vec)::value ? 16 / int(sizeof(T)) : 1;
        constexpr int ITEMS = decltype(vec)::value ? kVecItems : kScalarItems;
        if (add_last_token_mean) {
          const dim3 grid(unsigned(std::min<int64_t>(s.N, 64)), unsigned(s.B));
          grad_token_mean_kernel<T, V, ITEMS><<<grid, kThreads, 0, stream>>>(a, g, gm.data_ptr<float>());
          RAEKERN_CUDA_CHECK_LAUNCH();
          g.gmean = gm.data_ptr<float>();
        }
        layer_stack_fuse_backward_kernel<T, V, ITEMS><<<unsigned(s.B * s.N), kThreads, 0, stream>>>(a, g);
        RAEKERN_CUDA_CHECK_LAUNCH();
      });
    });
  }
  if (want_dw) dw = dw.to(weights->scalar_type());
  return {dl, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CUDA, m) {
  m.impl("layer_stack_fuse", &layer_stack_fuse_cuda);
  m.impl("layer_stack_fuse_backward", &layer_stack_fuse_backward_cuda);
}

}  // namespace raekern::fusion::cuda
