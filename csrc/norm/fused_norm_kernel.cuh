// Device code of the norm family: the fused row operation of norm_params.h, forward and backward.
// Includes only common/simt.cuh (and the plain-data params), so the host emulation can run it.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
//
// Forward: rows of up to 2048 elements with 16-byte accesses take fused_norm_forward_rows (one warp
// per row, the row in registers); the others fused_norm_forward: one block per row (grid-stride). Each
// thread owns the columns
//   i = (threadIdx.x + k * blockDim.x) * V,  k = 0, 1, ...
// and touches only those, so the fp32 row kept in dynamic shared memory needs no barrier besides the
// ones inside the block reductions. V = 16 bytes / sizeof(T) when every operand allows 128-bit
// accesses (kVec), else 1 with arbitrary feature strides.
// Backward: one block per task (a token range of one sample). Per-sample / global gradients are
// summed over the task's rows in shared memory, per owned column, and written once as partial sums.
#pragma once
#include "common/constant_dispatch.h"
#include "common/simt.cuh"
#include "norm/norm_params.h"

namespace raekern::norm::cuda {

using raekern::with_constant;
using simt::from_float;
using simt::lane_column;
using simt::to_float;

template <class T>
__device__ __forceinline__ const T* row_ptr(const Operand& o, int64_t b, int64_t n) {
  return static_cast<const T*>(o.ptr) + b * o.sb + n * o.sn;
}

template <class T, int V>
__device__ __forceinline__ void load(const T* p, int64_t i, int64_t sd, float (&v)[V]) {
  if constexpr (V > 1) {
    simt::load_vec<T, V>(p + i, v);
  } else {
    v[0] = to_float(p[i * sd]);
  }
}

template <class T, int V>
__device__ __forceinline__ void store(T* p, int64_t i, const float (&v)[V]) {
  if constexpr (V > 1) {
    simt::store_vec<T, V>(p + i, v);
  } else {
    p[i] = from_float<T>(v[0]);
  }
}

template <int V>
__device__ __forceinline__ void load_f32(const float* p, int64_t i, float (&v)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = p[i + j];
}

template <int V>
__device__ __forceinline__ void fill(float (&v)[V], float x) {
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = x;
}

// weight and bias at columns [i, i + V): 1 and 0 where absent.
template <int V>
__device__ __forceinline__ void load_affine(const float* w, const float* bias, int64_t i, float (&wv)[V],
                                            float (&bv)[V]) {
  if (w) load_f32(w, i, wv);
  else fill(wv, 1.f);
  if (bias) load_f32(bias, i, bv);
  else fill(bv, 0.f);
}

// out[i, i + V) = ((x - mean)·rstd·weight + bias)·(1 + scale) + shift, an absent operand as the identity.
// (x - mean) * rstd, not x*rstd - mean*rstd: exact 0 on a constant row (rstd = 1/sqrt(eps)).
template <class T, int V>
__device__ __forceinline__ void modulate_store(const FwdParams& p, const T* shift, const T* scale, int64_t i,
                                               const float (&xv)[V], float mean, float rstd, T* out) {
  const float* w = static_cast<const float*>(p.weight);
  const float* bias = static_cast<const float*>(p.bias);
  float sh[V], sc[V], wv[V], bv[V], o[V];
  if (shift) load<T, V>(shift, i, p.shift.sd, sh);
  else fill(sh, 0.f);
  if (scale) load<T, V>(scale, i, p.scale.sd, sc);
  else fill(sc, 0.f);
  load_affine(w, bias, i, wv, bv);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float h = fmaf((xv[j] - mean) * rstd, wv[j], bv[j]);
    o[j] = fmaf(h, 1.f + sc[j], sh[j]);
  }
  store<T, V>(out, i, o);
}

template <class T, int V>
__global__ void fused_norm_forward(FwdParams p) {
  RAEKERN_DYNAMIC_SHARED(float, xb);
  __shared__ float red[2 * simt::kWarp];
  const int64_t rows = p.B * p.N, D = p.D;
  const int64_t step = int64_t(blockDim.x) * V;
  const bool residual = p.gate.ptr != nullptr, norm = p.kind != Kind::None;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / p.N, n = row - b * p.N;
    const T* x = row_ptr<T>(p.x, b, n);
    const T* gate = residual ? row_ptr<T>(p.gate, b, n) : nullptr;
    const T* y = residual ? row_ptr<T>(p.y, b, n) : nullptr;
    T* x_out = residual ? static_cast<T*>(p.x_out) + row * D : nullptr;
    // LayerNorm sums relative to the row's first value c (as stored in xb: after the residual and its
    // rounding), as the CPU kernel does: a constant row then gets mean == c exactly; s·(1/D) is not
    // exact, and rstd = 1/sqrt(eps) would turn that rounding into outputs far from 0.
    float c = 0.f;
    if (p.kind == Kind::Layer && D > 0) {
      c = to_float(x[0]);
      if (residual) c = to_float(from_float<T>(fmaf(to_float(gate[0]), to_float(y[0]), c)));
    }
    float s = 0.f, ss = 0.f;
    for (int64_t i = int64_t(threadIdx.x) * V; i < D; i += step) {
      float r[V];
      load<T, V>(x, i, p.x.sd, r);
      if (residual) {
        float g[V], yv[V];
        load<T, V>(gate, i, p.gate.sd, g);
        load<T, V>(y, i, p.y.sd, yv);
#pragma unroll
        for (int j = 0; j < V; ++j) r[j] = fmaf(g[j], yv[j], r[j]);
        store<T, V>(x_out, i, r);
        // Normalise the value x_out holds, as the unfused pair would.
#pragma unroll
        for (int j = 0; j < V; ++j) r[j] = to_float(from_float<T>(r[j]));
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        xb[i + j] = r[j];
        s += r[j] - c;
        ss = fmaf(r[j], r[j], ss);
      }
    }
    if (!norm) continue;
    simt::block_sum2(s, ss, red);
    const float inv_d = 1.f / float(D);
    float mean = 0.f;
    if (p.kind == Kind::Layer) {
      // Variance from the row in shared memory, not E[x^2] - mean^2 (cancellation).
      mean = c + s * inv_d;
      float v = 0.f;
      for (int64_t i = int64_t(threadIdx.x) * V; i < D; i += step) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = xb[i + j] - mean;
          v = fmaf(d, d, v);
        }
      }
      ss = simt::block_sum(v, red);
    }
    const float rstd = rsqrtf(ss * inv_d + float(p.eps));
    if (threadIdx.x == 0) {
      static_cast<float*>(p.mean)[row] = mean;
      static_cast<float*>(p.rstd)[row] = rstd;
    }
    const T* shift = p.shift.ptr ? row_ptr<T>(p.shift, b, n) : nullptr;
    const T* scale = p.scale.ptr ? row_ptr<T>(p.scale, b, n) : nullptr;
    T* out = static_cast<T*>(p.out) + row * D;
    for (int64_t i = int64_t(threadIdx.x) * V; i < D; i += step) {
      float xv[V];
      load_f32(xb, i, xv);
      modulate_store<T, V>(p, shift, scale, i, xv, mean, rstd, out);
    }
  }
}

// Forward for rows that fit in registers (16-byte accesses, D <= 32·NV·V): one warp per row, several
// rows per block. The H200 run of fused_norm_forward (2026-11-30) reached 15–35 % of copy bandwidth:
// there each thread has one 16-byte load in flight before a block reduction stalls it. Here every load
// of the row (NV per lane) is issued before the first reduction, the reductions are warp shuffles (no
// barrier, no shared memory), and the row never leaves registers. Same arithmetic as
// fused_norm_forward, op for op (only the order of the partial sums differs). Not yet run on a GPU
// (emulation-tested; written after the H200 run).
template <class T, int V, int NV>
__global__ void fused_norm_forward_rows(FwdParams p) {
  const int lane = int(threadIdx.x) % simt::kWarp;
  const int64_t warps = int64_t(blockDim.x) / simt::kWarp;
  const int64_t rows = p.B * p.N, D = p.D;
  const bool residual = p.gate.ptr != nullptr, norm = p.kind != Kind::None;
  for (int64_t row = int64_t(blockIdx.x) * warps + int64_t(threadIdx.x) / simt::kWarp; row < rows;
       row += int64_t(gridDim.x) * warps) {
    const int64_t b = row / p.N, n = row - b * p.N;
    const T* x = row_ptr<T>(p.x, b, n);
    float r[NV][V];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t i = lane_column<V>(lane, k);
      if (i < D) load<T, V>(x, i, 1, r[k]);
      else fill(r[k], 0.f);
    }
    if (residual) {
      const T* gate = row_ptr<T>(p.gate, b, n);
      const T* y = row_ptr<T>(p.y, b, n);
      T* x_out = static_cast<T*>(p.x_out) + row * D;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int64_t i = lane_column<V>(lane, k);
        if (i >= D) continue;
        float g[V], yv[V];
        load<T, V>(gate, i, 1, g);
        load<T, V>(y, i, 1, yv);
#pragma unroll
        for (int j = 0; j < V; ++j) r[k][j] = fmaf(g[j], yv[j], r[k][j]);
        store<T, V>(x_out, i, r[k]);
#pragma unroll
        for (int j = 0; j < V; ++j) r[k][j] = to_float(from_float<T>(r[k][j]));
      }
    }
    if (!norm) continue;
    // LayerNorm sums relative to the row's first value (see fused_norm_forward): lane 0 holds it.
    const float c = p.kind == Kind::Layer ? __shfl_sync(simt::kFullMask, r[0][0], 0) : 0.f;
    float s = 0.f, ss = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (lane_column<V>(lane, k) >= D) continue;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        s += r[k][j] - c;
        ss = fmaf(r[k][j], r[k][j], ss);
      }
    }
    s = simt::warp_sum(s);
    const float inv_d = 1.f / float(D);
    float mean = 0.f;
    if (p.kind == Kind::Layer) {
      mean = c + s * inv_d;
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (lane_column<V>(lane, k) >= D) continue;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = r[k][j] - mean;
          v = fmaf(d, d, v);
        }
      }
      ss = v;
    }
    ss = simt::warp_sum(ss);
    const float rstd = rsqrtf(ss * inv_d + float(p.eps));
    if (lane == 0) {
      static_cast<float*>(p.mean)[row] = mean;
      static_cast<float*>(p.rstd)[row] = rstd;
    }
    const T* shift = p.shift.ptr ? row_ptr<T>(p.shift, b, n) : nullptr;
    const T* scale = p.scale.ptr ? row_ptr<T>(p.scale, b, n) : nullptr;
    T* out = static_cast<T*>(p.out) + row * D;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t i = lane_column<V>(lane, k);
      if (i < D) modulate_store<T, V>(p, shift, scale, i, r[k], mean, rstd, out);
    }
  }
}

// f(kernel): the fused_norm_forward_rows instance for `nv` vectors per lane (one of
// norm_launch.h's kRowsNv buckets; the largest ones only for fp32, whose vectors hold 4 elements).
template <class T, int V, class F>
void with_rows_kernel(int nv, F&& f) {
  auto g = [&](auto c) { f(&fused_norm_forward_rows<T, V, decltype(c)::value>); };
  if constexpr (V <= 4) with_constant<1, 2, 3, 4, 5, 6, 8, 12, 16>(nv, g);
  else with_constant<1, 2, 3, 4, 5, 6, 8>(nv, g);
}

// The reduced gradients' running sums of one task (a slot's columns [0, D), or null when the slot is
// not reduced), wherever a kernel keeps them.
struct BwdAcc {
  float *gate, *shift, *scale, *w, *b;
};

__device__ __forceinline__ BwdAcc bwd_acc(const BwdParams& p, float* base) {
  const int64_t D = p.D;
  auto at = [&](const GradSlot& s) { return s.partial >= 0 ? base + s.partial * D : nullptr; };
  return {at(p.dgate), at(p.dshift), at(p.dscale), at(p.dweight), at(p.dbias)};
}

// First stage of the backward on the V columns at i of one row: x̂ and g = d x̂ · weight (written to
// xh, g; xv may be xh), the row sums s1 += g, s2 += g·x̂, the reduced gradients' sums and the per-row
// d shift / d scale. Both backward kernels run it, so their arithmetic is the same op for op.
template <class T, int V>
__device__ __forceinline__ void backward_first(const BwdParams& p, int64_t row, int64_t i, const T* scale,
                                               float mean, float rstd, const float (&xv)[V], const float (&go)[V],
                                               const BwdAcc& acc, float (&xh)[V], float (&g)[V], float& s1,
                                               float& s2) {
  const int64_t D = p.D;
  float sc[V], wv[V], bv[V], tmp[V];
  if (scale) load<T, V>(scale, i, p.scale.sd, sc);
  else fill(sc, 0.f);
  load_affine(static_cast<const float*>(p.weight), static_cast<const float*>(p.bias), i, wv, bv);
  if (p.dshift.mode == GradMode::PerRow) store<T, V>(static_cast<T*>(p.dshift.ptr) + row * D, i, go);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float xhat = (xv[j] - mean) * rstd;
    tmp[j] = go[j] * fmaf(xhat, wv[j], bv[j]);  // d scale
    if (acc.shift) acc.shift[i + j] += go[j];
    if (acc.scale) acc.scale[i + j] += tmp[j];
    const float dh = go[j] * (1.f + sc[j]);
    if (acc.w) acc.w[i + j] = fmaf(dh, xhat, acc.w[i + j]);
    if (acc.b) acc.b[i + j] += dh;
    xh[j] = xhat;
    g[j] = dh * wv[j];
    s1 += g[j];
    s2 = fmaf(g[j], xhat, s2);
  }
  if (p.dscale.mode == GradMode::PerRow) store<T, V>(static_cast<T*>(p.dscale.ptr) + row * D, i, tmp);
}

// Per-row d shift / d scale of a row whose `out` got no gradient: zeros.
template <class T, int V>
__device__ __forceinline__ void backward_zero_modulation(const BwdParams& p, int64_t row, int64_t i) {
  float zero[V];
  fill(zero, 0.f);
  if (p.dshift.mode == GradMode::PerRow) store<T, V>(static_cast<T*>(p.dshift.ptr) + row * p.D, i, zero);
  if (p.dscale.mode == GradMode::PerRow) store<T, V>(static_cast<T*>(p.dscale.ptr) + row * p.D, i, zero);
}

// Second stage on the V columns at i: dx = d x_out + rstd·(g − c1 − x̂·c2) (the norm part only when
// `norm`), then the residual stage's d gate (summed or per row) and d y. dxo/gate/y: the row's
// operands, or null.
template <class T, int V>
__device__ __forceinline__ void backward_second(const BwdParams& p, int64_t row, int64_t i, const T* dxo,
                                                const T* gate, const T* y, bool norm, float rstd, float c1,
                                                float c2, const float (&xh)[V], const float (&g)[V],
                                                const BwdAcc& acc) {
  const int64_t D = p.D;
  float dx[V], e[V];
  if (dxo) load<T, V>(dxo, i, p.dxo.sd, dx);
  else fill(dx, 0.f);
  if (norm) {
#pragma unroll
    for (int j = 0; j < V; ++j) dx[j] += rstd * (g[j] - c1 - xh[j] * c2);
  }
  if (gate) {
    float gv[V], yv[V];
    load<T, V>(gate, i, p.gate.sd, gv);
    load<T, V>(y, i, p.y.sd, yv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      e[j] = dx[j] * yv[j];  // d gate
      if (acc.gate) acc.gate[i + j] += e[j];
    }
    if (p.dgate.mode == GradMode::PerRow) store<T, V>(static_cast<T*>(p.dgate.ptr) + row * D, i, e);
#pragma unroll
    for (int j = 0; j < V; ++j) e[j] = gv[j] * dx[j];  // d y
    store<T, V>(static_cast<T*>(p.dy) + row * D, i, e);
  }
  store<T, V>(static_cast<T*>(p.dx) + row * D, i, dx);
}

// Shared memory: xh[D] (normalised input), g[D] (d xhat), acc[num_partials * D] (task sums).
template <class T, int V>
__global__ void fused_norm_backward(BwdParams p) {
  RAEKERN_DYNAMIC_SHARED(float, smem);
  __shared__ float red[2 * simt::kWarp];
  const int64_t D = p.D, np = p.num_partials;
  float* xh = smem;
  float* gs = smem + D;
  float* acc = smem + 2 * D;
  const int64_t step = int64_t(blockDim.x) * V;
  const int64_t t = blockIdx.x;
  const int64_t b = t / p.chunks, n0 = (t % p.chunks) * p.rows_per_task;
  const int64_t n1 = n0 + p.rows_per_task < p.N ? n0 + p.rows_per_task : p.N;
  const bool residual = p.gate.ptr != nullptr;
  const bool norm = p.kind != Kind::None && p.dout.ptr != nullptr;
  const float inv_d = 1.f / float(D);
  const BwdAcc sums = bwd_acc(p, acc);
  for (int64_t k = 0; k < np; ++k)
    for (int64_t i = int64_t(threadIdx.x) * V; i < D; i += step)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[k * D + i + j] = 0.f;

  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = b * p.N + n;
    float c1 = 0.f, c2 = 0.f, rstd = 0.f;
    if (norm) {
      rstd = static_cast<const float*>(p.rstd)[row];
      const float mean = p.kind == Kind::Layer ? static_cast<const float*>(p.mean)[row] : 0.f;
      const T* xin = row_ptr<T>(p.xin, b, n);
      const T* dout = row_ptr<T>(p.dout, b, n);
      const T* scale = p.scale.ptr ? row_ptr<T>(p.scale, b, n) : nullptr;
      float s1 = 0.f, s2 = 0.f;
      for (int64_t i = int64_t(threadIdx.x) * V; i < D; i += step) {
        float xv[V], go[V], xhv[V], gv[V];
        load<T, V>(xin, i, p.xin.sd, xv);
        load<T, V>(dout, i, p.dout.sd, go);
        backward_first<T, V>(p, row, i, scale, mean, rstd, xv, go, sums, xhv, gv, s1, s2);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          xh[i + j] = xhv[j];
          gs[i + j] = gv[j];
        }
      }
      simt::block_sum2(s1, s2, red);
      c1 = p.kind == Kind::Layer ? s1 * inv_d : 0.f;
      c2 = s2 * inv_d;
    } else if (p.kind != Kind::None) {  // no gradient reached `out`
      for (int64_t i = int64_t(threadIdx.x) * V; i < D; i += step) backward_zero_modulation<T, V>(p, row, i);
    }
    const T* dxo = p.dxo.ptr ? row_ptr<T>(p.dxo, b, n) : nullptr;
    const T* gate = residual ? row_ptr<T>(p.gate, b, n) : nullptr;
    const T* y = residual ? row_ptr<T>(p.y, b, n) : nullptr;
    for (int64_t i = int64_t(threadIdx.x) * V; i < D; i += step) {
      float xhv[V], gv[V];
      load_f32(xh, i, xhv);
      load_f32(gs, i, gv);
      backward_second<T, V>(p, row, i, dxo, gate, y, norm, rstd, c1, c2, xhv, gv, sums);
    }
  }
  float* part = static_cast<float*>(p.partials) + t * np * D;
  for (int64_t k = 0; k < np; ++k)
    for (int64_t i = int64_t(threadIdx.x) * V; i < D; i += step)
#pragma unroll
      for (int j = 0; j < V; ++j) part[k * D + i + j] = acc[k * D + i + j];
}

// Backward for rows that fit in registers (16-byte accesses, at most kRowsBwdMaxFloats per lane and
// array): one block per task as fused_norm_backward, but each warp takes whole rows of the task
// (rows n0 + w, n0 + w + W, ...) with the row in registers, the row reductions as warp shuffles and
// every load of a row issued before the first of them. The H200 run of fused_norm_backward
// (2026-11-30: 4–41 % of copy bandwidth) had one block of ~3 warps per SM walking its task's 16 rows
// one after the other, each row waiting on a load and two barriers. Per-sample / global gradients are
// summed per warp in its own shared-memory slab [np][D] (each lane touches only its own columns), and
// the slabs are added in warp order at the end: the partial sums stay deterministic. Same arithmetic as
// fused_norm_backward op for op; only the order of the partial sums differs. Not yet run on a GPU
// (emulation-tested; written after the H200 run).
template <class T, int V, int NV>
__global__ void fused_norm_backward_rows(BwdParams p) {
  RAEKERN_DYNAMIC_SHARED(float, smem);
  const int lane = int(threadIdx.x) % simt::kWarp, warp = int(threadIdx.x) / simt::kWarp;
  const int warps = int(blockDim.x) / simt::kWarp;
  const int64_t D = p.D, np = p.num_partials;
  const int64_t t = blockIdx.x;
  const int64_t b = t / p.chunks, n0 = (t % p.chunks) * p.rows_per_task;
  const int64_t n1 = n0 + p.rows_per_task < p.N ? n0 + p.rows_per_task : p.N;
  const bool residual = p.gate.ptr != nullptr;
  const bool norm = p.kind != Kind::None && p.dout.ptr != nullptr;
  const float inv_d = 1.f / float(D);
  float* acc = smem + int64_t(warp) * np * D;  // this warp's slab
  const BwdAcc sums = bwd_acc(p, acc);
  for (int64_t k = 0; k < np; ++k)
#pragma unroll
    for (int c = 0; c < NV; ++c) {
      const int64_t i = lane_column<V>(lane, c);
      if (i < D)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[k * D + i + j] = 0.f;
    }

  for (int64_t n = n0 + warp; n < n1; n += warps) {
    const int64_t row = b * p.N + n;
    float xh[NV][V], gs[NV][V];  // x̂ and d x̂ · weight, kept for the second stage
    float c1 = 0.f, c2 = 0.f, rstd = 0.f;
    if (norm) {
      rstd = static_cast<const float*>(p.rstd)[row];
      const float mean = p.kind == Kind::Layer ? static_cast<const float*>(p.mean)[row] : 0.f;
      const T* xin = row_ptr<T>(p.xin, b, n);
      const T* dout = row_ptr<T>(p.dout, b, n);
      const T* scale = p.scale.ptr ? row_ptr<T>(p.scale, b, n) : nullptr;
      float go[NV][V];
#pragma unroll
      for (int c = 0; c < NV; ++c) {  // all loads first
        const int64_t i = lane_column<V>(lane, c);
        if (i < D) {
          load<T, V>(xin, i, 1, xh[c]);
          load<T, V>(dout, i, 1, go[c]);
        } else {
          fill(xh[c], 0.f);
          fill(go[c], 0.f);
        }
      }
      float s1 = 0.f, s2 = 0.f;
#pragma unroll
      for (int c = 0; c < NV; ++c) {
        const int64_t i = lane_column<V>(lane, c);
        if (i < D) backward_first<T, V>(p, row, i, scale, mean, rstd, xh[c], go[c], sums, xh[c], gs[c], s1, s2);
        else fill(gs[c], 0.f);
      }
      s1 = simt::warp_sum(s1);
      s2 = simt::warp_sum(s2);
      c1 = p.kind == Kind::Layer ? s1 * inv_d : 0.f;
      c2 = s2 * inv_d;
    } else if (p.kind != Kind::None) {  // no gradient reached `out`
#pragma unroll
      for (int c = 0; c < NV; ++c)
        if (lane_column<V>(lane, c) < D) backward_zero_modulation<T, V>(p, row, lane_column<V>(lane, c));
    }
    const T* dxo = p.dxo.ptr ? row_ptr<T>(p.dxo, b, n) : nullptr;
    const T* gate = residual ? row_ptr<T>(p.gate, b, n) : nullptr;
    const T* y = residual ? row_ptr<T>(p.y, b, n) : nullptr;
#pragma unroll
    for (int c = 0; c < NV; ++c) {
      const int64_t i = lane_column<V>(lane, c);
      if (i < D) backward_second<T, V>(p, row, i, dxo, gate, y, norm, rstd, c1, c2, xh[c], gs[c], sums);
    }
  }
  if (np == 0) return;
  __syncthreads();  // every warp's slab is complete
  float* part = static_cast<float*>(p.partials) + t * np * D;
  for (int64_t e = threadIdx.x; e < np * D; e += blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < warps; ++k) s += smem[int64_t(k) * np * D + e];
    part[e] = s;
  }
}

// f(kernel): the fused_norm_backward_rows instance for `nv` vectors per lane (norm_launch.h's
// kRowsNv buckets up to kRowsBwdMaxFloats floats per lane).
template <class T, int V, class F>
void with_rows_backward_kernel(int nv, F&& f) {
  auto g = [&](auto c) { f(&fused_norm_backward_rows<T, V, decltype(c)::value>); };
  if constexpr (V <= 4) with_constant<1, 2, 3, 4, 5, 6, 8, 12>(nv, g);
  else with_constant<1, 2, 3, 4, 5, 6>(nv, g);
}

}  // namespace raekern::norm::cuda
