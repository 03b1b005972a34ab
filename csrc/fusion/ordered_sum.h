// Cross-block sums of the fusion CUDA kernels without float atomics: a kernel stores one partial row
// per block (or token) in a [B, P, D] float buffer and sum_parts_kernel adds them in order, so the
// result does not depend on which block finished first. Written once over the launch plans' Dev
// (CUDA or the host emulation).
#pragma once
#include <ATen/ATen.h>

#include "fusion/fusion_kernel_common.cuh"

namespace raekern::fusion::cuda {

struct Parts {
  at::Tensor part, sum;  // [B, P, D] partials, [B, D] their ordered sum
  float* part_p = nullptr;
  float* sum_p = nullptr;
  int64_t B = 0, P = 0, D = 0;
};

template <class Dev>
Parts make_parts(Dev& dev, int64_t B, int64_t P, int64_t D, const at::TensorOptions& o, const char* name) {
  Parts m;
  m.B = B, m.P = P, m.D = D;
  m.part = at::empty({B, P, D}, o.dtype(at::kFloat));
  m.sum = at::empty({B, D}, o.dtype(at::kFloat));
  m.part_p = static_cast<float*>(dev.out(m.part, name));
  m.sum_p = static_cast<float*>(dev.out(m.sum, name));
  return m;
}

template <class Dev>
void sum_parts(Dev& dev, const Parts& m) {
  const int64_t n = m.B * m.D;
  dev.launch(sum_parts_kernel<float>, dim3(unsigned((n + kThreads - 1) / kThreads)), dim3(kThreads), 0, m.part_p, m.P,
             m.B, m.D, m.sum_p);
}

}  // namespace raekern::fusion::cuda
