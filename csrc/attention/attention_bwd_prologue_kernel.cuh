// Row kernels of the CUDA attention backward (SIMT, one warp per token row, lane l owning head-dim
// columns l + 32·j): the preprocess (q̂ = rope(norm(q)), k̂ likewise, into fp32 scratch with the
// rows' 1/rms, and Δ = rowsum(dO∘O) − dlse), the prologue backward (dq̂/dk̂ back through RoPE and
// RMSNorm to dq/dk, per-block partial norm-weight gradients) and the ordered reduction of those
// partials. Includes only common/simt.cuh (via the prologue header), so the host emulation runs it.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#pragma once
#include "attention/attention_bwd_config.h"
#include "attention/attention_prologue_kernel.cuh"
#include "common/simt.cuh"

namespace raekern::attention::bwd {

// The key blocks of this mainloop CTA (grid.x = ceil(key blocks / key_blocks_per_cta)) with its dQ̂
// slab: f(kb, slab, accumulate) in order, accumulate = false for the CTA's first block (plain stores).
template <int BlockN, class F>
__device__ __forceinline__ void for_each_key_block(const BwdParams& p, F&& f) {
  const int n_kblocks = (p.Nk + BlockN - 1) / BlockN;
  float* slab = p.dqh + (p.deterministic ? int64_t(blockIdx.x) * p.slab_stride : 0);
  for (int i = 0; i < p.key_blocks_per_cta; ++i) {
    const int kb = blockIdx.x * p.key_blocks_per_cta + i;
    if (kb >= n_kblocks) break;  // uniform over the block
    f(kb, slab, i > 0);
  }
}

// Rows of kind `is_k` (blockIdx.y): (b, h, n) in that order, n fastest.
struct RowKind {
  const void* src;
  int64_t sb, sn, sh;
  const float* w;
  float* rstd;
  int N;
};
__device__ __forceinline__ RowKind row_kind(const BwdParams& p, bool is_k) {
  if (is_k) return {p.k, p.k_sb, p.k_sn, p.k_sh, p.k_norm, p.rstd_k, p.Nk};
  return {p.q, p.q_sb, p.q_sn, p.q_sh, p.q_norm, p.rstd_q, p.Nq};
}

// RoPE on one row held as x[j] = column lane + 32·j; sign = +1 rotates (forward), -1 applies the
// transpose (backward). Pairs (2p, 2p+1) sit on lanes (2i, 2i+1), so the partner is one xor-shuffle
// away; every lane of the warp must call this (the shuffles span the full warp).
template <int kCols>
__device__ __forceinline__ void rope_row(float (&x)[kCols], int lane, int D, int token, const BwdParams& p,
                                         float sign) {
  const int h2 = D / 2, npair = D / 4;
  const int64_t row_base = int64_t(token / p.rope_w) * npair;
  const int64_t col_base = int64_t(p.rope_h + token % p.rope_w) * npair;
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int c = lane + 32 * j;
    const float partner = __shfl_xor_sync(simt::kFullMask, x[j], 1);
    if (c < D) {
      const int half = c >= h2;
      const int64_t t = (half ? col_base : row_base) + (c - half * h2) / 2;
      const float cs = p.rope_cos[t], sn = sign * p.rope_sin[t];
      // Forward pair update: a' = a·cos − b·sin, b' = b·cos + a·sin.
      x[j] = (c & 1) ? x[j] * cs + partner * sn : x[j] * cs - partner * sn;
    }
  }
}

template <class T, int kCols>
__device__ __forceinline__ void load_row(float (&x)[kCols], const T* __restrict__ src, int lane, int D) {
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int c = lane + 32 * j;
    x[j] = c < D ? simt::to_float(src[c]) : 0.f;
  }
}

// Grid (blocks, 2): y = 0 query rows (and Δ), y = 1 key rows; grid-stride over rows by warps.
template <class T, int kCols>
__global__ void __launch_bounds__(kRowThreads) attention_bwd_preprocess_kernel(const BwdParams p) {
  const bool is_k = blockIdx.y == 1;
  const RowKind rk = row_kind(p, is_k);
  const int D = p.D, lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.B) * p.H * rk.N;
  const int64_t step = int64_t(gridDim.x) * kRowWarps;
  float* dst_base = is_k ? p.kh : p.qh;
  const bool rope = p.rope_h > 0;
  for (int64_t row = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / 32; row < rows; row += step) {
    const int n = int(row % rk.N);
    const int64_t bh = row / rk.N;
    const int h = int(bh % p.H), b = int(bh / p.H);
    const T* src = static_cast<const T*>(rk.src) + b * rk.sb + n * rk.sn + h * rk.sh;
    float x[kCols];
    load_row<T, kCols>(x, src, lane, D);
    if (rk.w) {
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < kCols; ++j) ss += x[j] * x[j];
      const float r = simt_dev::rms_rstd(simt::warp_sum(ss), D, p.eps);
      if (lane == 0) rk.rstd[row] = r;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int c = lane + 32 * j;
        x[j] *= r * (c < D ? rk.w[c] : 0.f);
      }
    }
    if (rope && n < p.rope_h * p.rope_w) rope_row<kCols>(x, lane, D, n, p, 1.f);
    float* dst = dst_base + row * D;
#pragma unroll
    for (int j = 0; j < kCols; ++j)
      if (lane + 32 * j < D) dst[lane + 32 * j] = x[j];
    if (void* d16 = is_k ? p.kh16 : p.qh16) {  // the tensor-core mainloop's copy, rounded as the forward's
      T* dst16 = static_cast<T*>(d16) + row * D;
#pragma unroll
      for (int j = 0; j < kCols; ++j)
        if (lane + 32 * j < D) dst16[lane + 32 * j] = simt::from_float<T>(x[j]);
    }
    if (!is_k) {
      const T* g = static_cast<const T*>(p.dout) + b * p.do_sb + n * p.do_sn + h * p.do_sh;
      const T* o = static_cast<const T*>(p.out) + b * p.o_sb + n * p.o_sn + h * p.o_sh;
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int c = lane + 32 * j;
        if (c < D) acc += simt::to_float(g[c]) * simt::to_float(o[c]);
      }
      acc = simt::warp_sum(acc);
      // dL/dlse_i adds P_ij·dlse_i to dS_ij: the same as subtracting it from Δ_i.
      if (lane == 0) p.delta[row] = acc - (p.dlse ? p.dlse[row] : 0.f);
    }
  }
}

// Grid (dw_blocks, 2): block x of kind y owns rows [x·rows_per_block, (x+1)·rows_per_block), its
// warps take them round-robin; the norm-weight gradient is reduced lane → warp (register, in row
// order) → block (shared memory, in warp order) → dw_part[y][x], so it is bit-identical run to run.
// Dynamic shared memory: kRowWarps × D floats when the kind has a norm weight.
template <class T, int kCols>
__global__ void __launch_bounds__(kRowThreads) attention_bwd_prologue_backward_kernel(const BwdParams p) {
  RAEKERN_DYNAMIC_SHARED(float, sdw);
  const bool is_k = blockIdx.y == 1;
  const RowKind rk = row_kind(p, is_k);
  const int D = p.D, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t rows = int64_t(p.B) * p.H * rk.N;
  const int64_t per_block = is_k ? p.dw_rows_k : p.dw_rows_q;
  const int64_t r0 = int64_t(blockIdx.x) * per_block;
  const int64_t r1 = r0 + per_block < rows ? r0 + per_block : rows;
  const bool rope = p.rope_h > 0;
  const int slabs = is_k ? 1 : p.num_slabs;
  const float* grad = is_k ? p.dkh : p.dqh;
  T* dst_base = static_cast<T*>(is_k ? p.dk : p.dq);
  const int64_t dsb = is_k ? p.dk_sb : p.dq_sb, dsn = is_k ? p.dk_sn : p.dq_sn, dsh = is_k ? p.dk_sh : p.dq_sh;
  float dw[kCols];
#pragma unroll
  for (int j = 0; j < kCols; ++j) dw[j] = 0.f;
  for (int64_t row = r0 + warp; row < r1; row += kRowWarps) {
    const int n = int(row % rk.N);
    const int64_t bh = row / rk.N;
    const int h = int(bh % p.H), b = int(bh / p.H);
    float g[kCols];
#pragma unroll
    for (int j = 0; j < kCols; ++j) g[j] = 0.f;
    // Deterministic mode: the key blocks' partial dq̂ slabs, summed in slab order.
    for (int s = 0; s < slabs; ++s) {
      const float* src = grad + s * p.slab_stride + row * D;
#pragma unroll
      for (int j = 0; j < kCols; ++j)
        if (lane + 32 * j < D) g[j] += src[lane + 32 * j];
    }
    if (rope && n < p.rope_h * p.rope_w) rope_row<kCols>(g, lane, D, n, p, -1.f);
    if (rk.w) {
      // y = x·r·w with r = (mean(x²) + eps)^-½:  dx = r·w·g − r³·(Σ g·w·x)/D · x,  dw += g·x·r.
      float x[kCols];
      load_row<T, kCols>(x, static_cast<const T*>(rk.src) + b * rk.sb + n * rk.sn + h * rk.sh, lane, D);
      const float r = rk.rstd[row];
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int c = lane + 32 * j;
        dot += c < D ? g[j] * rk.w[c] * x[j] : 0.f;
      }
      const float kx = r * r * r * simt::warp_sum(dot) / float(D);
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int c = lane + 32 * j;
        const float wc = c < D ? rk.w[c] : 0.f;
        dw[j] += g[j] * x[j] * r;
        g[j] = r * wc * g[j] - kx * x[j];
      }
    }
    T* dst = dst_base + b * dsb + n * dsn + h * dsh;
#pragma unroll
    for (int j = 0; j < kCols; ++j)
      if (lane + 32 * j < D) dst[lane + 32 * j] = simt::from_float<T>(g[j]);
  }
  if (rk.w) {  // uniform over the block (blockIdx.y)
#pragma unroll
    for (int j = 0; j < kCols; ++j)
      if (lane + 32 * j < D) sdw[warp * D + lane + 32 * j] = dw[j];
    __syncthreads();
    float* part = p.dw_part + (int64_t(blockIdx.y) * p.dw_blocks + blockIdx.x) * D;
    for (int c = threadIdx.x; c < D; c += kRowThreads) {
      float acc = 0.f;
      for (int w = 0; w < kRowWarps; ++w) acc += sdw[w * D + c];
      part[c] = acc;
    }
  }
}

// dw[y][c] = Σ over blocks of dw_part[y][block][c] in a fixed order. Grid (ceil(D/32), 2), 256
// threads: kStreams = 8 strided streams of blocks per column, then the streams in order.
template <int kStreams>
__global__ void __launch_bounds__(256) attention_bwd_dw_reduce_kernel(const BwdParams p) {
  static_assert(kStreams * 32 == 256, "one warp per stream");
  __shared__ float part[kStreams][33];
  const int y = blockIdx.y;
  if (!(y ? p.k_norm : p.q_norm)) return;  // uniform over the block
  const int cx = threadIdx.x % 32, stream = threadIdx.x / 32, c = blockIdx.x * 32 + cx;
  float acc = 0.f;
  if (c < p.D)
    for (int blk = stream; blk < p.dw_blocks; blk += kStreams) acc += p.dw_part[(int64_t(y) * p.dw_blocks + blk) * p.D + c];
  part[stream][cx] = acc;
  __syncthreads();
  if (stream == 0 && c < p.D) {
    float s = 0.f;
    for (int i = 0; i < kStreams; ++i) s += part[i][cx];
    p.dw[y * p.D + c] = s;
  }
}

}  // namespace raekern::attention::bwd
