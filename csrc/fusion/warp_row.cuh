// Device helpers of the fusion family's warp-per-token kernels: a token row of D elements held by one
// warp as NV 16-byte vectors of V elements per lane (vector k of a lane at columns
// (lane + 32·k)·V ...), in fp32 registers, with warp-shuffle reductions only (no barrier, no shared
// memory). Includes only common/simt.cuh (through fusion_kernel_common.cuh) so the host emulation can
// compile it. Not yet run on a GPU (written after the H200 run of 2026-11-30).
#pragma once
#include "fusion/fusion_kernel_common.cuh"

namespace raekern::fusion::cuda {

using simt::lane_column;

template <class T, int V, int NV>
__device__ __forceinline__ void warp_load_row(const T* __restrict__ row, int D, int lane, float (&x)[NV][V]) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int d0 = lane_column<V>(lane, k);
    if (d0 < D) {
      simt::load_vec<T, V>(row + d0, x[k]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) x[k][j] = 0.f;
    }
  }
}

template <class T, int V, int NV>
__device__ __forceinline__ void warp_store_row(T* __restrict__ row, int D, int lane, const float (&x)[NV][V]) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int d0 = lane_column<V>(lane, k);
    if (d0 < D) simt::store_vec<T, V>(row + d0, x[k]);
  }
}

// Non-affine LayerNorm of a warp-held row in place (normalize_row's arithmetic: statistics around the
// row's first element `shift`); returns rstd. Columns past D stay 0.
template <int V, int NV>
__device__ __forceinline__ float warp_normalize_row(float (&x)[NV][V], float shift, int D, int lane, float inv_d,
                                                    float eps) {
  float s1 = 0.f, s2 = 0.f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    if (lane_column<V>(lane, k) < D) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        x[k][j] -= shift;
        s1 += x[k][j];
        s2 += x[k][j] * x[k][j];
      }
    }
  }
  s1 = simt::warp_sum(s1);
  s2 = simt::warp_sum(s2);
  const float mean = s1 * inv_d;
  const float var = fmaxf(s2 * inv_d - mean * mean, 0.f);
  const float rstd = rsqrtf(var + eps);
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const bool ok = lane_column<V>(lane, k) < D;
#pragma unroll
    for (int j = 0; j < V; ++j) x[k][j] = ok ? (x[k][j] - mean) * rstd : 0.f;
  }
  return rstd;
}

}  // namespace raekern::fusion::cuda
