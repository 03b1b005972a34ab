// Launch plan of layer_stack_fuse (+ backward): argument checks, allocation, row layout, grids,
// shared memory and passes, written once against a Dev (fusion/launch_shape.h) and used by both
// layer_stack_fuse.cu (CudaDev) and the host emulation (fusion_emu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "fusion/cuda_dispatch.h"
#include "fusion/fusion_args.h"
#include "fusion/launch_shape.h"
#include "fusion/layer_stack_fuse_warp_kernel.cuh"
#include "fusion/ordered_sum.h"
#include "common/output_alloc.h"

namespace raekern::fusion::cuda {

// Tokens per block of the channels-first kernel: as many rows as fit 48 KiB of shared memory next to
// the kernels' static reduction buffer (no opt-in needed on any architecture: the 48 KiB default
// covers static plus dynamic), at most 32 (a warp's write of one channel) and at most N.
inline int cf_tile_tokens(int64_t D, int64_t N) {
  constexpr int64_t kStaticBytes = 2 * simt::kWarp * int64_t(sizeof(float));  // red[] of the cf kernels
  const int64_t fit = ((48 * 1024 - kStaticBytes) / int64_t(sizeof(float))) / cf_pitch(int(D));
  return int(std::max<int64_t>(1, std::min<int64_t>({fit, 32, N})));
}

template <class Dev>
StackArgs stack_args(Dev& dev, at::TensorList layers, const StackShape& s, const at::Tensor& w, bool normalize,
                     double eps, const at::Tensor& m, const at::Tensor& v, double leps, const char* op) {
  RAEKERN_CHECK(s.L <= kMaxLayers, op, "layers", "may hold at most ", kMaxLayers, " tensors on CUDA, got ", s.L);
  StackArgs a{};
  for (int64_t l = 0; l < s.L; ++l) {
    a.layer[l] = dev.in(layers[l], "layers");
    a.sb[l] = layers[l].stride(0);
    a.st[l] = layers[l].stride(1);
    a.sd[l] = layers[l].stride(2);
  }
  a.L = int(s.L);
  a.D = int(s.D);
  a.inv_d = 1.f / float(s.D);
  a.B = s.B;
  a.T = s.T;
  a.P = s.P;
  a.N = s.N;
  a.reduce = int(s.reduce);
  a.w = w.defined() ? static_cast<const float*>(dev.in(w, "weights")) : nullptr;
  a.uniform = s.reduce == Reduce::kMean ? 1.f / float(s.L) : 1.f;
  a.normalize = normalize;
  a.eps = float(eps);
  a.channels_first = s.channels_first;
  a.lmean = m.defined() ? static_cast<const float*>(dev.in(m, "latent_mean")) : nullptr;
  a.lvar = v.defined() ? static_cast<const float*>(dev.in(v, "latent_var")) : nullptr;
  a.leps = float(leps);
  return a;
}

template <class Dev>
at::Tensor layer_stack_fuse_op(at::TensorList layers_in, const std::optional<at::Tensor>& weights, int64_t skip_tokens,
                               bool normalize, double eps, c10::string_view reduce, bool add_last_token_mean,
                               bool channels_first, int64_t grid_h, int64_t grid_w,
                               const std::optional<at::Tensor>& latent_mean,
                               const std::optional<at::Tensor>& latent_var, double latent_eps) {
  const char* op = "layer_stack_fuse";
  const std::vector<at::Tensor> layers = unstack(layers_in);
  const StackShape s = parse_layer_stack(layers, weights, skip_tokens, std::string(reduce), channels_first, grid_h,
                                         grid_w, latent_mean, latent_var, op);
  RAEKERN_CHECK(layers[0].scalar_type() != at::kDouble, op, "layers", "float64 is CPU-only; got a CUDA float64 tensor");
  Dev dev(layers[0]);
  at::Tensor out = channels_first ? ::raekern::empty_output({s.B, s.D, grid_h, grid_w}, layers[0].options())
                                  : ::raekern::empty_output({s.B, s.N, s.D}, layers[0].options());
  if (out.numel() == 0) return out;
  RAEKERN_CHECK(s.B <= 65535, op, "layers", "batch must be at most 65535 on CUDA, got ", s.B);
  const at::Tensor w = f32(weights), m = f32(latent_mean), v = f32(latent_var);
  StackArgs a = stack_args(dev, layers, s, w, normalize, eps, m, v, latent_eps, op);
  Parts tm;  // the token mean: one partial per mean block, added in order
  if (add_last_token_mean)
    tm = make_parts(dev, s.B, std::min<int64_t>(s.N, kMeanBlocks), s.D, layers[0].options(), "token_mean");
  void* outp = dev.out(out, "out");
  RAEKERN_FUSION_DISPATCH_CUDA(layers[0].scalar_type(), "layer_stack_fuse_cuda", [&] {
    using T = typename Dev::template elem<scalar_t>;
    with_layout(layers, s.D, sizeof(T), op, "layers", [&](auto vec) {
      constexpr int V = kV<T, decltype(vec)::value>;
      constexpr int ITEMS = kItems<decltype(vec)::value>;
      if (add_last_token_mean) {
        dev.launch(last_token_mean_kernel<T, V, ITEMS>, dim3(unsigned(tm.P), unsigned(s.B)), dim3(kThreads), 0, a,
                   tm.part_p);
        sum_parts(dev, tm);
        a.tmean = tm.sum_p;
      }
      if (channels_first) {
        const int tile = cf_tile_tokens(s.D, s.N);
        const dim3 grid(unsigned((s.N + tile - 1) / tile), unsigned(s.B));
        const size_t smem = size_t(tile) * size_t(cf_pitch(int(s.D))) * sizeof(float);
        dev.launch(layer_stack_fuse_cf_kernel<T, V, ITEMS>, grid, dim3(kThreads), smem, a, tile,
                   static_cast<T*>(outp));
      } else {
        if constexpr (decltype(vec)::value) {  // (no warp kernel for scalar rows)
          if (const int nv = warp_row_nv(true, s.D, V); nv > 0) {
            const int64_t blocks = std::min<int64_t>((s.B * s.N + kStackWarps - 1) / kStackWarps, int64_t(1) << 30);
            with_warp_nv<V>(nv, [&](auto c) {
              dev.launch(layer_stack_fuse_warp_kernel<T, V, decltype(c)::value>, dim3(unsigned(blocks)),
                         dim3(kStackWarps * 32), 0, a, static_cast<T*>(outp));
            });
            return;
          }
        }
        dev.launch(layer_stack_fuse_kernel<T, V, ITEMS>, dim3(unsigned(s.B * s.N)), dim3(kThreads), 0, a,
                   static_cast<T*>(outp));
      }
    });
  });
  dev.finish();
  return out;
}

template <class Dev>
std::tuple<std::vector<at::Tensor>, at::Tensor> layer_stack_fuse_backward_op(
    const at::Tensor& grad_in, at::TensorList layers_in, const std::optional<at::Tensor>& weights, int64_t skip_tokens,
    bool normalize, double eps, c10::string_view reduce, bool add_last_token_mean, bool channels_first,
    const std::optional<at::Tensor>& latent_var, double latent_eps, bool weights_grad) {
  const char* op = "layer_stack_fuse_backward";
  const std::vector<at::Tensor> layers = unstack(layers_in);
  const int64_t gh = channels_first && grad_in.dim() == 4 ? grad_in.size(2) : 0;
  const int64_t gw = channels_first && grad_in.dim() == 4 ? grad_in.size(3) : 0;
  const StackShape s = parse_layer_stack(layers, weights, skip_tokens, std::string(reduce), channels_first, gh, gw,
                                         latent_var, latent_var, op);
  RAEKERN_CHECK(grad_in.scalar_type() == layers[0].scalar_type() && grad_in.numel() == s.B * s.N * s.D, op, "grad",
                "must match the forward output (", s.B * s.N * s.D, " elements of ", layers[0].scalar_type(),
                "), got ", grad_in.sizes(), " ", grad_in.scalar_type());
  raekern::check_same_device(grad_in, layers[0], op, "grad");
  Dev dev(layers[0]);
  const at::Tensor grad = grad_in.contiguous();
  LayerGrads grads = layer_grads(is_stacked(layers_in), s.L, {s.B, s.T, s.D}, layers[0].options());
  std::vector<at::Tensor>& dl = grads.rows;
  for (auto& t : dl) dev.fresh(t);
  // The warp kernel writes every row (zeros for the prefix tokens); the block kernels only the patch
  // tokens' rows, so the prefix rows are zeroed here for them.
  std::vector<at::Tensor> all(layers.begin(), layers.end());
  all.push_back(dl[0]);
  if (!channels_first) all.push_back(grad);
  const int nv = channels_first || s.B * s.N == 0 ? 0
                                                  : warp_row_nv(rows_vectorizable(all, s.D, layers[0].element_size()),
                                                                s.D, 16 / layers[0].element_size());
  if (nv == 0 && s.P > 0)
    for (auto& t : dl) t.narrow(1, 0, s.P).zero_();
  const bool want_dw = weights_grad && weights.has_value();
  at::Tensor dw = want_dw ? at::zeros(weights->sizes(), layers[0].options().dtype(at::kFloat))
                          : ::raekern::empty_output({0}, layers[0].options().dtype(weights.has_value() ? weights->scalar_type()
                                                                                           : layers[0].scalar_type()));
  if (s.B * s.N > 0 && s.D > 0) {
    RAEKERN_CHECK(s.B <= 65535, op, "layers", "batch must be at most 65535 on CUDA, got ", s.B);
    const at::Tensor w = f32(weights), v = f32(latent_var);
    StackArgs a = stack_args(dev, layers, s, w, normalize, eps, at::Tensor(), v, latent_eps, op);
    StackGradArgs g{};
    // The prefix rows were zeroed above; the kernel writes the others.
    for (int64_t l = 0; l < s.L; ++l)
      g.dlayer[l] = s.P > 0 && nv == 0 ? dev.inout(dl[l], "grad_layers") : dev.out(dl[l], "grad_layers");
    g.grad = dev.in(grad, "grad");
    // [L] weights: every token writes its row of a [B·N, L] buffer, summed in token order below.
    const bool layer_w = want_dw && weights->dim() == 1;
    Parts dwp;
    if (layer_w) dwp = make_parts(dev, 1, s.B * s.N, s.L, layers[0].options(), "grad_weights");
    g.dw = !want_dw ? nullptr : layer_w ? dwp.part_p : static_cast<float*>(dev.out(dw, "grad_weights"));
    Parts gm;
    if (add_last_token_mean)
      gm = make_parts(dev, s.B, std::min<int64_t>(s.N, kMeanBlocks), s.D, layers[0].options(), "grad_token_mean");
    RAEKERN_FUSION_DISPATCH_CUDA(layers[0].scalar_type(), "layer_stack_fuse_backward_cuda", [&] {
      using T = typename Dev::template elem<scalar_t>;
      with_layout(all, s.D, sizeof(T), op, "layers", [&](auto vec) {
        constexpr int V = kV<T, decltype(vec)::value>;
        constexpr int ITEMS = kItems<decltype(vec)::value>;
        if (add_last_token_mean) {
          dev.launch(grad_token_mean_kernel<T, V, ITEMS>, dim3(unsigned(gm.P), unsigned(s.B)), dim3(kThreads), 0, a,
                     g, gm.part_p);
          sum_parts(dev, gm);
          g.gmean = gm.sum_p;
        }
        if (channels_first) {
          const int tile = cf_tile_tokens(s.D, s.N);
          const dim3 grid(unsigned((s.N + tile - 1) / tile), unsigned(s.B));
          const size_t smem = size_t(tile) * size_t(cf_pitch(int(s.D))) * sizeof(float);
          dev.launch(layer_stack_fuse_backward_cf_kernel<T, V, ITEMS>, grid, dim3(kThreads), smem, a, g, tile);
        } else {
          if constexpr (decltype(vec)::value) {  // (no warp kernel for scalar rows)
            if (nv > 0) {
              const int64_t blocks =
                  std::min<int64_t>((s.B * s.T + kStackWarps - 1) / kStackWarps, int64_t(1) << 30);
              with_warp_nv<V>(nv, [&](auto c) {
                dev.launch(layer_stack_fuse_backward_warp_kernel<T, V, decltype(c)::value>, dim3(unsigned(blocks)),
                           dim3(kStackWarps * 32), 0, a, g);
              });
              return;
            }
          }
          dev.launch(layer_stack_fuse_backward_kernel<T, V, ITEMS>, dim3(unsigned(s.B * s.N)), dim3(kThreads), 0, a,
                     g);
        }
      });
    });
    if (layer_w) {
      sum_parts(dev, dwp);
      dw = dwp.sum;  // [1, L]
    }
  }
  dev.finish();
  if (want_dw) dw = dw.reshape(weights->sizes()).to(weights->scalar_type());
  return {grads.ret, dw};
}

}  // namespace raekern::fusion::cuda
