// CUDA launcher of raekern::attention_backward: the host plan of attention_bwd_host.h with device
// pointers from data_ptr and <<<>>> launches on the current stream (no host synchronisation).
// Four kernels: preprocess (q̂, k̂, Δ), the SIMT FlashAttention-2 mainloop (dV, dK̂, dQ̂ by atomics or
// per-CTA slabs when `deterministic`), prologue backward (dq, dk, norm-weight partials), ordered
// reduction of the partials. fp32 / bf16 / fp16, any Dh in [1, 256] (RoPE: Dh % 4 == 0).
// NOT YET RUN ON A GPU — compiled for sm_80 and sm_90a; its kernels run on the host emulation in
// python_tests/test_attention.py, and the GPU check (benchmarks/gpu_check.sh) verifies them.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <utility>

#include "attention/attention_bwd_host.h"
#include "common/cuda_launch.h"

namespace raekern::attention::cuda {

namespace {

struct CudaMem {
  template <class T> using dev_t = cuda_t<T>;
  template <class T> const dev_t<T>* in(const at::Tensor& t, const char*) {
    return reinterpret_cast<const dev_t<T>*>(t.data_ptr<T>());
  }
  template <class T> dev_t<T>* out(const at::Tensor& t, const char*) { return reinterpret_cast<dev_t<T>*>(t.data_ptr<T>()); }
  template <class T> dev_t<T>* inout(const at::Tensor& t, const char*) {
    return reinterpret_cast<dev_t<T>*>(t.data_ptr<T>());
  }
  void sync() {}  // later host-side work is stream-ordered device work
};

struct CudaLaunch {
  template <class... P, class... A>
  void operator()(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, block, smem, current_stream()>>>(std::forward<A>(args)...);
    RAEKERN_CUDA_CHECK_LAUNCH();
  }
};

}  // namespace

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
