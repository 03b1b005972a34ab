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

// Opt a kernel into `dynamic` bytes of dynamic shared memory. The 48 KiB default limit covers static
// plus dynamic shared memory, so a kernel with static __shared__ arrays needs the opt-in a little
// before its dynamic part alone reaches 48 KiB (the host emulation does not model that limit).
// Returns false when the device cannot give the kernel that much at all.
template <class K>
inline bool allow_dynamic_smem(K kernel, size_t dynamic) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)));
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (dynamic + attr.sharedSizeBytes > prop->sharedMemPerBlockOptin) return false;
  if (dynamic + attr.sharedSizeBytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dynamic)));
  return true;
}

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
    TORCH_CHECK(allow_dynamic_smem(kernel, smem), "raekern: a kernel needs ", smem,
                " bytes of dynamic shared memory, more than this GPU gives one block");
    kernel<<<grid, block, smem, current_stream()>>>(std::forward<A>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace raekern

#define RAEKERN_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
