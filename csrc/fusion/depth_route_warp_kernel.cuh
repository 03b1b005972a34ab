// Warp-per-token kernels of depth_route (forward and backward) for rows of 16-byte vectors with
// D ≤ 32·NV·V: the token's row lives in registers as NV vectors per lane, the depth weights in two
// registers per lane (lane l holds w_l and w_{l+32}), every reduction is a warp shuffle, and expert
// rows are loaded two at a time.
//
// Why: the H200 run (2026-11-30) put the block-per-token kernels (depth_route_kernel.cuh) at 24 %
// (forward) and 7 % (backward, 0.89× eager) of copy bandwidth. There a 256-thread block holds a
// D = 768 bf16 row in 96 threads, the expert loop waits on each load, and the backward adds a block
// reduction (two barriers) per expert. Same arithmetic as those kernels, op for op, except the order
// of the partial sums. Not yet run on a GPU (emulation-tested; written after the H200 run).
#pragma once
#include "fusion/depth_route_kernel.cuh"
#include "fusion/warp_row.cuh"

namespace raekern::fusion::cuda {

constexpr int kRouteWarps = 4;  // warps (tokens in flight) per block

// w_l on every lane (l is warp-uniform).
__device__ __forceinline__ float weight_of(float w0, float w1, int l) {
  return __shfl_sync(simt::kFullMask, l < simt::kWarp ? w0 : w1, l & (simt::kWarp - 1));
}

template <class T>
__device__ __forceinline__ const T* expert_row(const RouteArgs& a, int l, int64_t b, int64_t n) {
  return static_cast<const T*>(a.expert[l]) + b * a.sb[l] + n * a.sn[l];
}

// f = Σ_l w_l·e_l, two expert rows in flight at a time.
template <class T, int V, int NV>
__device__ __forceinline__ void warp_route_fuse(const RouteArgs& a, int64_t b, int64_t n, int lane, float w0,
                                                float w1, float (&f)[NV][V]) {
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) f[k][j] = 0.f;
  int l = 0;
  for (; l + 1 < a.L; l += 2) {
    float e0[NV][V], e1[NV][V];
    warp_load_row<T, V, NV>(expert_row<T>(a, l, b, n), a.D, lane, e0);
    warp_load_row<T, V, NV>(expert_row<T>(a, l + 1, b, n), a.D, lane, e1);
    const float c0 = weight_of(w0, w1, l), c1 = weight_of(w0, w1, l + 1);
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) f[k][j] += c0 * e0[k][j] + c1 * e1[k][j];
  }
  if (l < a.L) {
    float e0[NV][V];
    warp_load_row<T, V, NV>(expert_row<T>(a, l, b, n), a.D, lane, e0);
    const float c0 = weight_of(w0, w1, l);
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) f[k][j] += c0 * e0[k][j];
  }
}

// Reductions over the warp holding a row, for add_bounded / bound_backward.
struct WarpSums {
  __device__ __forceinline__ void operator()(float& a, float& b) const {
    a = simt::warp_sum(a);
    b = simt::warp_sum(b);
  }
  __device__ __forceinline__ void operator()(float& a, float& b, float& c) const {
    a = simt::warp_sum(a);
    b = simt::warp_sum(b);
    c = simt::warp_sum(c);
  }
};

template <class T, int V, int NV>
__global__ void __launch_bounds__(kRouteWarps * 32) depth_route_warp_kernel(RouteArgs a, T* __restrict__ out) {
  const int lane = int(threadIdx.x) % simt::kWarp;
  const int64_t warps = int64_t(gridDim.x) * kRouteWarps;
  for (int64_t tok = int64_t(blockIdx.x) * kRouteWarps + int64_t(threadIdx.x) / simt::kWarp; tok < a.tokens;
       tok += warps) {
    // (n = tok − b·N here made nvcc 13.0 spill 28 bytes in the sm_90a bf16 NV = 3 instance; % does not.)
    const int64_t b = tok / a.N, n = tok % a.N;
    float x[NV][V], f[NV][V], w0, w1, norm;
    warp_load_row<T, V, NV>(static_cast<const T*>(a.base) + b * a.bsb + n * a.bsn, a.D, lane, x);  // in flight
    warp_route_weights(a, tok, lane, w0, w1, norm);
    warp_route_fuse<T, V, NV>(a, b, n, lane, w0, w1, f);
    add_bounded<NV, V>(a, x, f, [lane](int k) { return lane_column<V>(lane, k); }, WarpSums{});
    warp_store_row<T, V, NV>(out + tok * a.D, a.D, lane, x);
  }
}

// γ-gradient partial of a block: row blockIdx.x of g.dgamma ([gridDim.x, gamma_numel]), its warps'
// register sums added in warp order through shared memory (smem: kRouteWarps·D floats for a [D] γ).
template <int V, int NV>
__device__ __forceinline__ void write_gamma_partial(const RouteArgs& a, const RouteGradArgs& g, int lane,
                                                    const float (&ggam)[NV][V], float* smem) {
  const int warp = int(threadIdx.x) / simt::kWarp;
  if (a.gamma_numel == 1) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) s += ggam[k][j];
    s = simt::warp_sum(s);
    if (lane == 0) smem[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      float t = 0.f;
      for (int w = 0; w < kRouteWarps; ++w) t += smem[w];
      g.dgamma[blockIdx.x] = t;
    }
    return;
  }
  float* mine = smem + int64_t(warp) * a.D;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int d0 = lane_column<V>(lane, k);
    if (d0 < a.D)
#pragma unroll
      for (int j = 0; j < V; ++j) mine[d0 + j] = ggam[k][j];
  }
  __syncthreads();
  float* row = g.dgamma + int64_t(blockIdx.x) * a.D;
  for (int d = int(threadIdx.x); d < a.D; d += int(blockDim.x)) {
    float t = 0.f;
    for (int w = 0; w < kRouteWarps; ++w) t += smem[int64_t(w) * a.D + d];
    row[d] = t;
  }
}

// Backward, warp per token (grid-stride so the γ gradient is accumulated in registers across tokens).
template <class T, int V, int NV>
__global__ void __launch_bounds__(kRouteWarps * 32) depth_route_backward_warp_kernel(RouteArgs a, RouteGradArgs g) {
  RAEKERN_DYNAMIC_SHARED(float, smem);
  const int lane = int(threadIdx.x) % simt::kWarp;
  const int64_t warps = int64_t(gridDim.x) * kRouteWarps;
  float ggam[NV][V] = {};
  for (int64_t tok = int64_t(blockIdx.x) * kRouteWarps + int64_t(threadIdx.x) / simt::kWarp; tok < a.tokens;
       tok += warps) {
    const int64_t b = tok / a.N, n = tok - b * a.N;
    float gf[NV][V], w0, w1, norm;
    warp_load_row<T, V, NV>(static_cast<const T*>(g.grad) + tok * a.D, a.D, lane, gf);  // in flight
    warp_route_weights(a, tok, lane, w0, w1, norm);
    {
      float f[NV][V], gb[NV][V];
      warp_route_fuse<T, V, NV>(a, b, n, lane, w0, w1, f);
#pragma unroll
      for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j) gb[k][j] = gf[k][j];
      float x[NV][V];
      if (a.bound == 1)
        warp_load_row<T, V, NV>(static_cast<const T*>(a.base) + b * a.bsb + n * a.bsn, a.D, lane, x);
      bound_backward<NV, V>(a, f, x, gf, gb, ggam, [lane](int k) { return lane_column<V>(lane, k); }, WarpSums{});
      warp_store_row<T, V, NV>(static_cast<T*>(g.dbase) + tok * a.D, a.D, lane, gb);
    }
    // d expert_l = w_l·gf; d w_l = gf·e_l, kept by lane l (gw0) or l − 32 (gw1).
    // Two expert rows in flight, except for the widest rows (fp32 D = 1024 would need 255 registers).
    constexpr bool kPairs = NV * V < 32;
    float gw0 = 0.f, gw1 = 0.f;
    for (int l = 0; l < a.L; l += kPairs ? 2 : 1) {
      const bool two = kPairs && l + 1 < a.L;
      float e0[NV][V], e1[NV][V];
      warp_load_row<T, V, NV>(expert_row<T>(a, l, b, n), a.D, lane, e0);
      if (two) warp_load_row<T, V, NV>(expert_row<T>(a, l + 1, b, n), a.D, lane, e1);
      const float c0 = weight_of(w0, w1, l), c1 = two ? weight_of(w0, w1, l + 1) : 0.f;
      float d0 = 0.f, d1 = 0.f;
#pragma unroll
      for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j) {
          d0 += gf[k][j] * e0[k][j];
          e0[k][j] = c0 * gf[k][j];
          if (two) {
            d1 += gf[k][j] * e1[k][j];
            e1[k][j] = c1 * gf[k][j];
          }
        }
      warp_store_row<T, V, NV>(static_cast<T*>(g.dexpert[l]) + tok * a.D, a.D, lane, e0);
      if (two) warp_store_row<T, V, NV>(static_cast<T*>(g.dexpert[l + 1]) + tok * a.D, a.D, lane, e1);
      d0 = simt::warp_sum(d0);
      d1 = simt::warp_sum(d1);
      if ((l & (simt::kWarp - 1)) == lane) (l < simt::kWarp ? gw0 : gw1) = d0;
      if (two && ((l + 1) & (simt::kWarp - 1)) == lane) (l + 1 < simt::kWarp ? gw0 : gw1) = d1;
    }
    const bool has0 = lane < a.L, has1 = lane + simt::kWarp < a.L;
    const float dot = simt::warp_sum((has0 ? w0 * gw0 : 0.f) + (has1 ? w1 * gw1 : 0.f));
    float* dl = g.dlogits + tok * a.L;
    auto logit_grad = [&](float w, float gw) {
      if (a.energy == 0) return __fdividef(norm <= 1e-12f ? gw : gw - w * dot, norm);
      if (a.energy == 1) return w * (gw - dot);
      return gw;
    };
    if (has0) dl[lane] = logit_grad(w0, gw0);
    if (has1) dl[lane + simt::kWarp] = logit_grad(w1, gw1);
  }
  if (g.dgamma) write_gamma_partial<V, NV>(a, g, lane, ggam, smem);
}

}  // namespace raekern::fusion::cuda
