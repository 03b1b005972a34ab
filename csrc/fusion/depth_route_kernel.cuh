// SIMT kernels of depth_route (DRoRAE aggregation): one block per token computes the depth weights
// (warp 0, L ≤ 48), reduces the L expert rows through their own pointers, bounds the correction and
// adds it to the base row.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#pragma once
#include "fusion/fusion_kernel_common.cuh"

namespace raekern::fusion::cuda {

struct RouteArgs {
  const void* expert[kMaxLayers];
  int64_t sb[kMaxLayers], sn[kMaxLayers], sd[kMaxLayers];
  const void* base;
  int64_t bsb, bsn, bsd;
  const float* logits;  // contiguous fp32 [B, N, L]
  const float* gamma;   // fp32 [1] or [D], or null (γ = 1)
  int gamma_numel;
  int L, D;
  int64_t N, tokens;
  int energy;  // Energy: 0 l2, 1 softmax, 2 none
  int bound;   // Bound: 0 tanh, 1 norm_cap, 2 none
  float cap;
};

// Per-token scalars are divided with __fdividef: IEEE division's slow path is a called subroutine
// whose saved registers ptxas reports as spill stores (CI rejects any spill). Its ≤ 2 ulp error is
// far inside the fp32 tolerance, and the divisors (norms, softmax sums ≤ L) stay below its 2^126 limit.

// The token's depth weights computed by one warp, lane l holding w_l (w0) and w_{l+32} (w1) (L ≤ 48);
// norm = ‖logits‖ for the l2 energy.
__device__ __forceinline__ void warp_route_weights(const RouteArgs& a, int64_t tok, int lane, float& w0, float& w1,
                                                   float& norm) {
  const float* lg = a.logits + tok * a.L;
  const float a0 = lane < a.L ? lg[lane] : 0.f;
  const float a1 = lane + simt::kWarp < a.L ? lg[lane + simt::kWarp] : 0.f;
  w0 = a0, w1 = a1, norm = 0.f;
  if (a.energy == 0) {
    norm = fmaxf(sqrtf(simt::warp_sum(a0 * a0 + a1 * a1)), 1e-12f);
    w0 = __fdividef(a0, norm);
    w1 = __fdividef(a1, norm);
  } else if (a.energy == 1) {
    const float m = simt::warp_max(fmaxf(lane < a.L ? a0 : -3.0e38f, lane + simt::kWarp < a.L ? a1 : -3.0e38f));
    const float e0 = lane < a.L ? __expf(a0 - m) : 0.f;
    const float e1 = lane + simt::kWarp < a.L ? __expf(a1 - m) : 0.f;
    const float s = simt::warp_sum(e0 + e1);
    w0 = __fdividef(e0, s);
    w1 = __fdividef(e1, s);
  }
}

// Warp 0 turns the token's logits into weights in smem w[L]; *norm gets ‖a‖ (l2).
__device__ __forceinline__ void route_weights(const RouteArgs& a, int64_t tok, float* w, float* norm) {
  if (threadIdx.x >= simt::kWarp) return;
  const int lane = threadIdx.x;
  float w0, w1, nrm;
  warp_route_weights(a, tok, lane, w0, w1, nrm);
  if (a.energy == 0 && lane == 0) *norm = nrm;
  if (lane < a.L) w[lane] = w0;
  if (lane + simt::kWarp < a.L) w[lane + simt::kWarp] = w1;
}

template <class T, int V, int ITEMS>
__device__ __forceinline__ void route_fuse(const RouteArgs& a, int64_t b, int64_t n, const float* w,
                                           float (&f)[ITEMS][V]) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) f[i][j] = 0.f;
  for (int l = 0; l < a.L; ++l) {
    float e[ITEMS][V];
    load_row<T, V, ITEMS>(static_cast<const T*>(a.expert[l]) + b * a.sb[l] + n * a.sn[l], a.sd[l], a.D, e);
    const float c = w[l];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) f[i][j] += c * e[i][j];
  }
}

__device__ __forceinline__ float route_gate(const RouteArgs& a, int d) {
  return a.gamma_numel == 0 ? 1.f : a.gamma[a.gamma_numel == 1 ? 0 : d];
}

// The kernels below and the warp-per-token ones (depth_route_warp_kernel.cuh) hold a row as A items
// of V columns per thread; col(i) is the first column of this thread's item i, and sum2/sum3 reduce
// partial sums over the threads holding the row (a block or a warp), in place.

// x += bound(f) for one row (the forward's correction).
template <int A, int V, class Col, class Sum2>
__device__ __forceinline__ void add_bounded(const RouteArgs& a, float (&x)[A][V], const float (&f)[A][V], Col col,
                                            Sum2 sum2) {
  if (a.bound == 0) {
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int d = col(i) + j;
        x[i][j] += (d < a.D ? route_gate(a, d) : 0.f) * tanhf(f[i][j]);
      }
    return;
  }
  float scale = 1.f;
  if (a.bound == 1) {
    float ff = 0.f, bb = 0.f;
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        ff += f[i][j] * f[i][j];
        bb += x[i][j] * x[i][j];
      }
    sum2(ff, bb);
    const float nf = sqrtf(ff), limit = a.cap * sqrtf(bb);
    scale = nf > limit ? __fdividef(limit, nf) : 1.f;
  }
#pragma unroll
  for (int i = 0; i < A; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) x[i][j] += scale * f[i][j];
}

// Backward of add_bounded for one row: gf (the output gradient on entry) becomes d f, gb (the same on
// entry) d base, ggam gets the row's γ-gradient terms (tanh bound). x: the base row, read only for
// the norm cap.
template <int A, int V, class Col, class Sum3>
__device__ __forceinline__ void bound_backward(const RouteArgs& a, const float (&f)[A][V], const float (&x)[A][V],
                                               float (&gf)[A][V], float (&gb)[A][V], float (&ggam)[A][V], Col col,
                                               Sum3 sum3) {
  if (a.bound == 0) {
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float th = tanhf(f[i][j]), gr = gf[i][j];
        const int d = col(i) + j;
        gf[i][j] = gr * (d < a.D ? route_gate(a, d) : 0.f) * (1.f - th * th);
        ggam[i][j] += gr * th;
      }
  } else if (a.bound == 1) {
    float ff = 0.f, bb = 0.f, fg = 0.f;
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        ff += f[i][j] * f[i][j];
        bb += x[i][j] * x[i][j];
        fg += f[i][j] * gf[i][j];
      }
    sum3(ff, bb, fg);
    const float nf = sqrtf(ff), nb = sqrtf(bb), limit = a.cap * nb;
    if (!(nf <= limit)) {  // NaN norms too: NaN gradients, as the CPU kernel and the reference
      const float fgn = __fdividef(fg, nf), sc = __fdividef(limit, nf), cb = nb > 0.f ? __fdividef(a.cap * fgn, nb) : 0.f;
      const float fgnn = __fdividef(fgn, nf);
#pragma unroll
      for (int i = 0; i < A; ++i)
#pragma unroll
        for (int j = 0; j < V; ++j) {
          gf[i][j] = sc * (gf[i][j] - f[i][j] * fgnn);
          gb[i][j] += cb * x[i][j];
        }
    }
  }
}

template <class T, int V, int ITEMS>
__global__ void __launch_bounds__(kThreads) depth_route_kernel(RouteArgs a, T* __restrict__ out) {
  __shared__ float red[2 * simt::kWarp];
  __shared__ float w[kMaxLayers];
  __shared__ float norm;
  const int64_t tok = blockIdx.x;
  const int64_t b = tok / a.N, n = tok % a.N;
  route_weights(a, tok, w, &norm);
  __syncthreads();
  float f[ITEMS][V], x[ITEMS][V];
  load_row<T, V, ITEMS>(static_cast<const T*>(a.base) + b * a.bsb + n * a.bsn, a.bsd, a.D, x);  // in flight
  route_fuse<T, V, ITEMS>(a, b, n, w, f);
  add_bounded<ITEMS, V>(a, x, f, [](int i) { return item_base<V>(i); },
                        [&](float& ff, float& bb) { simt::block_sum2(ff, bb, red); });
  store_row<T, V, ITEMS>(out + tok * a.D, a.D, x);
}

struct RouteGradArgs {
  const void* grad;  // contiguous [B, N, D]
  void* dexpert[kMaxLayers];
  void* dbase;
  float* dlogits;  // [B, N, L] fp32
  float* dgamma;   // fp32 [gridDim.x, 1 or D]: per-block partials of the γ gradient, or null
};

// Blocks stride over tokens so the γ gradient is accumulated in registers and written with one
// atomic per element per block.
template <class T, int V, int ITEMS>
__global__ void __launch_bounds__(kThreads) depth_route_backward_kernel(RouteArgs a, RouteGradArgs g) {
  __shared__ float red[2 * simt::kWarp];
  __shared__ float w[kMaxLayers];
  __shared__ float gw[kMaxLayers];
  __shared__ float norm;
  float ggam[ITEMS][V] = {};
  for (int64_t tok = blockIdx.x; tok < a.tokens; tok += gridDim.x) {
    const int64_t b = tok / a.N, n = tok % a.N;
    route_weights(a, tok, w, &norm);
    __syncthreads();
    float f[ITEMS][V], gf[ITEMS][V], gb[ITEMS][V], x[ITEMS][V];
    route_fuse<T, V, ITEMS>(a, b, n, w, f);
    load_row<T, V, ITEMS>(static_cast<const T*>(g.grad) + tok * a.D, 1, a.D, gf);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) gb[i][j] = gf[i][j];
    if (a.bound == 1)
      load_row<T, V, ITEMS>(static_cast<const T*>(a.base) + b * a.bsb + n * a.bsn, a.bsd, a.D, x);
    bound_backward<ITEMS, V>(a, f, x, gf, gb, ggam, [](int i) { return item_base<V>(i); },
                             [&](float& ff, float& bb, float& fg) {
                               simt::block_sum2(ff, bb, red);
                               fg = simt::block_sum(fg, red);
                             });
    store_row<T, V, ITEMS>(static_cast<T*>(g.dbase) + tok * a.D, a.D, gb);
    for (int l = 0; l < a.L; ++l) {
      float e[ITEMS][V];
      load_row<T, V, ITEMS>(static_cast<const T*>(a.expert[l]) + b * a.sb[l] + n * a.sn[l], a.sd[l], a.D, e);
      float dot = 0.f;
      const float c = w[l];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int j = 0; j < V; ++j) {
          dot += gf[i][j] * e[i][j];
          e[i][j] = c * gf[i][j];
        }
      store_row<T, V, ITEMS>(static_cast<T*>(g.dexpert[l]) + tok * a.D, a.D, e);
      dot = simt::block_sum(dot, red);
      if (threadIdx.x == 0) gw[l] = dot;
    }
    __syncthreads();
    if (threadIdx.x < simt::kWarp) {
      const int lane = threadIdx.x;
      float wg = 0.f;
      for (int l = lane; l < a.L; l += simt::kWarp) wg += w[l] * gw[l];
      const float dot = simt::warp_sum(wg);
      for (int l = lane; l < a.L; l += simt::kWarp) {
        float ga = gw[l];
        if (a.energy == 0) ga = __fdividef(norm <= 1e-12f ? gw[l] : gw[l] - w[l] * dot, norm);
        else if (a.energy == 1) ga = w[l] * (gw[l] - dot);
        g.dlogits[tok * a.L + l] = ga;
      }
    }
    __syncthreads();  // w, gw and norm are rewritten by the next token
  }
  // This block's γ-gradient partial, row blockIdx.x of [gridDim.x, gamma_numel] (no atomics: the
  // launcher adds the rows in order).
  if (g.dgamma) {
    if (a.gamma_numel == 1) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int j = 0; j < V; ++j) s += ggam[i][j];
      s = simt::block_sum(s, red);
      if (threadIdx.x == 0) g.dgamma[blockIdx.x] = s;
    } else {
      float* row = g.dgamma + int64_t(blockIdx.x) * a.D;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int d0 = item_base<V>(i);
        if (d0 < a.D)
#pragma unroll
          for (int j = 0; j < V; ++j) row[d0 + j] = ggam[i][j];
      }
    }
  }
}

}  // namespace raekern::fusion::cuda
