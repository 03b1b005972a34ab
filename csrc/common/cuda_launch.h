// Host-side helpers for CUDA launchers (.cu files): current stream, launch error checks and the
// mapping from torch's scalar types to the CUDA device types the kernels use.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <utility>

namespace raekern {

template <class T> struct CudaType { using type = T; };
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };
template <class T> using cuda_t = typename CudaType<T>::type;

template <class T> inline cuda_t<T>* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<cuda_t<T>*>(t.template data_ptr<T>());
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// The device side of host plans written once for CUDA and the host emulation (attention's
// *_host.h): tensors are used where they live, kernels go to the current stream.
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
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace raekern

#define RAEKERN_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
