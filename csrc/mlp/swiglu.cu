// CUDA launchers of the mlp family and its CUDA registration (kernels in swiglu_kernel.cuh).
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
// Launches go to the current stream with no host synchronisation (CUDA-graph capturable); indices are
// 64-bit. fp32/bf16/fp16; fp64 is CPU-only (reference precision).
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "mlp/mlp_host.h"
#include "mlp/transpose.h"
#include "mlp/swiglu_kernel.cuh"
#include "mlp/swiglu_launch.h"

namespace raekern::mlp {
namespace {

template <class E, int V>
void launch_v(const Params& p, const Launch& l, bool backward) {
  const dim3 grid(unsigned(l.grid_x), unsigned(l.grid_y)), block(l.threads);
  if (backward) cuda::swiglu_backward<E, V><<<grid, block, 0, current_stream()>>>(p);
  else cuda::swiglu_forward<E, V><<<grid, block, 0, current_stream()>>>(p);
  RAEKERN_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch(const Params& p, bool backward) {
  using E = cuda_t<T>;
  const Launch l = plan_launch(p, backward, sizeof(E));
  switch (l.vec) {
    case 1: return launch_v<E, 1>(p, l, backward);
    case 2: return launch_v<E, 2>(p, l, backward);
    case 4: return launch_v<E, 4>(p, l, backward);
    default:
      if constexpr (sizeof(E) <= 2) return launch_v<E, 8>(p, l, backward);
  }
}

void run(const Params& p, at::ScalarType st, bool backward) {
  const char* op = backward ? "swiglu_backward" : "swiglu";
  RAEKERN_CHECK(st != at::kDouble, op, "a", "float64 is supported on CPU only; use float32/bfloat16/float16");
  c10::cuda::CUDAGuard guard(p.device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "raekern.swiglu_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) launch<scalar_t>(p, backward);
  });
}

void forward_cuda(const Params& p, at::ScalarType st) { run(p, st, false); }
void backward_cuda(const Params& p, at::ScalarType st) { run(p, st, true); }

}  // namespace

const Backend kCuda{forward_cuda, backward_cuda};

TORCH_LIBRARY_IMPL(raekern, CUDA, m) {
  register_impls<&kCuda>(m);
  m.impl("transpose_copy", &transpose_copy_generic);  // torch's tiled CUDA transpose
}

}  // namespace raekern::mlp
