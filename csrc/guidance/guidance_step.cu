// CUDA launcher of raekern::guidance_step and raekern::guidance_combine: checks, dtype dispatch, grid,
// current stream, no host synchronisation (per-sample scalars stay on the device).
// NOT YET RUN ON A GPU: compiled for sm_80 and sm_90a on a machine without one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/cuda_launch.h"

// fp32/bf16/fp16 only: a switch without a float64 case, so no float64 kernel is ever instantiated.
#define RAEKERN_DISPATCH_CUDA_FLOATING(TYPE, NAME, ...)                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                   \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)            \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
#include "guidance/guidance_step.h"
#include "guidance/guidance_step_kernel.cuh"

namespace raekern::guidance {
namespace {

using cuda::Params;

// Blocks per sample: enough blocks for the whole GPU at small batches, >= 8 vector iterations each.
int64_t pick_chunk(int64_t B, int64_t N, int V) {
  const int64_t min_chunk = int64_t(cuda::kThreads) * V * 8;
  int64_t chunks = std::max<int64_t>(1, (N + min_chunk - 1) / min_chunk);
  const int64_t target_blocks = 1024;
  if (B * chunks > target_blocks) chunks = std::max<int64_t>(1, target_blocks / std::max<int64_t>(B, 1));
  int64_t chunk = (N + chunks - 1) / chunks;
  chunk = (chunk + V - 1) / V * V;  // keeps every block's start vector-aligned
  return std::max<int64_t>(chunk, V);
}

template <class T>
void launch(Prepared& pr) {
  using DT = cuda_t<T>;
  const Config& cfg = pr.cfg;
  Params p{};
  p.cfg = cfg;
  p.B = pr.B;
  p.N = pr.N;
  p.ns = cfg.num_streams();
  p.nout = cfg.num_outputs();
  p.first_m = 1 + cfg.K;
  p.last_m = p.first_m + (cfg.has_momentum ? cfg.J : 0);
  constexpr int V = simt::kVec16<DT>;
  bool vec_ok = pr.N % V == 0;
  for (int e = 0; e < p.ns; ++e) {
    p.ptr[e] = pr.streams[e].ptr;
    p.stride[e] = pr.streams[e].stride;
    const bool is_m = e >= p.first_m && e < p.last_m;
    const int64_t esize = is_m ? 4 : int64_t(sizeof(T));
    vec_ok = vec_ok && reinterpret_cast<uintptr_t>(p.ptr[e]) % 16 == 0 && (p.stride[e] * esize) % 16 == 0;
  }
  p.vec_ok = vec_ok;
  p.chunk = pick_chunk(pr.B, pr.N, vec_ok ? V : 1);
  p.chunks = (pr.N + p.chunk - 1) / p.chunk;
  p.return_x0 = pr.return_x0;
  p.t = pr.t.const_data_ptr<double>();
  p.t_next = pr.t_next.const_data_ptr<double>();
  p.w = pr.weights.const_data_ptr<double>();
  p.zero_init = pr.zero_init.const_data_ptr<uint8_t>();
  p.coeffs = pr.coeffs.data_ptr<double>();
  p.out = pr.out.data_ptr();
  p.x0 = pr.return_x0 ? pr.x0.data_ptr() : nullptr;
  p.mom_out = cfg.has_momentum ? pr.momentum_out.data_ptr<float>() : nullptr;
  cudaStream_t stream = current_stream();
  const int64_t blocks = pr.B * p.chunks;

  at::Tensor stats;
  const int ng = cfg.gram_size();
  if (cfg.needs_gram() && pr.N > 0) {
    RAEKERN_CHECK(ng <= cuda::kMaxGram, kOp, "terms", "on CUDA, 1 + K + (momentum terms) must be <= ",
                  cuda::kMaxGram, " when a statistic is needed, got ", ng);
    stats = at::zeros({pr.B, gram_entries(ng) + ng}, pr.out.options().dtype(at::kDouble));
    p.stats = stats.data_ptr<double>();
    const size_t smem = size_t(cuda::kThreads / simt::kWarp) * (gram_entries(ng) + ng) * sizeof(float);
    switch (ng) {
#define RAEKERN_GRAM_CASE(NGV)                                                        \
  case NGV:                                                                           \
    cuda::gram_kernel<DT, NGV><<<blocks, cuda::kThreads, smem, stream>>>(p);          \
    break;
      RAEKERN_GRAM_CASE(2)
      RAEKERN_GRAM_CASE(3)
      RAEKERN_GRAM_CASE(4)
      RAEKERN_GRAM_CASE(5)
      RAEKERN_GRAM_CASE(6)
      RAEKERN_GRAM_CASE(7)
      RAEKERN_GRAM_CASE(8)
#undef RAEKERN_GRAM_CASE
      default:
        break;
    }
    RAEKERN_CUDA_CHECK_LAUNCH();
  } else {
    p.stats = nullptr;
  }
  cuda::solve_kernel<<<(pr.B + 63) / 64, 64, 0, stream>>>(p);
  RAEKERN_CUDA_CHECK_LAUNCH();
  if (pr.N > 0) {
    cuda::combine_kernel<DT><<<blocks, cuda::kThreads, 0, stream>>>(p);
    RAEKERN_CUDA_CHECK_LAUNCH();
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
  constexpr const char* op = "guidance_combine";
  RAEKERN_CHECK(!inputs.empty() && int64_t(inputs.size()) <= cuda::kMaxCombineInputs, op, "inputs",
                "must hold 1..", cuda::kMaxCombineInputs, " tensors, got ", inputs.size());
  const at::Tensor& ref = inputs[0];
  RAEKERN_CHECK(ref.scalar_type() != at::kDouble, op, "inputs", "float64 is not supported on CUDA");
  const int64_t B = ref.dim() > 0 ? ref.size(0) : 1;
  const int64_t n_in = int64_t(inputs.size());
  RAEKERN_CHECK(coeffs.dim() == 2 && coeffs.size(0) == B && coeffs.size(1) == n_in, op, "coeffs",
                "must have shape [B, len(inputs)] = [", B, ", ", n_in, "], got ", coeffs.sizes());
  c10::cuda::CUDAGuard guard(ref.device());
  cuda::CombineParams p{};
  std::vector<Rows> rows;
  for (const auto& in : inputs) {
    RAEKERN_CHECK(in.sizes() == ref.sizes(), op, "inputs", "must all have shape ", ref.sizes(), ", got ",
                  in.sizes());
    check_same_dtype(in, ref, op, "inputs");
    check_same_device(in, ref, op, "inputs");
    rows.push_back(rows_of(in));
  }
  for (int64_t e = 0; e < n_in; ++e) {
    p.ptr[e] = rows[e].ptr;
    p.stride[e] = rows[e].stride;
  }
  at::Tensor c = coeffs.to(ref.device(), at::kDouble).contiguous();
  at::Tensor out = at::empty(ref.sizes(), ref.options().memory_format(at::MemoryFormat::Contiguous));
  p.n_in = int(n_in);
  p.B = B;
  p.N = B > 0 ? ref.numel() / B : 0;
  if (p.N == 0) return out;
  p.chunk = pick_chunk(B, p.N, 1);
  p.chunks = (p.N + p.chunk - 1) / p.chunk;
  p.coeffs = c.const_data_ptr<double>();
  p.out = out.data_ptr();
  RAEKERN_DISPATCH_CUDA_FLOATING(ref.scalar_type(), "guidance_combine_cuda", [&] {
      cuda::lincomb_kernel<cuda_t<scalar_t>><<<B * p.chunks, cuda::kThreads, 0, current_stream()>>>(p);
      RAEKERN_CUDA_CHECK_LAUNCH();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CUDA, m) {
  m.impl("guidance_step", &guidance_step_cuda);
  m.impl("guidance_combine", &guidance_combine_cuda);
}

}  // namespace raekern::guidance
