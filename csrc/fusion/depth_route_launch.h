// Launch plan of depth_route (+ backward), written once against a Dev (fusion/launch_shape.h) and
// used by both depth_route.cu (CudaDev) and the host emulation (fusion_emu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "fusion/cuda_dispatch.h"
#include "fusion/depth_route_warp_kernel.cuh"
#include "fusion/fusion_args.h"
#include "fusion/launch_shape.h"
#include "fusion/ordered_sum.h"
#include "common/output_alloc.h"

namespace raekern::fusion::cuda {

// Blocks of the backward kernel per SM: blocks stride over tokens so the γ gradient is reduced in
// registers and written with one atomic per element per block.
constexpr int64_t kRouteBwdBlocksPerSm = 8;

// Backward blocks (of kRouteWarps warps) per SM of the warp-per-token kernels: the grid strides over
// tokens and each block writes one partial row of the γ gradient.
constexpr int64_t kRouteWarpBwdBlocksPerSm = 4;

// f(forward, backward): the instances for nv vectors per lane (launch_shape.h's kWarpRowNv buckets).
template <class T, int V, class F>
void with_route_warp_kernels(int nv, F&& f) {
  with_warp_nv<V>(nv, [&](auto c) {
    constexpr int NV = decltype(c)::value;
    f(&depth_route_warp_kernel<T, V, NV>, &depth_route_backward_warp_kernel<T, V, NV>);
  });
}

template <class Dev>
RouteArgs route_args(Dev& dev, at::TensorList experts, const RouteShape& s, const at::Tensor& base,
                     const at::Tensor& lg, const at::Tensor& gm, double cap, const char* op) {
  RAEKERN_CHECK(s.L <= kMaxLayers, op, "experts", "may hold at most ", kMaxLayers, " tensors on CUDA, got ", s.L);
  RouteArgs a{};
  for (int64_t l = 0; l < s.L; ++l) {
    a.expert[l] = dev.in(experts[l], "experts");
    a.sb[l] = experts[l].stride(0);
    a.sn[l] = experts[l].stride(1);
    a.sd[l] = experts[l].stride(2);
  }
  a.base = dev.in(base, "base");
  a.bsb = base.stride(0);
  a.bsn = base.stride(1);
  a.bsd = base.stride(2);
  a.logits = static_cast<const float*>(dev.in(lg, "router_logits"));
  a.gamma = gm.defined() ? static_cast<const float*>(dev.in(gm, "gamma")) : nullptr;
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

template <class Dev>
at::Tensor depth_route_op(at::TensorList experts_in, const at::Tensor& router_logits, const at::Tensor& base,
                          c10::string_view energy, c10::string_view bound, const std::optional<at::Tensor>& gamma,
                          double cap) {
  const char* op = "depth_route";
  const std::vector<at::Tensor> experts = unstack(experts_in);
  const RouteShape s =
      parse_depth_route(experts, router_logits, base, std::string(energy), std::string(bound), gamma, cap, op);
  RAEKERN_CHECK(base.scalar_type() != at::kDouble, op, "base", "float64 is CPU-only; got a CUDA float64 tensor");
  Dev dev(base);
  at::Tensor out = ::raekern::empty_output({s.B, s.N, s.D}, base.options());
  if (out.numel() == 0) return out;
  const at::Tensor lg = router_logits.to(at::kFloat).contiguous();
  const at::Tensor gm = gamma.has_value() ? gamma->to(at::kFloat).contiguous().reshape(-1) : at::Tensor();
  const RouteArgs a = route_args(dev, experts, s, base, lg, gm, cap, op);
  std::vector<at::Tensor> all(experts.begin(), experts.end());
  all.push_back(base);
  all.push_back(out);
  void* outp = dev.out(out, "out");
  RAEKERN_FUSION_DISPATCH_CUDA(base.scalar_type(), "depth_route_cuda", [&] {
    using T = typename Dev::template elem<scalar_t>;
    with_layout(all, s.D, sizeof(T), op, "experts", [&](auto vec) {
      constexpr int V = kV<T, decltype(vec)::value>;
      constexpr int ITEMS = kItems<decltype(vec)::value>;
      if constexpr (decltype(vec)::value) {  // (no warp kernels for scalar rows)
        if (const int nv = warp_row_nv(true, s.D, V); nv > 0) {
          const int64_t blocks = std::min<int64_t>((s.B * s.N + kRouteWarps - 1) / kRouteWarps, int64_t(1) << 30);
          with_route_warp_kernels<T, V>(nv, [&](auto fwd, auto) {
            dev.launch(fwd, dim3(unsigned(blocks)), dim3(kRouteWarps * 32), 0, a, static_cast<T*>(outp));
          });
          return;
        }
      }
      dev.launch(depth_route_kernel<T, V, ITEMS>, dim3(unsigned(s.B * s.N)), dim3(kThreads), 0, a,
                 static_cast<T*>(outp));
    });
  });
  dev.finish();
  return out;
}

template <class Dev>
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> depth_route_backward_op(
    const at::Tensor& grad_in, at::TensorList experts_in, const at::Tensor& router_logits, const at::Tensor& base,
    c10::string_view energy, c10::string_view bound, const std::optional<at::Tensor>& gamma, double cap) {
  const char* op = "depth_route_backward";
  const std::vector<at::Tensor> experts = unstack(experts_in);
  const RouteShape s =
      parse_depth_route(experts, router_logits, base, std::string(energy), std::string(bound), gamma, cap, op);
  RAEKERN_CHECK(grad_in.sizes() == base.sizes() && grad_in.scalar_type() == base.scalar_type(), op, "grad",
                "must match base (shape ", base.sizes(), ", dtype ", base.scalar_type(), "), got ", grad_in.sizes(),
                " ", grad_in.scalar_type());
  raekern::check_same_device(grad_in, base, op, "grad");
  Dev dev(base);
  const at::Tensor grad = grad_in.contiguous();
  const LayerGrads grads = layer_grads(is_stacked(experts_in), s.L, {s.B, s.N, s.D}, base.options());
  const std::vector<at::Tensor>& ge = grads.rows;
  at::Tensor glog = at::zeros({s.B, s.N, s.L}, base.options().dtype(at::kFloat));
  at::Tensor gbase = ::raekern::empty_output({s.B, s.N, s.D}, base.options());
  at::Tensor ggamma = gamma.has_value() ? at::zeros(gamma->sizes(), base.options().dtype(at::kFloat))
                                        : ::raekern::empty_output({0}, base.options());
  if (s.B * s.N > 0 && s.D > 0) {
    const at::Tensor lg = router_logits.to(at::kFloat).contiguous();
    const at::Tensor gm = gamma.has_value() ? gamma->to(at::kFloat).contiguous().reshape(-1) : at::Tensor();
    const RouteArgs a = route_args(dev, experts, s, base, lg, gm, cap, op);
    RouteGradArgs g{};
    g.grad = dev.in(grad, "grad");
    for (int64_t l = 0; l < s.L; ++l) g.dexpert[l] = dev.out(ge[l], "grad_experts");
    g.dbase = dev.out(gbase, "grad_base");
    // Every token's logit gradients are written; zeros above only define an empty-token result.
    g.dlogits = static_cast<float*>(dev.out(glog, "grad_router_logits"));
    std::vector<at::Tensor> all(experts.begin(), experts.end());
    all.push_back(base);
    all.push_back(grad);
    all.push_back(gbase);
    all.push_back(ge[0]);
    const bool vec_rows = rows_vectorizable(all, s.D, base.element_size());
    const int nv = warp_row_nv(vec_rows, s.D, 16 / base.element_size());
    const unsigned blocks =
        nv > 0 ? unsigned(std::min<int64_t>((s.B * s.N + kRouteWarps - 1) / kRouteWarps,
                                            dev.workers(base) * kRouteWarpBwdBlocksPerSm))
               : unsigned(std::min<int64_t>(s.B * s.N, dev.workers(base) * kRouteBwdBlocksPerSm));
    Parts gp;  // γ gradient: one partial row per block, added in block order
    if (gamma.has_value()) gp = make_parts(dev, 1, blocks, s.gamma_numel, base.options(), "grad_gamma");
    g.dgamma = gamma.has_value() ? gp.part_p : nullptr;
    RAEKERN_FUSION_DISPATCH_CUDA(base.scalar_type(), "depth_route_backward_cuda", [&] {
      using T = typename Dev::template elem<scalar_t>;
      with_layout(all, s.D, sizeof(T), op, "experts", [&](auto vec) {
        constexpr int V = kV<T, decltype(vec)::value>;
        constexpr int ITEMS = kItems<decltype(vec)::value>;
        if constexpr (decltype(vec)::value) {
          if (nv > 0) {
            // γ partials of the block's warps meet in shared memory (a [D] γ: one row per warp).
            const size_t smem = sizeof(float) * size_t(s.gamma_numel > 1 ? kRouteWarps * s.D : kRouteWarps);
            with_route_warp_kernels<T, V>(nv, [&](auto, auto bwd) {
              dev.launch(bwd, dim3(blocks), dim3(kRouteWarps * 32), smem, a, g);
            });
            return;
          }
        }
        dev.launch(depth_route_backward_kernel<T, V, ITEMS>, dim3(blocks), dim3(kThreads), 0, a, g);
      });
    });
    if (gamma.has_value()) {
      sum_parts(dev, gp);
      ggamma = gp.sum.reshape(gamma->sizes());
    }
  }
  dev.finish();
  glog = glog.to(router_logits.scalar_type());
  if (gamma.has_value()) ggamma = ggamma.to(gamma->scalar_type());
  return {grads.ret, glog, gbase, ggamma};
}

}  // namespace raekern::fusion::cuda
