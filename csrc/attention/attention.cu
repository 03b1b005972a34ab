// CUDA launcher of raekern::attention (forward): the host plan of attention_fwd_host.h with device
// pointers from data_ptr and <<<>>> launches of the sm80 mma.sync kernel on the current stream (no
// host synchronisation). raekern.ops.attention routes bf16/fp16 with Dh a multiple of 8 up to 256
// here (exact tile configs at 64, 72, 128, buckets otherwise); everything else goes to SDPA.
// The same plan and kernel run on the host emulation in python_tests/test_attention.py.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "attention/attention_fwd_host.h"
#include "common/cuda_launch.h"

namespace raekern::attention::cuda {

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& qw,
                                                  const std::optional<at::Tensor>& kw,
                                                  const std::optional<at::Tensor>& mask, double scale, double eps,
                                                  int64_t rope_h, int64_t rope_w, double theta, int64_t layout) {
  const c10::cuda::CUDAGuard guard(q.device());
  CudaMem mem;
  CudaLaunch launch;
  return fwd::run(mem, launch, q, k, v, qw, kw, mask, scale, eps, rope_h, rope_w, theta, layout);
}

}  // namespace raekern::attention::cuda

TORCH_LIBRARY_IMPL(raekern, CUDA, m) { m.impl("attention", &raekern::attention::cuda::attention_cuda); }
