// Warp-per-token forward of layer_stack_fuse for tokens-major output and rows of 16-byte vectors with
// D ≤ 1024: four tokens per block, each token's rows in registers (warp_row.cuh), LayerNorm
// statistics by warp shuffles, the next layer's row loaded before the current one is normalised.
//
// Why: the H200 run (2026-11-30) put the block-per-token kernel (layer_stack_fuse_kernel.cuh) at 13 %
// of copy bandwidth. There a 256-thread block holds a D = 1024 bf16 row in 128 threads (half idle)
// and each layer waits on a block reduction (two barriers). Same arithmetic as fuse_token, op for op,
// except the order of the partial sums. Not yet run on a GPU (emulation-tested).
#pragma once
#include "fusion/layer_stack_fuse_kernel.cuh"
#include "fusion/warp_row.cuh"

namespace raekern::fusion::cuda {

constexpr int kStackWarps = 4;  // warps (tokens in flight) per block

template <class T, int V, int NV>
__device__ __forceinline__ float warp_load_layer_raw(const StackArgs& a, int l, int64_t b, int64_t n, int lane,
                                                     float (&x)[NV][V]) {
  const T* row = static_cast<const T*>(a.layer[l]) + b * a.sb[l] + (a.P + n) * a.st[l];
  warp_load_row<T, V, NV>(row, a.D, lane, x);
  return simt::to_float(row[0]);
}

template <class T, int V, int NV>
__global__ void __launch_bounds__(kStackWarps * 32) layer_stack_fuse_warp_kernel(StackArgs a, T* __restrict__ out) {
  const int lane = int(threadIdx.x) % simt::kWarp;
  const int64_t tokens = a.B * a.N, warps = int64_t(gridDim.x) * kStackWarps;
  for (int64_t tok = int64_t(blockIdx.x) * kStackWarps + int64_t(threadIdx.x) / simt::kWarp; tok < tokens;
       tok += warps) {
    const int64_t b = tok / a.N, n = tok - b * a.N;  // one 64-bit division (a called routine)
    float acc[NV][V], x[NV][V];
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[k][j] = 0.f;
    float first = warp_load_layer_raw<T, V, NV>(a, 0, b, n, lane, x);
    for (int l = 0; l < a.L; ++l) {
      float xn[NV][V];
      float first_n = 0.f;
      if (l + 1 < a.L) first_n = warp_load_layer_raw<T, V, NV>(a, l + 1, b, n, lane, xn);
      if (a.normalize) warp_normalize_row<V, NV>(x, first, a.D, lane, a.inv_d, a.eps);
      const float c = stack_coef(a, l, tok);
#pragma unroll
      for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[k][j] += c * x[k][j];
      if (l + 1 < a.L) {
#pragma unroll
        for (int k = 0; k < NV; ++k)
#pragma unroll
          for (int j = 0; j < V; ++j) x[k][j] = xn[k][j];
        first = first_n;
      }
    }
    if (a.tmean) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int d0 = lane_col<V>(lane, k);
        if (d0 < a.D)
#pragma unroll
          for (int j = 0; j < V; ++j) acc[k][j] += a.tmean[b * a.D + d0 + j];
      }
    }
    warp_store_row<T, V, NV>(out + tok * a.D, a.D, lane, acc);
  }
}

}  // namespace raekern::fusion::cuda
