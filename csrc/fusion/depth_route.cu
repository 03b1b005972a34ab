// CUDA launcher of depth_route (+ backward). Not yet run on a GPU: compiled for sm_80/sm_90a.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "common/cuda_launch.h"
#include "fusion/cuda_dispatch.h"
#include "fusion/depth_route_kernel.cuh"
#include "fusion/fusion_args.h"
#include "fusion/launch_shape.h"

namespace raekern::fusion::cuda {
namespace {

constexpr int kScalarItems = 8;
constexpr int kVecItems = 2;

RouteArgs make_args(at::TensorList experts, const RouteShape& s, const at::Tensor& base, const at::Tensor& lg,
                    const at::Tensor& gm, double cap, const char* op) {
  RAEKERN_CHECK(s.L <= kMaxLayers, op, "experts", "may hold at most ", kMaxLayers, " tensors on CUDA, got ", s.L);
  RouteArgs a{};
  for (int64_t l = 0; l < s.L; ++l) {
    a.expert[l] = experts[l].data_ptr();
    a.sb[l] = experts[l].stride(0);
    a.sn[l] = experts[l].stride(1);
    a.sd[l] = experts[l].stride(2);
  }
  a.base = base.data_ptr();
  a.bsb = base.stride(0);
  a.bsn = base.stride(1);
  a.bsd = base.stride(2);
  a.logits = lg.data_ptr<float>();
  a.gamma = gm.defined() ? gm.data_ptr<float>() : nullptr;
  a.gamma_numel = int(s.gamma_numel);
  a.L = int(s.L);
  a.D = int(s.D);
  a.N = s.N;
  a.tokens = s.B * s.N;
  a.energy = int(s.energy);
  a.bound = int(s.bound);
  a.cap = float(cap);
  return a;
}

template <class F>
void with_layout(at::TensorList ts, int64_t D, int64_t elem, const char* op, F&& f) {
  if (rows_vectorizable(ts, D, elem)) {
    RAEKERN_CHECK(D <= kVecItems * kThreads * (16 / elem), op, "experts", "width D = ", D,
                  " exceeds the CUDA kernel's limit of ", kVecItems * kThreads * (16 / elem));
    f(std::integral_constant<int, 1>{});
  } else {
    RAEKERN_CHECK(D <= kScalarItems * kThreads, op, "experts", "width D = ", D,
                  " exceeds the CUDA kernel's limit of ", kScalarItems * kThreads, " for unaligned rows");
    f(std::integral_constant<int, 0>{});
  }
}

at::Tensor depth_route_cuda(at::TensorList experts, const at::Tensor& router_logits, const at::Tensor& base,
                            c10::string_view energy, c10::string_view bound, const std::optional<at::Tensor>& gamma,
                            double cap) {
  const char* op = "depth_route";
  const RouteShape s =
      parse_depth_route(experts, router_logits, base, std::string(energy), std::string(bound), gamma, cap, op);
  RAEKERN_CHECK(base.scalar_type() != at::kDouble, op, "base", "float64 is CPU-only; got a CUDA float64 tensor");
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor out = at::empty({s.B, s.N, s.D}, base.options());
  if (out.numel() == 0) return out;
  const at::Tensor lg = router_logits.to(at::kFloat).contiguous();
  const at::Tensor gm = gamma.has_value() ? gamma->to(at::kFloat).contiguous().reshape(-1) : at::Tensor();
  const RouteArgs a = make_args(experts, s, base, lg, gm, cap, op);
  std::vector<at::Tensor> all(experts.begin(), experts.end());
  all.push_back(base);
  all.push_back(out);
  const auto stream = current_stream();
  RAEKERN_FUSION_DISPATCH_CUDA(base.scalar_type(), "depth_route_cuda", [&] {
    using T = cuda_t<scalar_t>;
    with_layout(all, s.D, sizeof(T), op, [&](auto vec) {
      constexpr int V = decltype(vec)::value ? 16 / int(sizeof(T)) : 1;
      constexpr int ITEMS = decltype(vec)::value ? kVecItems : kScalarItems;
      depth_route_kernel<T, V, ITEMS><<<unsigned(s.B * s.N), kThreads, 0, stream>>>(a, cuda_ptr<scalar_t>(out));
      RAEKERN_CUDA_CHECK_LAUNCH();
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> depth_route_backward_cuda(
    const at::Tensor& grad_in, at::TensorList experts, const at::Tensor& router_logits, const at::Tensor& base,
    c10::string_view energy, c10::string_view bound, const std::optional<at::Tensor>& gamma, double cap) {
  const char* op = "depth_route_backward";
  const RouteShape s =
      parse_depth_route(experts, router_logits, base, std::string(energy), std::string(bound), gamma, cap, op);
  RAEKERN_CHECK(grad_in.sizes() == base.sizes() && grad_in.scalar_type() == base.scalar_type(), op, "grad",
                "must match base (shape ", base.sizes(), ", dtype ", base.scalar_type(), "), got ", grad_in.sizes(),
                " ", grad_in.scalar_type());
  const c10::cuda::CUDAGuard guard(base.device());
  const at::Tensor grad = grad_in.contiguous();
  std::vector<at::Tensor> ge;
  for (int64_t l = 0; l < s.L; ++l) ge.push_back(at::empty({s.B, s.N, s.D}, base.options()));
  at::Tensor glog = at::zeros({s.B, s.N, s.L}, base.options().dtype(at::kFloat));
  at::Tensor gbase = at::empty({s.B, s.N, s.D}, base.options());
  at::Tensor ggamma = gamma.has_value() ? at::zeros(gamma->sizes(), base.options().dtype(at::kFloat))
                                        : at::empty({0}, base.options());
  if (s.B * s.N > 0 && s.D > 0) {
    const at::Tensor lg = router_logits.to(at::kFloat).contiguous();
    const at::Tensor gm = gamma.has_value() ? gamma->to(at::kFloat).contiguous().reshape(-1) : at::Tensor();
    const RouteArgs a = make_args(experts, s, base, lg, gm, cap, op);
    RouteGradArgs g{};
    g.grad = grad.data_ptr();
    for (int64_t l = 0; l < s.L; ++l) g.dexpert[l] = ge[l].data_ptr();
    g.dbase = gbase.data_ptr();
    g.dlogits = glog.data_ptr<float>();
    g.dgamma = gamma.has_value() ? ggamma.data_ptr<float>() : nullptr;
    std::vector<at::Tensor> all(experts.begin(), experts.end());
    all.push_back(base);
    all.push_back(grad);
    all.push_back(gbase);
    all.push_back(ge[0]);
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const unsigned blocks = unsigned(std::min<int64_t>(s.B * s.N, int64_t(sms) * 8));
    const auto stream = current_stream();
    RAEKERN_FUSION_DISPATCH_CUDA(base.scalar_type(), "depth_route_backward_cuda", [&] {
      using T = cuda_t<scalar_t>;
      with_layout(all, s.D, sizeof(T), op, [&](auto vec) {
        constexpr int V = decltype(vec)::value ? 16 / int(sizeof(T)) : 1;
        constexpr int ITEMS = decltype(vec)::value ? kVecItems : kScalarItems;
        depth_route_backward_kernel<T, V, ITEMS><<<blocks, kThreads, 0, stream>>>(a, g);
        RAEKERN_CUDA_CHECK_LAUNCH();
      });
    });
  }
  glog = glog.to(router_logits.scalar_type());
  if (gamma.has_value()) ggamma = ggamma.to(gamma->scalar_type());
  return {ge, glog, gbase, ggamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CUDA, m) {
  m.impl("depth_route", &depth_route_cuda);
  m.impl("depth_route_backward", &depth_route_backward_cuda);
}

}  // namespace raekern::fusion::cuda
