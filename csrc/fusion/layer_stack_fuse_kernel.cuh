// SIMT kernels of layer_stack_fuse: one block per patch token reads that token from each of the L
// layers through the layer's own pointer (no stacked copy), normalises it in registers and reduces.
// The same source also runs on the CPU through the host emulation (python_tests/test_fusion_emulation.py).
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#pragma once
#include "fusion/fusion_kernel_common.cuh"

namespace raekern::fusion::cuda {

struct StackArgs {
  const void* layer[kMaxLayers];
  int64_t sb[kMaxLayers], st[kMaxLayers], sd[kMaxLayers];
  int L, D;
  float inv_d;  // 1/D
  int64_t B, T, P, N;
  int reduce;        // Reduce: 0 mean, 1 sum, 2 per layer [L], 3 per token [B, N, L]
  const float* w;    // fp32 weights or null
  float uniform;     // 1/L or 1
  bool normalize;
  float eps;
  const float* tmean;  // [B, D] token-mean of the last normalised layer, or null
  bool channels_first;
  const float* lmean;  // [D, N] latent statistics or null
  const float* lvar;
  float leps;
};

__device__ __forceinline__ float stack_coef(const StackArgs& a, int l, int64_t tok) {
  if (a.reduce == 2) return a.w[l];
  if (a.reduce == 3) return a.w[tok * a.L + l];
  return a.uniform;
}

// Layer l's row of token (b, n) into x; returns its first element (normalize_row's shift).
template <class T, int V, int ITEMS>
__device__ __forceinline__ float load_layer_raw(const StackArgs& a, int l, int64_t b, int64_t n,
                                                float (&x)[ITEMS][V]) {
  const T* row = static_cast<const T*>(a.layer[l]) + b * a.sb[l] + (a.P + n) * a.st[l];
  load_row<T, V, ITEMS>(row, a.sd[l], a.D, x);
  return simt::to_float(row[0]);
}

template <class T, int V, int ITEMS>
__device__ __forceinline__ float load_layer(const StackArgs& a, int l, int64_t b, int64_t n, float (&x)[ITEMS][V],
                                            float* red) {
  const float first = load_layer_raw<T, V, ITEMS>(a, l, b, n, x);
  if (!a.normalize) return 1.f;
  return normalize_row<V, ITEMS>(x, first, a.D, a.inv_d, a.eps, red);
}

// Writes one block's partial (times inv_n) of a [D] row sum into part[b, blockIdx.x, :].
template <int V, int ITEMS>
__device__ __forceinline__ void store_part(const float (&acc)[ITEMS][V], float inv_n, int64_t b, int64_t D,
                                           float* __restrict__ part) {
  float* dst = part + (b * gridDim.x + blockIdx.x) * D;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int d0 = item_base<V>(i);
    if (d0 < D)
#pragma unroll
      for (int j = 0; j < V; ++j) dst[d0 + j] = acc[i][j] * inv_n;
  }
}

// Token-mean of the last normalised layer: blockIdx.y picks the sample, blocks stride over tokens
// and store their partial sums (already divided by N) in part [B, gridDim.x, D] (sum_parts_kernel
// then reduces them in order).
template <class T, int V, int ITEMS>
__global__ void __launch_bounds__(kThreads) last_token_mean_kernel(StackArgs a, float* __restrict__ part) {
  __shared__ float red[2 * simt::kWarp];
  const int64_t b = blockIdx.y;
  float acc[ITEMS][V] = {};
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    float x[ITEMS][V];
    load_layer<T, V, ITEMS>(a, a.L - 1, b, n, x, red);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[i][j] += x[i][j];
  }
  store_part<V, ITEMS>(acc, 1.f / float(a.N), b, a.D, part);
}

// acc = Σ_l c_l·LN(h_l[b, P + n]) (+ the last layer's token-mean) for one token, in registers.
template <class T, int V, int ITEMS>
__device__ __forceinline__ void fuse_token(const StackArgs& a, int64_t b, int64_t n, float (&acc)[ITEMS][V],
                                           float* red) {
  const int64_t tok = b * a.N + n;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) acc[i][j] = 0.f;
  // Layer l + 1's row is loaded before layer l's normalisation: its loads are in flight across that
  // block reduction's barriers (the first H200 run, one row in flight at a time: 13 % of bandwidth).
  float x[ITEMS][V];
  float first = a.L > 0 ? load_layer_raw<T, V, ITEMS>(a, 0, b, n, x) : 0.f;
  for (int l = 0; l < a.L; ++l) {
    float xn[ITEMS][V];
    float first_n = 0.f;
    if (l + 1 < a.L) first_n = load_layer_raw<T, V, ITEMS>(a, l + 1, b, n, xn);
    if (a.normalize) normalize_row<V, ITEMS>(x, first, a.D, a.inv_d, a.eps, red);
    const float c = stack_coef(a, l, tok);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[i][j] += c * x[i][j];
    if (l + 1 < a.L) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int j = 0; j < V; ++j) x[i][j] = xn[i][j];
      first = first_n;
    }
  }
  if (a.tmean) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int d0 = item_base<V>(i);
      if (d0 < a.D)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[i][j] += a.tmean[b * a.D + d0 + j];
    }
  }
}

// Tokens-major output [B, N, D]: one block per token.
template <class T, int V, int ITEMS>
__global__ void __launch_bounds__(kThreads) layer_stack_fuse_kernel(StackArgs a, T* __restrict__ out) {
  __shared__ float red[2 * simt::kWarp];
  const int64_t tok = blockIdx.x;
  float acc[ITEMS][V];
  fuse_token<T, V, ITEMS>(a, tok / a.N, tok % a.N, acc, red);
  store_row<T, V, ITEMS>(out + tok * a.D, a.D, acc);
}

// Row pitch (floats) of the channels-first kernel's shared tile: odd, so the column reads of the
// write phase (consecutive threads, consecutive tokens of one channel) fall in distinct banks.
__host__ __device__ constexpr int cf_pitch(int D) { return D | 1; }

// Channels-first output [B, D, N] (+ the latent standardisation): block (x, y) fuses `tile`
// consecutive tokens of sample y into a shared [tile, pitch] fp32 tile, reading tokens-major as
// above, then writes the tile channel by channel, so each channel's `tile` tokens (and their
// statistics) are one contiguous run instead of one scattered element per block.
// grid = (ceil(N / tile), B), dynamic shared memory tile·cf_pitch(D)·4 bytes.
template <class T, int V, int ITEMS>
__global__ void __launch_bounds__(kThreads) layer_stack_fuse_cf_kernel(StackArgs a, int tile, T* __restrict__ out) {
  __shared__ float red[2 * simt::kWarp];
  RAEKERN_DYNAMIC_SHARED(float, rows);
  const int64_t b = blockIdx.y;
  const int64_t n0 = int64_t(blockIdx.x) * tile;
  const int tn = a.N - n0 < tile ? int(a.N - n0) : tile;
  const int pitch = cf_pitch(a.D);
  for (int t = 0; t < tn; ++t) {
    float acc[ITEMS][V];
    fuse_token<T, V, ITEMS>(a, b, n0 + t, acc, red);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int d0 = item_base<V>(i);
      if (d0 < a.D)
#pragma unroll
        for (int j = 0; j < V; ++j) rows[t * pitch + d0 + j] = acc[i][j];
    }
  }
  __syncthreads();
  T* ob = out + b * a.D * a.N + n0;
  for (int e = threadIdx.x; e < tn * a.D; e += kThreads) {
    const int d = e / tn, t = e - d * tn;
    const int64_t dn = int64_t(d) * a.N + n0 + t;
    float v = rows[t * pitch + d];
    if (a.lmean) v = (v - a.lmean[dn]) * rsqrtf(a.lvar[dn] + a.leps);
    ob[int64_t(d) * a.N + t] = simt::from_float<T>(v);
  }
}

struct StackGradArgs {
  void* dlayer[kMaxLayers];  // L contiguous [B, T, D] gradients
  const void* grad;          // contiguous [B, N, D] or [B, D, N]
  const float* gmean;        // [B, D]: (1/N)·Σ_n g for the last-token-mean term, or null
  float* dw;                 // fp32 [L] (atomics) or [B, N, L], or null
};

template <class T, int V, int ITEMS>
__device__ __forceinline__ void load_grad(const StackArgs& a, const StackGradArgs& g, int64_t b, int64_t n,
                                          float (&x)[ITEMS][V]) {
  const T* gp = static_cast<const T*>(g.grad);
  if (!a.channels_first) {
    load_row<T, V, ITEMS>(gp + (b * a.N + n) * a.D, 1, a.D, x);
    return;
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int d0 = item_base<V>(i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float v = 0.f;
      if (d0 < a.D) {
        const int64_t dn = int64_t(d0 + j) * a.N + n;
        v = simt::to_float(gp[b * a.D * a.N + dn]);
        if (a.lvar) v *= rsqrtf(a.lvar[dn] + a.leps);
      }
      x[i][j] = v;
    }
  }
}

// (1/N)·Σ_n g[b, n] as per-block partials in part [B, gridDim.x, D], reduced by sum_parts_kernel.
template <class T, int V, int ITEMS>
__global__ void __launch_bounds__(kThreads) grad_token_mean_kernel(StackArgs a, StackGradArgs g,
                                                                   float* __restrict__ part) {
  const int64_t b = blockIdx.y;
  float acc[ITEMS][V] = {};
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    float x[ITEMS][V];
    load_grad<T, V, ITEMS>(a, g, b, n, x);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[i][j] += x[i][j];
  }
  store_part<V, ITEMS>(acc, 1.f / float(a.N), b, a.D, part);
}

// Backward of one token whose output gradient row gr is in registers: reads each layer once more,
// writes each layer's gradient row (LayerNorm backward in registers) and the weights' gradient.
template <class T, int V, int ITEMS>
__device__ __forceinline__ void backward_token(const StackArgs& a, const StackGradArgs& g, int64_t b, int64_t n,
                                               const float (&gr)[ITEMS][V], float* red) {
  const int64_t tok = b * a.N + n;
  for (int l = 0; l < a.L; ++l) {
    float y[ITEMS][V];
    const float rstd = load_layer<T, V, ITEMS>(a, l, b, n, y, red);
    const float c = stack_coef(a, l, tok);
    const bool last_mean = g.gmean != nullptr && l == a.L - 1;
    float dy[ITEMS][V];
    float dot = 0.f, s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int d0 = item_base<V>(i);
      const bool ok = d0 < a.D;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float v = c * gr[i][j];
        if (last_mean && ok) v += g.gmean[b * a.D + d0 + j];
        dy[i][j] = ok ? v : 0.f;
        dot += gr[i][j] * y[i][j];
        s1 += dy[i][j];
        s2 += dy[i][j] * y[i][j];
      }
    }
    if (a.normalize) simt::block_sum2(s1, s2, red);
    if (g.dw) {
      dot = simt::block_sum(dot, red);
      // Per token (reduce 3 is this; for [L] weights the launcher adds the tokens' rows in order).
      if (threadIdx.x == 0) g.dw[tok * a.L + l] = dot;
    }
    if (a.normalize) {
      const float m1 = s1 * a.inv_d, m2 = s2 * a.inv_d;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int j = 0; j < V; ++j) dy[i][j] = rstd * (dy[i][j] - m1 - y[i][j] * m2);
    }
    T* drow = static_cast<T*>(g.dlayer[l]) + (b * a.T + a.P + n) * a.D;
    store_row<T, V, ITEMS>(drow, a.D, dy);
  }
}

// Tokens-major gradient [B, N, D]: one block per token.
template <class T, int V, int ITEMS>
__global__ void __launch_bounds__(kThreads) layer_stack_fuse_backward_kernel(StackArgs a, StackGradArgs g) {
  __shared__ float red[2 * simt::kWarp];
  const int64_t tok = blockIdx.x;
  const int64_t b = tok / a.N, n = tok % a.N;
  float gr[ITEMS][V];
  load_grad<T, V, ITEMS>(a, g, b, n, gr);
  backward_token<T, V, ITEMS>(a, g, b, n, gr, red);
}

// Channels-first gradient [B, D, N]: the transpose of layer_stack_fuse_cf_kernel. Block (x, y)
// first reads `tile` consecutive tokens of sample y channel by channel (contiguous runs of the
// gradient and of the statistics) into a shared [tile, pitch] tile, then runs each token as above
// with its gradient row taken from the tile. grid = (ceil(N / tile), B), shared tile·cf_pitch(D)·4 bytes.
template <class T, int V, int ITEMS>
__global__ void __launch_bounds__(kThreads) layer_stack_fuse_backward_cf_kernel(StackArgs a, StackGradArgs g,
                                                                                int tile) {
  __shared__ float red[2 * simt::kWarp];
  RAEKERN_DYNAMIC_SHARED(float, rows);
  const int64_t b = blockIdx.y;
  const int64_t n0 = int64_t(blockIdx.x) * tile;
  const int tn = a.N - n0 < tile ? int(a.N - n0) : tile;
  const int pitch = cf_pitch(a.D);
  const T* gb = static_cast<const T*>(g.grad) + b * a.D * a.N + n0;
  for (int e = threadIdx.x; e < tn * a.D; e += kThreads) {
    const int d = e / tn, t = e - d * tn;
    float v = simt::to_float(gb[int64_t(d) * a.N + t]);
    if (a.lvar) v *= rsqrtf(a.lvar[int64_t(d) * a.N + n0 + t] + a.leps);
    rows[t * pitch + d] = v;
  }
  __syncthreads();
  for (int t = 0; t < tn; ++t) {
    float gr[ITEMS][V];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int d0 = item_base<V>(i);
#pragma unroll
      for (int j = 0; j < V; ++j) gr[i][j] = d0 < a.D ? rows[t * pitch + d0 + j] : 0.f;
    }
    backward_token<T, V, ITEMS>(a, g, b, n0 + t, gr, red);
  }
}

}  // namespace raekern::fusion::cuda
