// SIMT pieces of the CUDA attention kernels that carry no tensor-core code: the QK-norm + 2-D RoPE
// prologue applied to a tile row in shared memory, and the softmax epilogue of one output row.
// Includes only common/simt.cuh, so the host emulation (common/host_emulation.h) can run the same
// source on the CPU.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#pragma once
#include "common/simt.cuh"

namespace raekern::attention::simt_dev {

// The RoPE angle of pair p of a half (h2 = Dh/2 channels) at grid position pos: θ^(-2p/(Dh/2))·pos.
// Angles reach ~grid size radians, so the accurate sincosf is used. (The backward's row kernels read
// an fp64-computed cos/sin table instead: see BwdParams::rope_cos.)
__device__ __forceinline__ void rope_sincos(int pos, int p, int h2, float log2_theta, float* sn, float* cs) {
  const float ang = float(pos) * exp2f(-float(2 * p) / float(h2) * log2_theta);
  sincosf(ang, sn, cs);
}

// A tensor-core tile config's head dim: its compile-time kHeadDim for an exact config, the run-time
// one (`runtime_d`) for a bucket config.
template <class Cfg> __device__ __forceinline__ int config_head_dim(int runtime_d) {
  if constexpr (Cfg::kExact) return Cfg::kHeadDim;
  else return runtime_d;
}

// QK-norm's 1/rms from the row's sum of squares (the forward prologue and the backward's preprocess).
__device__ __forceinline__ float rms_rstd(float sumsq, int D, float eps) { return rsqrtf(sumsq / float(D) + eps); }

// Two adjacent lanes own one row of Dh elements: lane parity `half` selects the half of the head
// dim this thread normalises and rotates (RAE's RoPE rotates the first half by the grid row and the
// second by the grid column, so each thread needs only one position). Both lanes of every pair must
// call this (the RMS statistic is combined with one shuffle). Reads `src`, writes `dst` (the same
// row for in place; nullptr: compute without storing, for a pair with no row of its own).
// `w` == nullptr: no QK-norm; rope == false: no rotation (token past the grid, or RoPE off).
template <class T>
__device__ __forceinline__ void qk_prologue_half_row(const T* __restrict__ src, T* dst, int D, int half,
                                                     const float* __restrict__ w, float eps, bool rope,
                                                     int pos, float log2_theta) {
  const int h2 = D / 2;
  const T* x = src + half * h2;
  T* y = dst ? dst + half * h2 : nullptr;
  float ss = 0.f;
  if (w) {
    for (int i = 0; i < h2; ++i) {
      const float a = simt::to_float(x[i]);
      ss += a * a;
    }
  }
  ss += __shfl_xor_sync(simt::kFullMask, ss, 1);
  const float r = w ? rms_rstd(ss, D, eps) : 1.f;
  const float* wh = w ? w + half * h2 : nullptr;
  for (int p = 0; p < h2 / 2; ++p) {
    float a = simt::to_float(x[2 * p]), c = simt::to_float(x[2 * p + 1]);
    if (wh) {
      a *= r * wh[2 * p];
      c *= r * wh[2 * p + 1];
    }
    if (rope) {
      float sn, cs;
      rope_sincos(pos, p, h2, log2_theta, &sn, &cs);
      const float a2 = a * cs - c * sn;
      c = c * cs + a * sn;
      a = a2;
    }
    if (y) {
      y[2 * p] = simt::from_float<T>(a);
      y[2 * p + 1] = simt::from_float<T>(c);
    }
  }
}

template <class T>
__device__ __forceinline__ void qk_prologue_half_row(T* __restrict__ row, int D, int half, const float* __restrict__ w,
                                                     float eps, bool rope, int pos, float log2_theta) {
  qk_prologue_half_row<T>(row, row, D, half, w, eps, rope, pos, log2_theta);
}

// k̂ = rope(norm(k)) for every key row, once, into a contiguous [B, H, Nk, D] buffer: the forward's
// mainloop then streams k̂ as it is (applying the prologue per K tile would repeat it in every one
// of the Nq / 64 CTAs that read the tile). Block = 64 threads = 32 rows of one sample (grid.y =
// batch), two lanes per row; k's strides in elements.
template <class T>
__global__ void __launch_bounds__(64) k_prologue_kernel(const T* __restrict__ k, int64_t sb, int64_t sn, int64_t sh,
                                                        T* __restrict__ out, int H, int Nk, int D,
                                                        const float* __restrict__ w, float eps, int rope_h,
                                                        int rope_w, float log2_theta) {
  const int64_t row = int64_t(blockIdx.x) * 32 + threadIdx.x / 2;
  const int half = threadIdx.x & 1;
  const bool mine = row < int64_t(H) * Nk;  // rows of sample blockIdx.y
  const int64_t r = mine ? row : 0;        // a pair past the end recomputes row 0 without storing it
  const int n = int(r % Nk), h = int(r / Nk), b = int(blockIdx.y);
  const bool rope = rope_h > 0 && n < rope_h * rope_w;
  const int pos = rope ? (half ? n % rope_w : n / rope_w) : 0;
  const T* src = k + b * sb + int64_t(n) * sn + int64_t(h) * sh;
  T* dst = mine ? out + ((int64_t(b) * H + h) * Nk + n) * D : nullptr;
  qk_prologue_half_row<T>(src, dst, D, half, w, eps, rope, pos, log2_theta);
}

// Softmax epilogue for one query row: 1/l scaling factor and the natural-log log-sum-exp from the
// running max m (log2 units) and sum l. A row that saw no key (l == 0) yields 0 and -inf; a NaN sum
// (a NaN score) stays NaN in both, as on the CPU.
struct RowFinal {
  float inv_l, lse;
};
__device__ __forceinline__ RowFinal softmax_finalize(float m, float l) {
  if (l == 0.f) return {0.f, -INFINITY};
  return {1.f / l, (m + __log2f(l)) * 0.6931471805599453f};
}

}  // namespace raekern::attention::simt_dev
