// Host-side helpers for CUDA launchers (.cu files): current stream, launch error checks and the
// mapping from torch's scalar types to the CUDA device types the kernels use.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace raekern {

template <class T> struct CudaType { using type = T; };
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };
template <class T> using cuda_t = typename CudaType<T>::type;

template <class T> inline cuda_t<T>* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<cuda_t<T>*>(t.template data_ptr<T>());
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

}  // namespace raekern

#define RAEKERN_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
