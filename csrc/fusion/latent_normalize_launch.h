// Launch plan of latent_normalize / latent_denormalize and their backwards, written once against a
// Dev (fusion/launch_shape.h) and used by both latent_normalize.cu (CudaDev) and the host emulation.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "fusion/cuda_dispatch.h"
#include "fusion/fusion_args.h"
#include "fusion/latent_normalize_kernel.cuh"
#include "fusion/launch_shape.h"
#include "common/output_alloc.h"

namespace raekern::fusion::cuda {

// tokens [B, N, D] → [B, D, H, W] (to_cf) or back, with out = (in − mean)·s or in·s + mean.
template <class Dev>
at::Tensor latent_transpose(const at::Tensor& in, const at::Tensor& mean, const at::Tensor& var, double eps,
                            bool inverse, bool to_cf, const char* op) {
  RAEKERN_CHECK(in.scalar_type() != at::kDouble, op, to_cf ? "z" : "x", "float64 is CPU-only; got a CUDA float64 tensor");
  Dev dev(in);
  const int64_t B = in.size(0);
  const int64_t D = to_cf ? in.size(2) : in.size(1);
  const int64_t H = var.size(1), W = var.size(2), N = H * W;
  at::Tensor out = to_cf ? ::raekern::empty_output({B, D, H, W}, in.options()) : ::raekern::empty_output({B, N, D}, in.options());
  if (out.numel() == 0) return out;
  RAEKERN_CHECK(B <= 65535, op, to_cf ? "z" : "x", "batch must be at most 65535 on CUDA, got ", B);
  // The kernel splits token indices with 32-bit division (64-bit division is a called routine that spills).
  RAEKERN_CHECK(N <= INT32_MAX, op, "var", "must have at most 2^31 - 1 tokens (H*W) on CUDA, got ", N);
  const at::Tensor v = var.to(at::kFloat).contiguous();
  const at::Tensor m = mean.defined() ? mean.to(at::kFloat).contiguous() : at::Tensor();
  LatentArgs a{};
  a.in = dev.in(in, to_cf ? "z" : "x");
  a.sb = in.stride(0);
  if (to_cf) {  // tokens: n at n·stride(1)
    a.sd = in.stride(2);
    a.sh = 0;
    a.sw = in.stride(1);
    a.W = N;
  } else {
    a.sd = in.stride(1);
    a.sh = in.stride(2);
    a.sw = in.stride(3);
    a.W = W;
  }
  a.N = N;
  a.D = D;
  a.mean = m.defined() ? static_cast<const float*>(dev.in(m, "mean")) : nullptr;
  a.var = static_cast<const float*>(dev.in(v, "var"));
  a.eps = float(eps);
  a.inverse = inverse;
  void* outp = dev.out(out, "out");
  // 16-bit elements move in adjacent pairs (4-byte accesses) when every pair is adjacent and aligned:
  // the contiguous dim of the input unit-strided, even sizes and strides (a token pair of the
  // channels-first input inside one grid row: W even), an aligned base.
  const bool pairs = in.element_size() == 2 && N % 2 == 0 && D % 2 == 0 && a.sb % 2 == 0 &&
                     reinterpret_cast<uintptr_t>(in.const_data_ptr()) % 4 == 0 &&
                     (to_cf ? a.sd == 1 && a.sw % 2 == 0 : a.sw == 1 && W % 2 == 0 && a.sh % 2 == 0 && a.sd % 2 == 0);
  const int64_t td = kTileDim * (pairs ? 2 : 1);
  const dim3 grid(unsigned((N + td - 1) / td), unsigned((D + td - 1) / td), unsigned(B));
  const dim3 block(kTileDim, kTileRows);
  RAEKERN_FUSION_DISPATCH_CUDA(in.scalar_type(), "latent_transpose_cuda", [&] {
    using T = typename Dev::template elem<scalar_t>;
    T* o = static_cast<T*>(outp);
    if (pairs && to_cf) dev.launch(latent_transpose_kernel<T, true, 2>, grid, block, 0, a, o);
    else if (pairs) dev.launch(latent_transpose_kernel<T, false, 2>, grid, block, 0, a, o);
    else if (to_cf) dev.launch(latent_transpose_kernel<T, true>, grid, block, 0, a, o);
    else dev.launch(latent_transpose_kernel<T, false>, grid, block, 0, a, o);
  });
  dev.finish();
  return out;
}

template <class Dev>
at::Tensor latent_normalize_op(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var, double eps) {
  const char* op = "latent_normalize";
  raekern::check_floating(z, op, "z");
  raekern::check_dim(z, 3, op, "z");
  check_latent_stats(mean, var, z, z.size(2), z.size(1), op);
  return latent_transpose<Dev>(z, mean, var, eps, true, true, op);
}

template <class Dev>
at::Tensor latent_normalize_backward_op(const at::Tensor& grad, const at::Tensor& var, double eps) {
  const char* op = "latent_normalize_backward";
  raekern::check_dim(grad, 4, op, "grad");
  check_latent_stats_cf(at::Tensor(), var, grad, op);
  return latent_transpose<Dev>(grad, at::Tensor(), var, eps, true, false, op);
}

template <class Dev>
at::Tensor latent_denormalize_op(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, double eps) {
  const char* op = "latent_denormalize";
  raekern::check_floating(x, op, "x");
  raekern::check_dim(x, 4, op, "x");
  check_latent_stats_cf(mean, var, x, op);
  return latent_transpose<Dev>(x, mean, var, eps, false, false, op);
}

template <class Dev>
at::Tensor latent_denormalize_backward_op(const at::Tensor& grad, const at::Tensor& var, double eps) {
  const char* op = "latent_denormalize_backward";
  raekern::check_dim(grad, 3, op, "grad");
  check_latent_stats(at::Tensor(), var, grad, grad.size(2), grad.size(1), op);
  return latent_transpose<Dev>(grad, at::Tensor(), var, eps, false, true, op);
}

}  // namespace raekern::fusion::cuda
