// CUDA registration of depth_route (+ backward); the launch plan is depth_route_launch.h, shared
// with the host emulation.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#include <torch/library.h>

#include "fusion/cuda_dev.h"
#include "fusion/depth_route_launch.h"

namespace raekern::fusion::cuda {

TORCH_LIBRARY_IMPL(raekern, CUDA, m) {
  m.impl("depth_route", &depth_route_op<CudaDev>);
  m.impl("depth_route_backward", &depth_route_backward_op<CudaDev>);
}

}  // namespace raekern::fusion::cuda
