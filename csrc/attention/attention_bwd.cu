// CUDA launcher of raekern::attention_backward: the host plan of attention_bwd_host.h with device
// pointers from data_ptr and <<<>>> launches on the current stream (no host synchronisation).
// Four kernels: preprocess (q̂, k̂, Δ), the FlashAttention-2 mainloop (tensor cores for bf16/fp16 at
// Dh ≤ 128, multiples of 8, with aligned v/dO rows; SIMT otherwise; dV, dK̂, dQ̂ by atomics or
// per-CTA slabs when `deterministic`), prologue backward (dq, dk, norm-weight partials), ordered
// reduction of the partials. fp32 / bf16 / fp16, any Dh in [1, 256] (RoPE: Dh % 4 == 0).
// Its kernels also run on the host emulation in python_tests/test_attention.py.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "attention/attention_bwd_host.h"
#include "common/cuda_launch.h"

namespace raekern::attention::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& qw,
    const std::optional<at::Tensor>& kw, const std::optional<at::Tensor>& mask, double scale, double eps,
    int64_t rope_h, int64_t rope_w, double theta, int64_t layout, bool deterministic) {
  const c10::cuda::CUDAGuard guard(q.device());
  CudaMem mem;
  CudaLaunch launch;
  return bwd::run(mem, launch, dout, dlse, q, k, v, out, lse, qw, kw, mask, scale, eps, rope_h, rope_w, theta,
                  layout, deterministic);
}

}  // namespace raekern::attention::cuda

TORCH_LIBRARY_IMPL(raekern, CUDA, m) {
  m.impl("attention_backward", &raekern::attention::cuda::attention_backward_cuda);
}
