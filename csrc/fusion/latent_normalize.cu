// CUDA registration of latent_normalize / latent_denormalize (+ backwards); the launch plan is
// latent_normalize_launch.h, shared with the host emulation.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#include <torch/library.h>

#include "fusion/cuda_dev.h"
#include "fusion/latent_normalize_launch.h"

namespace raekern::fusion::cuda {

TORCH_LIBRARY_IMPL(raekern, CUDA, m) {
  m.impl("latent_normalize", &latent_normalize_op<CudaDev>);
  m.impl("latent_normalize_backward", &latent_normalize_backward_op<CudaDev>);
  m.impl("latent_denormalize", &latent_denormalize_op<CudaDev>);
  m.impl("latent_denormalize_backward", &latent_denormalize_backward_op<CudaDev>);
}

}  // namespace raekern::fusion::cuda
