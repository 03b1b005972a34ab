// CUDA launchers of the norm family and its CUDA registration (kernels in fused_norm_kernel.cuh).
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
// Launches go to the current stream with no host synchronisation (CUDA-graph capturable); indices are
// 64-bit. fp32/bf16/fp16; fp64 is CPU-only (reference precision).
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "common/dispatch.h"
#include "norm/fused_norm_kernel.cuh"
#include "norm/norm_host.h"
#include "norm/norm_launch.h"

namespace raekern::norm {
namespace {

// The row buffer lives in dynamic shared memory (opted into past 48 KiB, static part included).
template <class K>
void allow_smem(K kernel, size_t bytes, const char* op) {
  RAEKERN_CHECK(allow_dynamic_smem(kernel, bytes), op, "x",
                "has a last dimension too large for the CUDA kernel's shared-memory row buffer (", bytes,
                " bytes needed, ", at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin,
                " available per block)");
}

// The launch itself is norm_launch.h's decision, shared with the host emulation.
template <class T>
void forward_typed(const FwdParams& p) {
  using E = cuda_t<T>;
  constexpr int V = simt::kVec16<E>;
  const NormLaunch ln = forward_launch(p, sizeof(E));
  if (ln.nv > 0) {
    cuda::with_rows_kernel<E, V>(ln.nv, [&](auto k) { k<<<ln.grid, ln.block, 0, current_stream()>>>(p); });
  } else if (ln.vec) {
    auto k = cuda::fused_norm_forward<E, V>;
    allow_smem(k, ln.smem, "norm");
    k<<<ln.grid, ln.block, ln.smem, current_stream()>>>(p);
  } else {
    auto k = cuda::fused_norm_forward<E, 1>;
    allow_smem(k, ln.smem, "norm");
    k<<<ln.grid, ln.block, ln.smem, current_stream()>>>(p);
  }
  RAEKERN_CUDA_CHECK_LAUNCH();
}

template <class T>
void backward_typed(const BwdParams& p) {
  using E = cuda_t<T>;
  constexpr int V = simt::kVec16<E>;
  const NormLaunch ln = backward_launch(p, sizeof(E));
  if (ln.nv > 0) {  // shared memory within the default 48 KiB: no opt-in
    cuda::with_rows_backward_kernel<E, V>(
        ln.nv, [&](auto k) { k<<<ln.grid, ln.block, ln.smem, current_stream()>>>(p); });
  } else if (ln.vec) {
    auto k = cuda::fused_norm_backward<E, V>;
    allow_smem(k, ln.smem, "norm_backward");
    k<<<ln.grid, ln.block, ln.smem, current_stream()>>>(p);
  } else {
    auto k = cuda::fused_norm_backward<E, 1>;
    allow_smem(k, ln.smem, "norm_backward");
    k<<<ln.grid, ln.block, ln.smem, current_stream()>>>(p);
  }
  RAEKERN_CUDA_CHECK_LAUNCH();
}

void forward_cuda(const FwdParams& p, at::ScalarType st) {
  RAEKERN_CHECK(st != at::kDouble, "norm", "x", "float64 is supported on CPU only; use float32/bfloat16/float16");
  c10::cuda::CUDAGuard guard(p.device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "raekern.norm_forward_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) forward_typed<scalar_t>(p);
  });
}

void backward_cuda(const BwdParams& p, at::ScalarType st) {
  RAEKERN_CHECK(st != at::kDouble, "norm_backward", "x", "float64 is supported on CPU only");
  c10::cuda::CUDAGuard guard(p.device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "raekern.norm_backward_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) backward_typed<scalar_t>(p);
  });
}

int64_t cuda_workers(const at::Tensor& like) {
  return at::cuda::getDeviceProperties(like.device().index())->multiProcessorCount;
}

}  // namespace

const Backend kCuda{forward_cuda, backward_cuda, cuda_workers, kMinTaskRows};

TORCH_LIBRARY_IMPL(raekern, CUDA, m) { register_impls<&kCuda>(m); }

}  // namespace raekern::norm
