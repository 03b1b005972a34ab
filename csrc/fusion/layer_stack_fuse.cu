// CUDA registration of layer_stack_fuse (+ backward); the launch plan is layer_stack_fuse_launch.h,
// shared with the host emulation.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#include <torch/library.h>

#include "fusion/cuda_dev.h"
#include "fusion/layer_stack_fuse_launch.h"

namespace raekern::fusion::cuda {

TORCH_LIBRARY_IMPL(raekern, CUDA, m) {
  m.impl("layer_stack_fuse", &layer_stack_fuse_op<CudaDev>);
  m.impl("layer_stack_fuse_backward", &layer_stack_fuse_backward_op<CudaDev>);
}

}  // namespace raekern::fusion::cuda
