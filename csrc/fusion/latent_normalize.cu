// CUDA launcher of latent_normalize / latent_denormalize (+ backwards). Not yet run on a GPU:
// compiled for sm_80/sm_90a.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/cuda_launch.h"
#include "fusion/cuda_dispatch.h"
#include "fusion/fusion_args.h"
#include "fusion/latent_normalize_kernel.cuh"

namespace raekern::fusion::cuda {
namespace {

// tokens [B, N, D] → [B, D, H, W] (to_cf) or back, with out = (in − mean)·s or in·s + mean.
at::Tensor transpose(const at::Tensor& in, const at::Tensor& mean, const at::Tensor& var, double eps, bool inverse,
                     bool to_cf, const char* op) {
  RAEKERN_CHECK(in.scalar_type() != at::kDouble, op, to_cf ? "z" : "x", "float64 is CPU-only; got a CUDA float64 tensor");
  const c10::cuda::CUDAGuard guard(in.device());
  const int64_t B = in.size(0);
  const int64_t D = to_cf ? in.size(2) : in.size(1);
  const int64_t H = var.size(1), W = var.size(2), N = H * W;
  at::Tensor out = to_cf ? at::empty({B, D, H, W}, in.options()) : at::empty({B, N, D}, in.options());
  if (out.numel() == 0) return out;
  RAEKERN_CHECK(B <= 65535, op, to_cf ? "z" : "x", "batch must be at most 65535 on CUDA, got ", B);
  // The kernel splits token indices with 32-bit division (64-bit division is a called routine that spills).
  RAEKERN_CHECK(N <= INT32_MAX, op, "var", "must have at most 2^31 - 1 tokens (H*W) on CUDA, got ", N);
  const at::Tensor v = var.to(at::kFloat).contiguous();
  const at::Tensor m = mean.defined() ? mean.to(at::kFloat).contiguous() : at::Tensor();
  LatentArgs a{};
  a.in = in.data_ptr();
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
  a.mean = m.defined() ? m.data_ptr<float>() : nullptr;
  a.var = v.data_ptr<float>();
  a.eps = float(eps);
  a.inverse = inverse;
  const dim3 grid(unsigned((N + kTileDim - 1) / kTileDim), unsigned((D + kTileDim - 1) / kTileDim), unsigned(B));
  const dim3 block(kTileDim, kTileRows);
  const auto stream = current_stream();
  RAEKERN_FUSION_DISPATCH_CUDA(in.scalar_type(), "latent_transpose_cuda", [&] {
    using T = cuda_t<scalar_t>;
    if (to_cf) latent_transpose_kernel<T, true><<<grid, block, 0, stream>>>(a, cuda_ptr<scalar_t>(out));
    else latent_transpose_kernel<T, false><<<grid, block, 0, stream>>>(a, cuda_ptr<scalar_t>(out));
    RAEKERN_CUDA_CHECK_LAUNCH();
  });
  return out;
}

at::Tensor latent_normalize_cuda(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var, double eps) {
  const char* op = "latent_normalize";
  raekern::check_floating(z, op, "z");
  raekern::check_dim(z, 3, op, "z");
  check_latent_stats(mean, var, z, z.size(2), z.size(1), op);
  return transpose(z, mean, var, eps, true, true, op);
}

at::Tensor latent_normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& var, double eps) {
  const char* op = "latent_normalize_backward";
  raekern::check_dim(grad, 4, op, "grad");
  check_latent_stats(at::Tensor(), var, grad, grad.size(1), grad.size(2) * grad.size(3), op);
  return transpose(grad, at::Tensor(), var, eps, true, false, op);
}

at::Tensor latent_denormalize_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, double eps) {
  const char* op = "latent_denormalize";
  raekern::check_floating(x, op, "x");
  raekern::check_dim(x, 4, op, "x");
  RAEKERN_CHECK(mean.dim() == 3 && mean.sizes() == var.sizes() && mean.size(0) == x.size(1) &&
                    mean.size(1) == x.size(2) && mean.size(2) == x.size(3),
                op, "mean", "and 'var' must have shape [D, H, W] = ", x.sizes().slice(1), ", got ", mean.sizes(),
                " and ", var.sizes());
  check_latent_stats(mean, var, x, x.size(1), x.size(2) * x.size(3), op);
  return transpose(x, mean, var, eps, false, false, op);
}

at::Tensor latent_denormalize_backward_cuda(const at::Tensor& grad, const at::Tensor& var, double eps) {
  const char* op = "latent_denormalize_backward";
  raekern::check_dim(grad, 3, op, "grad");
  check_latent_stats(at::Tensor(), var, grad, grad.size(2), grad.size(1), op);
  return transpose(grad, at::Tensor(), var, eps, false, true, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CUDA, m) {
  m.impl("latent_normalize", &latent_normalize_cuda);
  m.impl("latent_normalize_backward", &latent_normalize_backward_cuda);
  m.impl("latent_denormalize", &latent_denormalize_cuda);
  m.impl("latent_denormalize_backward", &latent_denormalize_backward_cuda);
}

}  // namespace raekern::fusion::cuda
