// The CUDA Dev of the fusion launch plans (fusion/launch_shape.h): tensors are used where they live
// and kernels go to the current stream.
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <utility>

#include "common/cuda_launch.h"

namespace raekern::fusion::cuda {

struct CudaDev {
  template <class S> using elem = cuda_t<S>;
  explicit CudaDev(const at::Tensor& like) : guard(like.device()) {}
  const void* in(const at::Tensor& t, const char*) { return t.data_ptr(); }
  void* out(const at::Tensor& t, const char*) { return t.data_ptr(); }
  void* inout(const at::Tensor& t, const char*) { return t.data_ptr(); }
  void fresh(at::Tensor&) {}
  int64_t workers(const at::Tensor& like) {
    return at::cuda::getDeviceProperties(like.device().index())->multiProcessorCount;
  }
  template <class... P, class... A>
  void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
    TORCH_CHECK(allow_dynamic_smem(kernel, smem), "raekern: a fusion kernel needs ", smem,
                " bytes of dynamic shared memory, more than this GPU gives one block");
    kernel<<<grid, block, smem, current_stream()>>>(std::forward<A>(args)...);
    RAEKERN_CUDA_CHECK_LAUNCH();
  }
  void finish() {}
  c10::cuda::CUDAGuard guard;
};

}  // namespace raekern::fusion::cuda
