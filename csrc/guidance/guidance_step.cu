// CUDA launcher of raekern::guidance_step and raekern::guidance_combine: checks, dtype dispatch, grid,
// current stream, no host synchronisation (per-sample scalars stay on the device).
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/cuda_launch.h"

// fp32/bf16/fp16 only: a switch without a float64 case, so no float64 kernel is ever instantiated.
#define RAEKERN_DISPATCH_CUDA_FLOATING(TYPE, NAME, ...)                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                   \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)            \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
#include "guidance/guidance_launch.h"

namespace raekern::guidance {
namespace {

using cuda::Params;

template <class T>
void launch(Prepared& pr) {
  using DT = cuda_t<T>;
  Params p;
  const cuda::StepLaunch L = cuda::plan_step<DT>(pr, p);
  cudaStream_t stream = current_stream();
  at::Tensor stats;
  if (L.gram) {
    stats = at::empty({pr.B * p.chunks, L.stats_entries}, pr.out.options().dtype(at::kDouble));
    p.stats = stats.data_ptr<double>();
    cuda::with_gram_kernel<DT>(L.ng, [&](auto kernel) {
      kernel<<<L.blocks, cuda::kThreads, L.gram_smem, stream>>>(p);
      RAEKERN_CUDA_CHECK_LAUNCH();
    });
  }
  cuda::with_solve_kernel(pr.cfg, [&](auto kernel) {
    kernel<<<L.solve_blocks, L.solve_threads, 0, stream>>>(p);
    RAEKERN_CUDA_CHECK_LAUNCH();
  });
  if (L.combine) {
    cuda::with_combine_kernel<DT>(L.combine_ns, [&](auto kernel) {
      kernel<<<L.blocks, cuda::kThreads, 0, stream>>>(p);
      RAEKERN_CUDA_CHECK_LAUNCH();
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> guidance_step_cuda(
    const at::Tensor& x, at::TensorList branches, const at::Tensor& t,
    const std::optional<at::Tensor>& t_next, const at::Tensor& weights,
    const std::optional<at::Tensor>& zero_init, const std::optional<at::Tensor>& momentum,
    const std::optional<at::Tensor>& x_prev, const std::optional<at::Tensor>& u_prev,
    at::IntArrayRef param, int64_t base, at::IntArrayRef term_pos, at::IntArrayRef term_neg,
    at::IntArrayRef stats_space, at::IntArrayRef zero_star, at::ArrayRef<double> apg_beta,
    at::ArrayRef<double> apg_r, at::ArrayRef<double> apg_eta, double rescale_phi,
    int64_t rescale_space, int64_t rescale_ref, int64_t out_param, int64_t solver, bool return_x0) {
  RAEKERN_CHECK(x.scalar_type() != at::kDouble, kOp, "x", "float64 is not supported on CUDA (use the CPU op)");
  c10::cuda::CUDAGuard guard(x.device());
  Prepared p = prepare(x, branches, t, t_next, weights, zero_init, momentum, x_prev, u_prev, param, base,
                       term_pos, term_neg, stats_space, zero_star, apg_beta, apg_r, apg_eta, rescale_phi,
                       rescale_space, rescale_ref, out_param, solver, return_x0);
  if (p.B == 0) return {p.out, p.x0, p.momentum_out, p.coeffs};
  RAEKERN_DISPATCH_CUDA_FLOATING(x.scalar_type(), "guidance_step_cuda", [&] {
    launch<scalar_t>(p);
  });
  return {p.out, p.x0, p.momentum_out, p.coeffs};
}

at::Tensor guidance_combine_cuda(at::TensorList inputs, const at::Tensor& coeffs) {
  const c10::cuda::CUDAGuard guard(inputs.empty() ? coeffs.device() : inputs[0].device());
  PreparedCombine c = prepare_combine(inputs, coeffs, cuda::kMaxCombineInputs, /*cuda=*/true);
  if (c.N == 0) return c.out;
  cuda::CombineParams p{};
  p.n_in = int(c.rows.size());
  for (int e = 0; e < p.n_in; ++e) {
    p.ptr[e] = c.rows[e].ptr;
    p.stride[e] = c.rows[e].stride;
  }
  const int64_t blocks = cuda::plan_combine(c.B, c.N, p);
  p.coeffs = c.coeffs.const_data_ptr<double>();
  p.out = c.out.data_ptr();
  RAEKERN_DISPATCH_CUDA_FLOATING(c.out.scalar_type(), "guidance_combine_cuda", [&] {
      cuda::lincomb_kernel<cuda_t<scalar_t>><<<blocks, cuda::kThreads, 0, current_stream()>>>(p);
      RAEKERN_CUDA_CHECK_LAUNCH();
  });
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CUDA, m) {
  m.impl("guidance_step", &guidance_step_cuda);
  m.impl("guidance_combine", &guidance_combine_cuda);
}

}  // namespace raekern::guidance
