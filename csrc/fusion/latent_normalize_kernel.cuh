// SIMT kernel of latent_normalize / latent_denormalize and their backwards: a 32×32 shared-memory
// tile transpose between tokens [B, N, D] and channels-first [B, D, N] with the per-element affine
// map of the dataset statistics applied where the statistics are read contiguously.
// Ran on an H200 (2026-11-30) as single-element 32×32 tiles: GPU tests pass; timings in
// benchmarks/results/2026-11-30-h200.txt. The 16-bit pair tiles (P = 2) have not run on a GPU.
#pragma once
#include "common/simt.cuh"

namespace raekern::fusion::cuda {

constexpr int kTileDim = 32;
constexpr int kTileRows = 8;

struct LatentArgs {
  const void* in;
  int64_t sb, sd, sh, sw;  // input strides; token n sits at (n / W)·sh + (n % W)·sw
  int64_t W, N, D;
  const float* mean;  // [D, N] or null
  const float* var;   // [D, N]
  float eps;
  bool inverse;  // scale = rsqrt(var + eps) (normalize) or sqrt(var + eps) (denormalize)
};

// v·rsqrt(v) instead of sqrtf, and 32-bit token division (the launcher checks N < 2^31): IEEE sqrtf's
// slow path and 64-bit division are called routines whose saved registers ptxas reports as spills.
// v = var + eps > 0, so v·rsqrt(v) is within 2 ulp of sqrt(v).
__device__ __forceinline__ float latent_scale(const LatentArgs& a, int64_t dn) {
  const float v = a.var[dn] + a.eps;
  const float r = rsqrtf(v);
  return a.inverse ? r : v * r;
}

// Offset of token n (n < N < 2^31) of channel d in the input.
__device__ __forceinline__ int64_t latent_offset(const LatentArgs& a, int64_t n, int64_t d) {
  const int nn = int(n), w = int(a.W);
  return int64_t(nn / w) * a.sh + int64_t(nn % w) * a.sw + d * a.sd;
}

// kToCF: tokens → [B, D, N], out = (in − mean)·scale. Otherwise [B, D, N] → tokens,
// out = in·scale + mean. Tiles of 32·P × 32·P elements, each thread moving P adjacent elements per
// access: P = 2 for 16-bit types (a warp moves 128 bytes per row, where 2-byte accesses moved 64;
// the launcher checks the pairs are adjacent and 4-byte aligned), P = 1 otherwise.
// grid = (ceil(N / (32·P)), ceil(D / (32·P)), B), block = (32, 8).
template <class T, bool kToCF, int P = 1>
__global__ void __launch_bounds__(kTileDim * kTileRows) latent_transpose_kernel(LatentArgs a, T* __restrict__ out) {
  static_assert(P == 1 || P == 2, "one or two elements per access");
  constexpr int TD = kTileDim * P;
  __shared__ float tile[TD][TD + 1];
  const int64_t b = blockIdx.z;
  const int64_t n0 = int64_t(blockIdx.x) * TD, d0 = int64_t(blockIdx.y) * TD;
  const T* in = static_cast<const T*>(a.in) + b * a.sb;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int r = ty; r < TD; r += kTileRows) {
    if (kToCF) {  // tile[token r][channels P·tx ..], reads contiguous in D
      const int64_t n = n0 + r, d = d0 + P * tx;
      if (n < a.N && d < a.D) {
        float v[P];
        if constexpr (P == 1) v[0] = simt::to_float(in[latent_offset(a, n, d)]);
        else simt::load_vec<T, P>(in + latent_offset(a, n, d), v);
#pragma unroll
        for (int k = 0; k < P; ++k) tile[r][P * tx + k] = v[k];
      }
    } else {  // tile[channel r][tokens P·tx ..], reads contiguous in N, statistics too
      const int64_t d = d0 + r, n = n0 + P * tx;
      if (n < a.N && d < a.D) {
        const int64_t dn = d * a.N + n;
        float v[P];
        if constexpr (P == 1) v[0] = simt::to_float(in[latent_offset(a, n, d)]);
        else simt::load_vec<T, P>(in + latent_offset(a, n, d), v);
#pragma unroll
        for (int k = 0; k < P; ++k) {
          float x = v[k] * latent_scale(a, dn + k);
          if (a.mean) x += a.mean[dn + k];
          tile[r][P * tx + k] = x;
        }
      }
    }
  }
  __syncthreads();
  for (int r = ty; r < TD; r += kTileRows) {
    if (kToCF) {  // out[b, d0 + r, n0 + P·tx ..]
      const int64_t d = d0 + r, n = n0 + P * tx;
      if (n < a.N && d < a.D) {
        const int64_t dn = d * a.N + n;
        float v[P];
#pragma unroll
        for (int k = 0; k < P; ++k) {
          float x = tile[P * tx + k][r];
          if (a.mean) x -= a.mean[dn + k];
          v[k] = x * latent_scale(a, dn + k);
        }
        T* o = out + (b * a.D + d) * a.N + n;
        if constexpr (P == 1) *o = simt::from_float<T>(v[0]);
        else simt::store_vec<T, P>(o, v);
      }
    } else {  // out[b, n0 + r, d0 + P·tx ..]
      const int64_t n = n0 + r, d = d0 + P * tx;
      if (n < a.N && d < a.D) {
        float v[P];
#pragma unroll
        for (int k = 0; k < P; ++k) v[k] = tile[P * tx + k][r];
        T* o = out + (b * a.N + n) * a.D + d;
        if constexpr (P == 1) *o = simt::from_float<T>(v[0]);
        else simt::store_vec<T, P>(o, v);
      }
    }
  }
}

}  // namespace raekern::fusion::cuda
