// Device code of raekern::guidance_step (SIMT; compiles under nvcc and under the host emulation).
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
// Since then (not yet run on a GPU): combine_kernel per stream count, the statistics pass without x
// where no statistic needs it, solve_kernel per raw stream count.
//
// Three launches: gram_kernel (only when a rule needs statistics: per-sample Gram matrix and sums of
// the rebased streams, fp32 per thread, fp64 atomics across blocks), solve_kernel (one thread per
// sample runs the shared scalar solve of guidance_solve.h), combine_kernel (every output as a
// per-sample linear combination of the streams, one read of each used stream, one write per output).
#pragma once
#include "common/simt.cuh"
#include "guidance/guidance_solve.h"

namespace raekern::guidance::cuda {

constexpr int kThreads = 256;
constexpr int kMaxGram = 8;  // CUDA limit on 1 + K + momentum terms (register-resident Gram)

struct Params {
  Config cfg;
  const void* ptr[kMaxStreams];  // rebased layout; momentum streams are float
  int64_t stride[kMaxStreams];   // row (sample) stride in elements; 0 for an expanded input
  int64_t B, N;
  int64_t chunk;   // elements per block
  int64_t chunks;  // blocks per sample
  int ns, nout;
  int first_m, last_m;  // [first_m, last_m): momentum streams
  int vec_ok;           // every T stream 16-byte aligned with N a multiple of the vector width
  int return_x0;
  int gram_x;           // the statistics pass reads x (cfg.stats_read_x()); otherwise its entries are 0
  ScalarTable t, t_next, w;         // per-sample t, t_next; weights (b, j)
  const unsigned char* zero_init;  // nullptr: no sample starts at zero
  double* stats;   // [B, nacc]
  double* coeffs;  // [B, nout, ns]
  void* out;
  void* x0;
  float* mom_out;  // [J, B, N]
};

template <class T>
__device__ __forceinline__ float load_stream(const Params& p, int e, int64_t b, int64_t i) {
  if (e >= p.first_m && e < p.last_m) return static_cast<const float*>(p.ptr[e])[b * p.stride[e] + i];
  return simt::to_float(static_cast<const T*>(p.ptr[e])[b * p.stride[e] + i]);
}

template <class T, int V>
__device__ __forceinline__ void load_stream_vec(const Params& p, int e, int64_t b, int64_t i, float (&v)[V]) {
  if (e >= p.first_m && e < p.last_m) {
    const float* src = static_cast<const float*>(p.ptr[e]) + b * p.stride[e] + i;
#pragma unroll
    for (int l = 0; l < V; ++l) v[l] = src[l];  // momentum is fp32: cached scalar loads
  } else if (V == 1) {
    v[0] = simt::to_float(static_cast<const T*>(p.ptr[e])[b * p.stride[e] + i]);
  } else {
    simt::load_vec<T, V>(static_cast<const T*>(p.ptr[e]) + b * p.stride[e] + i, v);
  }
}

// ---- pass 1: Gram matrix and sums ---------------------------------------------------------------

template <class T, int NG, int V>
__device__ __forceinline__ void gram_accumulate(const Params& p, int64_t b, int64_t begin, int64_t end,
                                                float (&acc)[NG * (NG + 1) / 2 + NG]) {
  const int K = p.cfg.K;
  for (int64_t i = begin + int64_t(threadIdx.x) * V; i < end; i += int64_t(blockDim.x) * V) {
    float v[NG][V];
#pragma unroll
    for (int e = 0; e < NG; ++e) {
      if (e == 0 && !p.gram_x) {  // x not read: its Gram entries get zero weight in the solve
#pragma unroll
        for (int l = 0; l < V; ++l) v[0][l] = 0.f;
      } else {
        load_stream_vec<T, V>(p, e, b, i, v[e]);
      }
    }
#pragma unroll
    for (int e = 2; e < NG; ++e)
      if (e <= K) {
#pragma unroll
        for (int l = 0; l < V; ++l) v[e][l] -= v[1][l];  // differences before any product
      }
#pragma unroll
    for (int l = 0; l < V; ++l) {
      int a = 0;
#pragma unroll
      for (int e = 0; e < NG; ++e) {
#pragma unroll
        for (int f = e; f < NG; ++f) acc[a++] += v[e][l] * v[f][l];
      }
#pragma unroll
      for (int e = 0; e < NG; ++e) acc[a++] += v[e][l];
    }
  }
}

template <class T, int NG>
__global__ void __launch_bounds__(kThreads) gram_kernel(Params p) {
  constexpr int NACC = NG * (NG + 1) / 2 + NG;
  RAEKERN_DYNAMIC_SHARED(float, smem);  // [nwarps][NACC]
  const int64_t b = int64_t(blockIdx.x) / p.chunks;
  const int64_t c = int64_t(blockIdx.x) % p.chunks;
  const int64_t begin = c * p.chunk;
  const int64_t end = begin + p.chunk < p.N ? begin + p.chunk : p.N;
  float acc[NACC];
#pragma unroll
  for (int a = 0; a < NACC; ++a) acc[a] = 0.f;
  constexpr int V = simt::kVec16<T>;
  if (p.vec_ok)
    gram_accumulate<T, NG, V>(p, b, begin, end, acc);
  else
    gram_accumulate<T, NG, 1>(p, b, begin, end, acc);
  const int lane = threadIdx.x % simt::kWarp, warp = threadIdx.x / simt::kWarp;
  const int nwarps = blockDim.x / simt::kWarp;
#pragma unroll
  for (int a = 0; a < NACC; ++a) {
    const float s = simt::warp_sum(acc[a]);
    if (lane == 0) smem[warp * NACC + a] = s;
  }
  __syncthreads();
  // One row of partial statistics per (sample, chunk), no atomics: solve_kernel adds the chunks in
  // order, so the coefficients (and the outputs) are bit-identical run to run.
  for (int a = threadIdx.x; a < NACC; a += blockDim.x) {
    double s = 0.0;
    for (int w = 0; w < nwarps; ++w) s += double(smem[w * NACC + a]);
    p.stats[(b * p.chunks + c) * NACC + a] = s;
  }
}

// ---- the per-sample solve -----------------------------------------------------------------------

// NS: room for raw_size(p.cfg) raw streams (the launcher picks the smallest instance that fits).
template <int NS>
__global__ void solve_kernel(Params p) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.B) return;
  Sample s;
  s.t = p.t.at(b);
  s.t_next = p.t_next.at(b);
  for (int j = 0; j < p.cfg.J; ++j) s.w[j] = p.w.at(b, j);
  s.zero_init = p.zero_init != nullptr && p.zero_init[b] != 0;
  const int ng = p.cfg.gram_size();
  const int nacc = gram_entries(ng) + ng;
  double sum[kMaxGram * (kMaxGram + 1) / 2 + kMaxGram];
  const double* g = nullptr;
  if (p.cfg.needs_gram()) {  // the chunks' partial statistics of sample b, added in chunk order
    for (int a = 0; a < nacc; ++a) sum[a] = 0.0;
    if (p.stats)  // (none for empty samples: every statistic is a sum over nothing)
      for (int64_t ch = 0; ch < p.chunks; ++ch)
        for (int a = 0; a < nacc; ++a) sum[a] += p.stats[(b * p.chunks + ch) * nacc + a];
    g = sum;
  }
  CoeffsN<NS> c;
  solve_n<NS>(p.cfg, s, g, g ? g + gram_entries(ng) : nullptr, c);
  double* dst = p.coeffs + b * p.nout * p.ns;
  for (int o = 0; o < p.nout; ++o)
    for (int e = 0; e < p.ns; ++e) dst[o * p.ns + e] = c.c[o][e];
}

// ---- pass 2: outputs ----------------------------------------------------------------------------

// The step's output (and the x0 preview, when asked for) at [i, i + V).
template <class T, int V>
__device__ __forceinline__ void store_outputs(T* out, T* x0, int64_t i, const float (&ao)[V], const float (&ax)[V]) {
  if (V == 1) {
    out[i] = simt::from_float<T>(ao[0]);
    if (x0) x0[i] = simt::from_float<T>(ax[0]);
  } else {
    simt::store_vec<T, V>(out + i, ao);
    if (x0) simt::store_vec<T, V>(x0 + i, ax);
  }
}

template <class T, int V>
__device__ __forceinline__ void combine_range(const Params& p, int64_t b, int64_t begin, int64_t end,
                                              const float* coef, const int* used) {
  const int K = p.cfg.K;
  const int ns = p.ns;
  T* out = static_cast<T*>(p.out) + b * p.N;
  T* x0 = p.return_x0 ? static_cast<T*>(p.x0) + b * p.N : nullptr;
  for (int64_t i = begin + int64_t(threadIdx.x) * V; i < end; i += int64_t(blockDim.x) * V) {
    float base[V];
    if (used[1]) {
      load_stream_vec<T, V>(p, 1, b, i, base);
    } else {
#pragma unroll
      for (int l = 0; l < V; ++l) base[l] = 0.f;
    }
    float ao[V], ax[V];
#pragma unroll
    for (int l = 0; l < V; ++l) ao[l] = ax[l] = 0.f;
    for (int e = 0; e < ns; ++e) {
      if (!used[e]) continue;
      float v[V];
      if (e == 1) {
#pragma unroll
        for (int l = 0; l < V; ++l) v[l] = base[l];
      } else {
        load_stream_vec<T, V>(p, e, b, i, v);
        if (e >= 2 && e <= K) {
#pragma unroll
          for (int l = 0; l < V; ++l) v[l] -= base[l];
        }
      }
      const float c0 = coef[e], c1 = coef[ns + e];
#pragma unroll
      for (int l = 0; l < V; ++l) {
        ao[l] += c0 * v[l];
        ax[l] += c1 * v[l];
      }
    }
    store_outputs<T, V>(out, x0, i, ao, ax);
    // APG buffers: one more combination each; the streams are re-read from L1/L2.
    for (int o = 2; o < p.nout; ++o) {
      float am[V];
#pragma unroll
      for (int l = 0; l < V; ++l) am[l] = 0.f;
      for (int e = 0; e < ns; ++e) {
        const float ce = coef[o * ns + e];
        if (ce == 0.f) continue;
        float v[V];
        load_stream_vec<T, V>(p, e, b, i, v);
        if (e >= 2 && e <= K) {
#pragma unroll
          for (int l = 0; l < V; ++l) v[l] -= base[l];
        }
#pragma unroll
        for (int l = 0; l < V; ++l) am[l] += ce * v[l];
      }
      float* dst = p.mom_out + (int64_t(o - 2) * p.B + b) * p.N + i;
#pragma unroll
      for (int l = 0; l < V; ++l) dst[l] = am[l];
    }
  }
}

// combine_range with the stream count NS known at compile time: every used stream of a position is
// loaded before the first product (NS independent 16-byte loads in flight per thread, where
// combine_range's runtime loop over streams issues one and waits: the first H200 run put the pure
// combinations at 26-35 % of copy bandwidth), and the APG outputs reuse the registers instead of
// re-reading the streams. The same products, summed in the same order, as combine_range.
template <class T, int V, int NS>
__device__ __forceinline__ void combine_range_fixed(const Params& p, int64_t b, int64_t begin, int64_t end,
                                                    const float* coef, const int* used) {
  const int K = p.cfg.K;
  T* out = static_cast<T*>(p.out) + b * p.N;
  T* x0 = p.return_x0 ? static_cast<T*>(p.x0) + b * p.N : nullptr;
  for (int64_t i = begin + int64_t(threadIdx.x) * V; i < end; i += int64_t(blockDim.x) * V) {
    float v[NS][V];
#pragma unroll
    for (int e = 0; e < NS; ++e) {
      if (used[e]) {
        load_stream_vec<T, V>(p, e, b, i, v[e]);
      } else {
#pragma unroll
        for (int l = 0; l < V; ++l) v[e][l] = 0.f;
      }
    }
#pragma unroll
    for (int e = 2; e < NS; ++e)
      if (e <= K && used[e]) {
#pragma unroll
        for (int l = 0; l < V; ++l) v[e][l] -= v[1][l];
      }
    float ao[V], ax[V];
#pragma unroll
    for (int l = 0; l < V; ++l) ao[l] = ax[l] = 0.f;
#pragma unroll
    for (int e = 0; e < NS; ++e) {
      if (!used[e]) continue;
      const float c0 = coef[e], c1 = coef[NS + e];
#pragma unroll
      for (int l = 0; l < V; ++l) {
        ao[l] += c0 * v[e][l];
        ax[l] += c1 * v[e][l];
      }
    }
    store_outputs<T, V>(out, x0, i, ao, ax);
    for (int o = 2; o < p.nout; ++o) {
      float am[V];
#pragma unroll
      for (int l = 0; l < V; ++l) am[l] = 0.f;
#pragma unroll
      for (int e = 0; e < NS; ++e) {
        const float ce = coef[o * NS + e];
        if (ce == 0.f) continue;
#pragma unroll
        for (int l = 0; l < V; ++l) am[l] += ce * v[e][l];
      }
      float* dst = p.mom_out + (int64_t(o - 2) * p.B + b) * p.N + i;
#pragma unroll
      for (int l = 0; l < V; ++l) dst[l] = am[l];
    }
  }
}

// NS > 0: p.ns == NS streams, combine_range_fixed; NS == 0: any stream count, combine_range.
template <class T, int NS = 0>
__global__ void __launch_bounds__(kThreads) combine_kernel(Params p) {
  __shared__ float coef[kMaxOutputs * kMaxStreams];
  __shared__ int used[kMaxStreams];
  const int64_t b = int64_t(blockIdx.x) / p.chunks;
  const int64_t c = int64_t(blockIdx.x) % p.chunks;
  const int n = p.nout * p.ns;
  const double* src = p.coeffs + b * n;
  for (int k = threadIdx.x; k < n; k += blockDim.x) coef[k] = float(src[k]);
  __syncthreads();
  if (threadIdx.x < p.ns) {
    const int e = threadIdx.x;
    // A stream is read only when some output uses it, so e.g. x is not read for a pure velocity
    // combination (and a NaN there cannot reach the output, as in the reference formulas).
    int u = coef[e] != 0.f || (p.return_x0 && coef[p.ns + e] != 0.f);
    for (int o = 2; o < p.nout; ++o) u = u || coef[o * p.ns + e] != 0.f;
    used[e] = u;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int any_diff = 0;
    for (int e = 2; e <= p.cfg.K; ++e) any_diff = any_diff || used[e];
    used[1] = used[1] || any_diff;
  }
  __syncthreads();
  const int64_t begin = c * p.chunk;
  const int64_t end = begin + p.chunk < p.N ? begin + p.chunk : p.N;
  constexpr int V = simt::kVec16<T>;
  if constexpr (NS > 0) {
    if (p.vec_ok)
      combine_range_fixed<T, V, NS>(p, b, begin, end, coef, used);
    else
      combine_range_fixed<T, 1, NS>(p, b, begin, end, coef, used);
  } else {
    if (p.vec_ok)
      combine_range<T, V>(p, b, begin, end, coef, used);
    else
      combine_range<T, 1>(p, b, begin, end, coef, used);
  }
}

// ---- guidance_combine (backward): Σ_e coeffs[b, e]·in_e[b] ---------------------------------------

constexpr int kMaxCombineInputs = 16;
struct CombineParams {
  const void* ptr[kMaxCombineInputs];
  int64_t stride[kMaxCombineInputs];
  int n_in;
  int64_t B, N, chunk, chunks;
  const double* coeffs;  // [B, n_in]
  void* out;
};

template <class T>
__global__ void __launch_bounds__(kThreads) lincomb_kernel(CombineParams p) {
  __shared__ float coef[kMaxCombineInputs];
  const int64_t b = int64_t(blockIdx.x) / p.chunks;
  const int64_t c = int64_t(blockIdx.x) % p.chunks;
  if (threadIdx.x < p.n_in) coef[threadIdx.x] = float(p.coeffs[b * p.n_in + threadIdx.x]);
  __syncthreads();
  const int64_t begin = c * p.chunk;
  const int64_t end = begin + p.chunk < p.N ? begin + p.chunk : p.N;
  T* out = static_cast<T*>(p.out) + b * p.N;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float a = 0.f;
    for (int e = 0; e < p.n_in; ++e)
      if (coef[e] != 0.f) a += coef[e] * simt::to_float(static_cast<const T*>(p.ptr[e])[b * p.stride[e] + i]);
    out[i] = simt::from_float<T>(a);
  }
}

}  // namespace raekern::guidance::cuda
