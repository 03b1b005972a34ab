// Device code of raekern::gfcg_select: one block per classifier row (softmax statistics in fp32,
// argmax over the non-target classes with ties to the lowest index).
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#pragma once
#include "common/simt.cuh"
#include "guidance/gfcg_select.h"

namespace raekern::guidance::cuda {

constexpr int kSelectThreads = 256;

// ---- gfcg_select: one block per row --------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kSelectThreads) gfcg_select_kernel(const T* __restrict__ logits,
                                                               const long long* __restrict__ target,
                                                               int64_t C, float w_max, float kappa, float w_min,
                                                               long long* ref, float* weight, float* p_target,
                                                               float* p_ref) {
  __shared__ float red[2 * simt::kWarp];
  __shared__ long long red_i[simt::kWarp];
  const int64_t b = blockIdx.x;
  const T* row = logits + b * C;
  const long long tg = target[b];
  const bool valid = tg >= 0 && tg < C;
  float mx = -INFINITY, best = -INFINITY;
  long long best_i = C;
  bool nan = false;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = simt::to_float(row[c]);
    mx = fmaxf(mx, v);
    nan = nan || isnan(v);
    if (c != tg && (v > best || (v == best && c < best_i))) {
      best = v;
      best_i = c;
    }
  }
  // Every thread reaches this barrier; a row whose probabilities are undefined (a NaN logit, or a
  // largest logit of ±inf, checked below) keeps the first non-target class, as the CPU kernel and the
  // reference's argmax over all-NaN probabilities do (and never the out-of-range best_i = C).
  nan = __syncthreads_or(nan);
  // block max, and block argmax (ties -> lowest index)
  const int lane = threadIdx.x % simt::kWarp, warp = threadIdx.x / simt::kWarp;
  const int nwarps = blockDim.x / simt::kWarp;
  mx = simt::warp_max(mx);
#pragma unroll
  for (int o = simt::kWarp / 2; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(simt::kFullMask, best, o);
    const long long oi = __shfl_xor_sync(simt::kFullMask, best_i, o);
    if (ov > best || (ov == best && oi < best_i)) {
      best = ov;
      best_i = oi;
    }
  }
  if (lane == 0) {
    red[warp] = mx;
    red[simt::kWarp + warp] = best;
    red_i[warp] = best_i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nwarps; ++w) {
      mx = fmaxf(mx, red[w]);
      const float ov = red[simt::kWarp + w];
      const long long oi = red_i[w];
      if (ov > best || (ov == best && oi < best_i)) {
        best = ov;
        best_i = oi;
      }
    }
    red[0] = mx;
  }
  __syncthreads();
  mx = red[0];
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += __expf(simt::to_float(row[c]) - mx);
  s = simt::block_sum(s, red + simt::kWarp);
  if (threadIdx.x == 0) {
    if (!valid) {  // no host sync for validation: an invalid target yields ref = -1 and NaNs
      ref[b] = -1;
      weight[b] = p_target[b] = p_ref[b] = NAN;
      return;
    }
    if (nan || !isfinite(mx)) {
      best_i = tg == 0 ? 1 : 0;
      best = simt::to_float(row[best_i]);
    }
    const float pt = __expf(simt::to_float(row[tg]) - mx) / s;
    const float pr = __expf(best - mx) / s;
    ref[b] = best_i;
    p_target[b] = pt;
    p_ref[b] = pr;
    weight[b] = gfcg_weight(pt, pr, w_max, kappa, w_min);
  }
}

}  // namespace raekern::guidance::cuda
