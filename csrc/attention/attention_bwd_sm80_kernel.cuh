// Tensor-core mainloop of the CUDA attention backward (FlashAttention-2 order, mma.sync m16n8k16,
// bf16/fp16 in, fp32 accumulate), replacing the SIMT mainloop (attention_bwd_kernel.cuh) for
// bf16/fp16 at Dh ≤ 128 (multiples of 8: exact configs at 64/72/128, buckets 64/96/128 otherwise);
// the preprocess and prologue-backward kernels are shared.
// One CTA per (key block of 64, head, batch) keeps K̂ and V in shared memory and dK̂ / dV in
// registers (each warp 16 keys), and loops over blocks of 64 query rows:
//   each warp, for its 16 query rows:  S = q̂·k̂ᵀ, dP = dO·Vᵀ (64 keys),  P = exp2(S·scale·log2e − lse·log2e),
//                                      dS = scale·P∘(dP − Δ), both to shared memory;
//   each warp, for its 16 query rows: dQ̂ += dS·k̂ (atomics, or the CTA's slab);
//   each warp, for its 16 keys:       dV += Pᵀ·dO, dK̂ += dSᵀ·q̂.
// Every fragment comes from shared memory by ldmatrix (transposed where the operand is stored
// k-major). q̂ and k̂ are the preprocess's copies in the input dtype (the forward rounds them the
// same way); P and dS are rounded to it for the second products, as in FlashAttention-2.
// Also runs on the host emulation (tensor-core instructions emulated from their PTX definitions,
// common/tensor_core.cuh).
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#pragma once
#include <cstdint>

#include "attention/attention_bwd_config.h"
#include "attention/attention_bwd_prologue_kernel.cuh"
#include "common/simt.cuh"
#include "common/tensor_core.cuh"

namespace raekern::attention::bwd {

// rows_valid of 64 rows × D elements (row stride sn) into a tile of the config (row stride kLd).
template <class Cfg, class T>
__device__ __forceinline__ void tc_load_tile(T* dst, const T* src, int64_t sn, int rows_valid, int D) {
  tc::cp_async_rows<Cfg::kThreads>(dst, Cfg::kLd, src, sn, 64, rows_valid, D);
}

using tc::mma_frag_kn;
using tc::mma_rows_nk;

template <class Cfg, class T>
__device__ __forceinline__ void tc_key_block(const BwdParams& p, unsigned char* smem_raw, int kb, int b, int h,
                                             float* slab, bool accumulate) {
  constexpr int DP = Cfg::kHeadDimP, LD = Cfg::kLd, LP = Cfg::kLdP;
  const int D = simt_dev::config_head_dim<Cfg>(p.D);
  constexpr int BN = Cfg::kBlockN, BM = Cfg::kBlockM, NK = Cfg::kNTilesKey, ND = Cfg::kNTilesD;
  constexpr float kLog2e = 1.4426950408889634f;
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + 64 * LD;
  T* sQ0 = sV + 64 * LD;                 // [kQBufs][64][LD]
  T* sdO0 = sQ0 + Cfg::kQBufs * 64 * LD;  // [kQBufs][64][LD]
  T* sP = sdO0 + Cfg::kQBufs * 64 * LD;
  T* sdS = sP + BM * LP;
  float* sL0 = reinterpret_cast<float*>(sdS + BM * LP);  // [kQBufs][BM]
  float* sDelta0 = sL0 + Cfg::kQBufs * BM;               // [kQBufs][BM]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = int64_t(b) * p.H + h;
  const int n0 = kb * BN;
  const bool* mask = p.mask ? p.mask + b * p.mask_sb : nullptr;

  __syncthreads();  // the previous key block's readers of sK / sV are done
  tc_load_tile<Cfg, T>(sK, static_cast<const T*>(p.kh16) + (bh * p.Nk + n0) * D, D, min(BN, p.Nk - n0), D);
  tc_load_tile<Cfg, T>(sV, static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + int64_t(n0) * p.v_sn, p.v_sn,
                       min(BN, p.Nk - n0), D);
  tc::cp_async_commit();
  // Keys of this thread's S columns (n*8 + 2t + e): kept (in range and not masked) or not.
  uint32_t keep = 0;
#pragma unroll
  for (int n = 0; n < NK; ++n)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = n0 + n * 8 + 2 * t + e;
      if (col < p.Nk && (!mask || mask[int64_t(col) * p.mask_sn])) keep |= 1u << (2 * n + e);
    }

  float dv[ND][4], dk[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dv[n][e] = dk[n][e] = 0.f;

  // Query block m0 (its q̂ and dO rows, lse·log2e and Δ) into buffer `buf`, one cp.async group.
  auto stage = [&](int m0, int buf) {
    const int rows = min(BM, p.Nq - m0);
    tc_load_tile<Cfg, T>(sQ0 + buf * 64 * LD, static_cast<const T*>(p.qh16) + (bh * p.Nq + m0) * D, D, rows, D);
    tc_load_tile<Cfg, T>(sdO0 + buf * 64 * LD,
                         static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + int64_t(m0) * p.do_sn, p.do_sn,
                         rows, D);
    tc::cp_async_commit();
    if (tid < BM) {
      // P = exp2(S·scale·log2e − lse·log2e); a row past Nq or with no key (lse = -inf) gets P = 0.
      const float lse = tid < rows ? p.lse[bh * p.Nq + m0 + tid] : -INFINITY;
      sL0[buf * BM + tid] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      sDelta0[buf * BM + tid] = tid < rows ? p.delta[bh * p.Nq + m0 + tid] : 0.f;
    }
  };
  stage(0, 0);
  for (int m0 = 0, it = 0; m0 < p.Nq; m0 += BM, ++it) {
    const int buf = Cfg::kQBufs > 1 ? it & 1 : 0;
    // With two buffers the next block's loads fly while this one computes (its buffer was last read
    // in the previous step, before that step's closing barrier); with one, they wait for the end.
    if (Cfg::kQBufs > 1 && m0 + BM < p.Nq) {
      stage(m0 + BM, buf ^ 1);
      tc::cp_async_wait<1>();
    } else {
      tc::cp_async_wait<0>();
    }
    __syncthreads();
    if (mask && it == 0) {
      // Masked keys' K̂ and V rows to zero: dS is 0 in their columns, but 0·NaN in dQ = dS·K̂ (or in
      // dP = dO·Vᵀ) is NaN. Block-uniform; once per key block.
      tc::zero_masked_rows<Cfg::kThreads>(sK, sV, LD, BN, D, n0, p.Nk, mask, p.mask_sn);
      __syncthreads();
    }
    const T* sQ = sQ0 + buf * 64 * LD;
    const T* sdO = sdO0 + buf * 64 * LD;
    const float* sL = sL0 + buf * BM;
    const float* sDelta = sDelta0 + buf * BM;

    // S and dP for this warp's 16 query rows × 64 keys, in chunks of NKC key n-tiles (16 keys at
    // Dh = 128, where dK̂ and dV already hold 128 registers); P and dS to shared memory.
    const int r0 = warp * 16 + g;
    const float l0 = sL[r0], l1 = sL[r0 + 8], d0 = sDelta[r0], d1 = sDelta[r0 + 8];
    constexpr int NKC = ND > 9 ? NK / 4 : NK;
#pragma unroll
    for (int k0 = 0; k0 < NK; k0 += NKC) {
      float s[NKC][4], dp[NKC][4];
#pragma unroll
      for (int n = 0; n < NKC; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
      mma_rows_nk<DP / 16, NKC, T>(s, sQ + warp * 16 * LD, LD, sK + k0 * 8 * LD, LD, lane);
      mma_rows_nk<DP / 16, NKC, T>(dp, sdO + warp * 16 * LD, LD, sV + k0 * 8 * LD, LD, lane);
#pragma unroll
      for (int n = 0; n < NKC; ++n) {
        float pe[4], ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool kept = keep >> (2 * (k0 + n) + (e & 1)) & 1u;
          pe[e] = kept ? exp2f(__fmul_rn(s[n][e], p.scale_log2) - (e < 2 ? l0 : l1)) : 0.f;
          ds[e] = p.scale * pe[e] * (dp[n][e] - (e < 2 ? d0 : d1));
        }
        const int c = (k0 + n) * 8 + 2 * t;
        simt::store_u32(sP + r0 * LP + c, tc::Mma<T>::pack(pe[0], pe[1]));
        simt::store_u32(sP + (r0 + 8) * LP + c, tc::Mma<T>::pack(pe[2], pe[3]));
        simt::store_u32(sdS + r0 * LP + c, tc::Mma<T>::pack(ds[0], ds[1]));
        simt::store_u32(sdS + (r0 + 8) * LP + c, tc::Mma<T>::pack(ds[2], ds[3]));
      }
    }
    __syncthreads();  // P and dS complete

    // dQ̂ rows of this warp: dS·k̂ (A = its dS rows [query][key], B = K̂ stored [key][d]); at Dh = 128
    // half the output n-tiles at a time, so the accumulators fit beside dK̂ and dV.
    {
      constexpr int NC = ND > 9 ? ND / 2 : ND;
      static_assert(ND % NC == 0, "dQ chunks must tile the head dim");
      const T* ds_rows = sdS + (warp * 16 + (lane & 15)) * LP + (lane >> 4) * 8;
      float* dq_bh = slab + bh * p.Nq * D;
#pragma unroll
      for (int c0 = 0; c0 < ND; c0 += NC) {
        float dq[NC][4];
#pragma unroll
        for (int n = 0; n < NC; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < NK / 2; ++kk) {
          uint32_t af[4];
          tc::ldmatrix<4, false>(af, ds_rows + kk * 16);
          mma_frag_kn<NC, T>(dq, af, sK + kk * 16 * LD + c0 * 8, LD, lane);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int m = m0 + r0 + 8 * r;
          if (m >= p.Nq) continue;
          float* dst = dq_bh + int64_t(m) * D + c0 * 8 + 2 * t;
#pragma unroll
          for (int n = 0; n < NC; ++n) {
            if (!Cfg::kExact && (c0 + n) * 8 >= D) continue;  // a bucket's columns past the head dim
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float v = dq[n][2 * r + e];
              // Deterministic: this CTA owns its slab and the same thread updates the same element
              // in every key block it visits, so plain stores / read-modify-writes keep a fixed order.
              if (!p.deterministic) atomicAdd(dst + n * 8 + e, v);
              else if (accumulate) dst[n * 8 + e] += v;
              else dst[n * 8 + e] = v;
            }
          }
        }
      }
    }

    // dV and dK̂ for this warp's 16 keys: Pᵀ·dO and dSᵀ·q̂ over the 64 query rows. The A fragments are
    // the transposed [query][key] tiles: matrices (keys 0-7 | 8-15) × (queries 0-7 | 8-15).
    const int arow = (lane & 7) + (lane >> 4) * 8, acol = warp * 16 + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int ks = 0; ks < BM / 16; ++ks) {
      uint32_t pf[4], sf[4];
      tc::ldmatrix<4, true>(pf, sP + (ks * 16 + arow) * LP + acol);
      tc::ldmatrix<4, true>(sf, sdS + (ks * 16 + arow) * LP + acol);
      mma_frag_kn<ND, T>(dv, pf, sdO + ks * 16 * LD, LD, lane);
      mma_frag_kn<ND, T>(dk, sf, sQ + ks * 16 * LD, LD, lane);
    }
    __syncthreads();  // sP, sdS and this buffer are refilled next
    if (Cfg::kQBufs == 1 && m0 + BM < p.Nq) stage(m0 + BM, 0);
  }

  // dV in the output dtype and layout; dK̂ in fp32 for the prologue backward. Masked keys get 0.
  T* dvg = static_cast<T*>(p.dv) + b * p.dv_sb + h * p.dv_sh;
  float* dkh = p.dkh + bh * p.Nk * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int n = n0 + warp * 16 + g + 8 * r;
    if (n >= p.Nk) continue;
#pragma unroll
    for (int j = 0; j < ND; ++j) {
      if (!Cfg::kExact && j * 8 >= D) continue;
      const int c = j * 8 + 2 * t;
      simt::store_u32(dvg + int64_t(n) * p.dv_sn + c, tc::Mma<T>::pack(dv[j][2 * r], dv[j][2 * r + 1]));
      dkh[int64_t(n) * D + c] = dk[j][2 * r];
      dkh[int64_t(n) * D + c + 1] = dk[j][2 * r + 1];
    }
  }
}

// Grid (ceil(key blocks / key_blocks_per_cta), H, B); dynamic shared memory Cfg::kSmemBytes. The
// head-dim padding columns (Dh..kHeadDimP) of every tile are zeroed once: loads never write them.
template <class Cfg, class T>
__global__ void __launch_bounds__(Cfg::kThreads) attention_bwd_sm80_kernel(const BwdParams p) {
  RAEKERN_DYNAMIC_SHARED(unsigned char, smem);
  const int D = simt_dev::config_head_dim<Cfg>(p.D);
  if (Cfg::kHeadDimP > D) {
    const int pad = Cfg::kHeadDimP - D;
    T* tiles = reinterpret_cast<T*>(smem);
    for (int e = threadIdx.x; e < (2 + 2 * Cfg::kQBufs) * 64 * pad; e += Cfg::kThreads)
      tiles[(e / pad) * Cfg::kLd + D + e % pad] = simt::from_float<T>(0.f);
  }
  const int h = blockIdx.y, b = blockIdx.z;
  for_each_key_block<Cfg::kBlockN>(
      p, [&](int kb, float* slab, bool accumulate) { tc_key_block<Cfg, T>(p, smem, kb, b, h, slab, accumulate); });
}

}  // namespace raekern::attention::bwd
