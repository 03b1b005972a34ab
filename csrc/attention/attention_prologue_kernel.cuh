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
// of the Nq / 64 CTAs that read the tile). One warp per row, lane l owning the (2P, 2P+1) pairs
// P = l, l + 32, ... of the row (D ≤ 256: at most 4), so a warp's loads and stores of a row are
// contiguous; the two-lanes-per-row layout of qk_prologue_half_row, used here before the H200 run,
// read one element per lane per instruction from 16 different rows. Same arithmetic as
// qk_prologue_half_row except the order of the sum of squares. Block = 4 warps (rows) of one sample
// (grid.y = batch), grid-stride over the sample's H·Nk rows; k's strides in elements.
constexpr int kKPrologueWarps = 4;
template <class T>
__global__ void __launch_bounds__(kKPrologueWarps * 32) k_prologue_kernel(
    const T* __restrict__ k, int64_t sb, int64_t sn, int64_t sh, T* __restrict__ out, int H, int Nk, int D,
    const float* __restrict__ w, float eps, int rope_h, int rope_w, float log2_theta) {
  const int lane = int(threadIdx.x) % simt::kWarp, b = int(blockIdx.y);
  const int h2 = D / 2, quarter = D / 4;  // RoPE: pairs [0, D/4) by the grid row, [D/4, D/2) by the column
  const int64_t rows = int64_t(H) * Nk;
  for (int64_t row = int64_t(blockIdx.x) * kKPrologueWarps + int64_t(threadIdx.x) / simt::kWarp; row < rows;
       row += int64_t(gridDim.x) * kKPrologueWarps) {
    const int n = int(row % Nk), h = int(row / Nk);
    const T* src = k + b * sb + int64_t(n) * sn + int64_t(h) * sh;
    T* dst = out + ((int64_t(b) * H + h) * Nk + n) * D;
    float a[4], c[4], ss = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int P = lane + simt::kWarp * i;
      a[i] = P < h2 ? simt::to_float(src[2 * P]) : 0.f;
      c[i] = P < h2 ? simt::to_float(src[2 * P + 1]) : 0.f;
      ss += a[i] * a[i] + c[i] * c[i];
    }
    const float r = w ? rms_rstd(simt::warp_sum(ss), D, eps) : 1.f;
    const bool rope = rope_h > 0 && n < rope_h * rope_w;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int P = lane + simt::kWarp * i;
      if (P >= h2) continue;
      float x = a[i], y = c[i];
      if (w) {
        x *= r * w[2 * P];
        y *= r * w[2 * P + 1];
      }
      if (rope) {
        const bool second = P >= quarter;
        float sn_, cs;
        rope_sincos(second ? n % rope_w : n / rope_w, second ? P - quarter : P, h2, log2_theta, &sn_, &cs);
        const float x2 = x * cs - y * sn_;
        y = y * cs + x * sn_;
        x = x2;
      }
      dst[2 * P] = simt::from_float<T>(x);
      dst[2 * P + 1] = simt::from_float<T>(y);
    }
  }
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
