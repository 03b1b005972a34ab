// Warp-per-token forward and backward of layer_stack_fuse for tokens-major output and rows of 16-byte
// vectors with D ≤ 1024: four tokens per block, each token's rows in registers (warp_row.cuh),
// LayerNorm statistics by warp shuffles, the next layer's row loaded before the current one is used.
//
// Why: the H200 run (2026-11-30) put the block-per-token kernel (layer_stack_fuse_kernel.cuh) at 13 %
// (forward) and 14 % (backward) of copy bandwidth. There a 256-thread block holds a D = 1024 bf16 row
// in 128 threads (half idle) and each layer waits on a block reduction (two barriers); the backward
// also zeroed each layer's prefix rows with its own fill kernel. Same arithmetic as fuse_token, op for op,
// (and backward_token), op for op, except the order of the partial sums. Not yet run on a GPU
// (emulation-tested).
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
        const int d0 = lane_column<V>(lane, k);
        if (d0 < a.D)
#pragma unroll
          for (int j = 0; j < V; ++j) acc[k][j] += a.tmean[b * a.D + d0 + j];
      }
    }
    warp_store_row<T, V, NV>(out + tok * a.D, a.D, lane, acc);
  }
}

// Backward over every row of the layer gradients, tokens-major output gradient: row t < P of a sample
// (a prefix token: CLS, registers) gets zeros in every layer's gradient, row P + n the backward of
// token n, as backward_token computes it.
template <class T, int V, int NV>
__global__ void __launch_bounds__(kStackWarps * 32) layer_stack_fuse_backward_warp_kernel(StackArgs a,
                                                                                         StackGradArgs g) {
  const int lane = int(threadIdx.x) % simt::kWarp;
  const int64_t rows = a.B * a.T, warps = int64_t(gridDim.x) * kStackWarps;
  for (int64_t r = int64_t(blockIdx.x) * kStackWarps + int64_t(threadIdx.x) / simt::kWarp; r < rows; r += warps) {
    const int64_t b = r / a.T, t = r - b * a.T;
    if (t < a.P) {
      float zero[NV][V] = {};
      for (int l = 0; l < a.L; ++l) warp_store_row<T, V, NV>(static_cast<T*>(g.dlayer[l]) + r * a.D, a.D, lane, zero);
      continue;
    }
    const int64_t n = t - a.P, tok = b * a.N + n;
    float gr[NV][V], y[NV][V];
    warp_load_row<T, V, NV>(static_cast<const T*>(g.grad) + tok * a.D, a.D, lane, gr);
    float first = warp_load_layer_raw<T, V, NV>(a, 0, b, n, lane, y);
    for (int l = 0; l < a.L; ++l) {
      float yn[NV][V];
      float first_n = 0.f;
      if (l + 1 < a.L) first_n = warp_load_layer_raw<T, V, NV>(a, l + 1, b, n, lane, yn);
      const float rstd = a.normalize ? warp_normalize_row<V, NV>(y, first, a.D, lane, a.inv_d, a.eps) : 1.f;
      const float c = stack_coef(a, l, tok);
      const bool last_mean = g.gmean != nullptr && l == a.L - 1;
      float dy[NV][V];
      float dot = 0.f, s1 = 0.f, s2 = 0.f;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int d0 = lane_column<V>(lane, k);
        const bool ok = d0 < a.D;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float v = c * gr[k][j];
          if (last_mean && ok) v += g.gmean[b * a.D + d0 + j];
          dy[k][j] = ok ? v : 0.f;
          dot += gr[k][j] * y[k][j];
          s1 += dy[k][j];
          s2 += dy[k][j] * y[k][j];
        }
      }
      if (g.dw) {
        dot = simt::warp_sum(dot);
        if (lane == 0) g.dw[tok * a.L + l] = dot;
      }
      if (a.normalize) {
        const float m1 = simt::warp_sum(s1) * a.inv_d, m2 = simt::warp_sum(s2) * a.inv_d;
#pragma unroll
        for (int k = 0; k < NV; ++k)
#pragma unroll
          for (int j = 0; j < V; ++j) dy[k][j] = rstd * (dy[k][j] - m1 - y[k][j] * m2);
      }
      warp_store_row<T, V, NV>(static_cast<T*>(g.dlayer[l]) + r * a.D, a.D, lane, dy);
      if (l + 1 < a.L) {
#pragma unroll
        for (int k = 0; k < NV; ++k)
#pragma unroll
          for (int j = 0; j < V; ++j) y[k][j] = yn[k][j];
        first = first_n;
      }
    }
  }
}

}  // namespace raekern::fusion::cuda
