// Test-only SIMT kernels that drive the attention prologue and softmax epilogue device functions
// (attention_prologue_kernel.cuh) one row / one value per thread pair, so the host emulation can
// check them against the PyTorch reference without tensor-core code.
#pragma once
#include "attention/attention_prologue_kernel.cuh"

namespace raekern::attention::simt_dev {

// x: rows × D contiguous, rows a multiple of 32 (the host pads); row r is token (r / H) % N.
// Block = 64 threads = 32 rows; lanes 2i, 2i+1 share row i.
template <class T>
__global__ void prologue_rows_kernel(T* x, int D, int H, int N, const float* w, float eps, int gh, int gw,
                                     float log2_theta) {
  const int64_t row = int64_t(blockIdx.x) * 32 + threadIdx.x / 2;
  const int half = threadIdx.x & 1;
  const int token = int((row / H) % N);
  const bool rope = gh > 0 && token < gh * gw;
  const int pos = rope ? (half ? token % gw : token / gw) : 0;
  qk_prologue_half_row<T>(x + row * D, D, half, w, eps, rope, pos, log2_theta);
}

__global__ void softmax_finalize_kernel(const float* m, const float* l, float* inv_l, float* lse, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const RowFinal f = softmax_finalize(m[i], l[i]);
  inv_l[i] = f.inv_l;
  lse[i] = f.lse;
}

}  // namespace raekern::attention::simt_dev
