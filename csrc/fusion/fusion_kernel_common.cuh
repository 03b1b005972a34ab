// Device helpers shared by the fusion family's SIMT kernels: a token row spread over one block as
// ITEMS vectors of V elements per thread (V = 16 bytes / sizeof(T) when rows are aligned, else 1),
// held in fp32 registers. Includes only common/simt.cuh so the host emulation can compile it.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#pragma once
#include "common/simt.cuh"

namespace raekern::fusion::cuda {

constexpr int kThreads = 256;
constexpr int kMaxLayers = 48;

// Element d of item i of this thread: (i·kThreads + tid)·V + j.
template <int V>
__device__ __forceinline__ int item_base(int i) {
  return (i * kThreads + int(threadIdx.x)) * V;
}

template <int V, int ITEMS>
__device__ __forceinline__ bool item_valid(int i, int D) {
  return item_base<V>(i) < D;
}

// Loads a row of D elements (element stride sd, only used when V == 1); invalid slots read 0.
template <class T, int V, int ITEMS>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int64_t sd, int D, float (&x)[ITEMS][V]) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int d0 = item_base<V>(i);
    if (d0 < D) {
      if constexpr (V > 1) {
        simt::load_vec<T, V>(row + d0, x[i]);
      } else {
        x[i][0] = simt::to_float(row[int64_t(d0) * sd]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) x[i][j] = 0.f;
    }
  }
}

template <class T, int V, int ITEMS>
__device__ __forceinline__ void store_row(T* __restrict__ row, int D, const float (&x)[ITEMS][V]) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int d0 = item_base<V>(i);
    if (d0 < D) {
      if constexpr (V > 1) {
        simt::store_vec<T, V>(row + d0, x[i]);
      } else {
        row[d0] = simt::from_float<T>(x[i][0]);
      }
    }
  }
}

// Non-affine LayerNorm of a row held in registers, in place; returns rstd. Statistics are taken
// around the row's first element so large common offsets (ViT outlier channels) do not cancel.
// inv_d = 1/D from the host: an IEEE division's slow path is a called subroutine whose saved
// registers ptxas reports as spills once the caller keeps more state live (the tiled kernel).
template <int V, int ITEMS>
__device__ __forceinline__ float normalize_row(float (&x)[ITEMS][V], float shift, int D, float inv_d, float eps,
                                               float* red) {
  float s1 = 0.f, s2 = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (item_valid<V, ITEMS>(i, D)) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        x[i][j] -= shift;
        s1 += x[i][j];
        s2 += x[i][j] * x[i][j];
      }
    }
  }
  simt::block_sum2(s1, s2, red);
  const float mean = s1 * inv_d;
  const float var = fmaxf(s2 * inv_d - mean * mean, 0.f);
  const float rstd = rsqrtf(var + eps);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const bool ok = item_valid<V, ITEMS>(i, D);
#pragma unroll
    for (int j = 0; j < V; ++j) x[i][j] = ok ? (x[i][j] - mean) * rstd : 0.f;
  }
  return rstd;
}

// out[b, :] = Σ_p part[b, p, :] (part [B, P, D]), summed in p order: cross-block sums (token means,
// parameter gradients) are reduced from per-block partials instead of float atomics, so they are
// bit-identical run to run. One thread per output element. (A template so that every .cu including this
// header may instantiate it: a plain __global__ function would be defined once per translation unit.)
template <class F = float>
__global__ void __launch_bounds__(kThreads) sum_parts_kernel(const F* __restrict__ part, int64_t nparts, int64_t B,
                                                             int64_t D, F* __restrict__ out) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= B * D) return;
  const int64_t b = e / D, d = e % D;
  const F* p = part + b * nparts * D + d;
  F s = 0;
  for (int64_t i = 0; i < nparts; ++i) s += p[i * D];
  out[e] = s;
}

}  // namespace raekern::fusion::cuda
