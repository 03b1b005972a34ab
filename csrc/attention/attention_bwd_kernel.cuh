// SIMT mainloop of the CUDA attention backward (FlashAttention-2 order): one CTA per (key block,
// head, batch) keeps its K̂ and V tile in shared memory and dK̂ / dV in registers, and loops over
// query blocks: S = q̂·k̂ᵀ, P = exp(scale·S − lse) (masked keys → 0), dV += Pᵀ·dO, dP = dO·Vᵀ,
// dS = scale·P∘(dP − Δ), dK̂ += dSᵀ·q̂, and the block's dQ̂ = dS·k̂ goes to global memory: fp32
// atomicAdd into one accumulator, or (deterministic) into the CTA's own slab, summed later in slab
// order. All products accumulate in fp32 from the fp32 q̂/k̂ scratch; bf16/fp16/fp32 inputs.
// The general fallback (fp32, Dh > 128 or not a multiple of 8, unaligned rows); other bf16/fp16 calls take the
// tensor-core mainloop (attention_bwd_sm80_kernel.cuh), which shares the other backward kernels.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#pragma once
#include "attention/attention_bwd_config.h"
#include "attention/attention_bwd_prologue_kernel.cuh"
#include "common/simt.cuh"

namespace raekern::attention::bwd {

template <class Cfg, class T>
__device__ __forceinline__ void bwd_key_block(const BwdParams& p, float* smem, int kb, int b, int h, float* slab,
                                              bool accumulate) {
  constexpr int BN = Cfg::kBlockN, BM = Cfg::kBlockM, TR = Cfg::kTR, TC = Cfg::kTC, LS = Cfg::kLdS;
  constexpr int RKV = Cfg::kRowsKV, CD = Cfg::kColsD, RQ = Cfg::kRowsQ, CS = Cfg::kColsS;
  const int D = p.D, ld = Cfg::ld_of(D);
  float* sK = smem;
  float* sV = sK + BN * ld;
  float* sQ = sV + BN * ld;
  float* sdO = sQ + BM * ld;
  float* sP = sdO + BM * ld;
  float* sdS = sP + BM * LS;
  float* sKeep = sdS + BM * LS;
  float* sL = sKeep + BN;
  float* sDelta = sL + BM;
  const int tid = threadIdx.x, tr = tid / TC, tc = tid % TC;
  const int64_t bh = int64_t(b) * p.H + h;
  const int n0 = kb * BN;
  constexpr float kLog2e = 1.4426950408889634f;

  __syncthreads();  // the previous key block's readers of sK / sV are done
  {
    const float* kh = p.kh + (bh * p.Nk + n0) * D;
    const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + int64_t(n0) * p.v_sn;
    for (int e = tid; e < BN * D; e += Cfg::kThreads) {
      const int n = e / D, c = e % D;
      // Rows past the sequence and masked keys read as zero (never NaN · 0: padding may hold garbage).
      const int key = n0 + n;
      const bool ok = key < p.Nk && (!p.mask || p.mask[b * p.mask_sb + int64_t(key) * p.mask_sn]);
      sK[n * ld + c] = ok ? kh[int64_t(n) * D + c] : 0.f;
      sV[n * ld + c] = ok ? simt::to_float(vg[int64_t(n) * p.v_sn + c]) : 0.f;
    }
    for (int n = tid; n < BN; n += Cfg::kThreads) {
      const int key = n0 + n;
      const bool keep = key < p.Nk && (!p.mask || p.mask[b * p.mask_sb + int64_t(key) * p.mask_sn]);
      sKeep[n] = keep ? 1.f : 0.f;
    }
  }

  bool colok[CD];
#pragma unroll
  for (int j = 0; j < CD; ++j) colok[j] = tc + TC * j < D;
  float dk[RKV][CD], dv[RKV][CD];
#pragma unroll
  for (int i = 0; i < RKV; ++i)
#pragma unroll
    for (int j = 0; j < CD; ++j) dk[i][j] = dv[i][j] = 0.f;

  const float* qh_bh = p.qh + bh * p.Nq * D;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const float* lse_bh = p.lse + bh * p.Nq;
  const float* delta_bh = p.delta + bh * p.Nq;
  float* dq_bh = slab + bh * p.Nq * D;

  for (int m0 = 0; m0 < p.Nq; m0 += BM) {
    __syncthreads();  // K/V loads visible; the previous step's readers of sQ/sdO/sP/sdS are done
    for (int e = tid; e < BM * D; e += Cfg::kThreads) {
      const int m = e / D, c = e % D;
      const bool ok = m0 + m < p.Nq;
      sQ[m * ld + c] = ok ? qh_bh[int64_t(m0 + m) * D + c] : 0.f;
      sdO[m * ld + c] = ok ? simt::to_float(dog[int64_t(m0 + m) * p.do_sn + c]) : 0.f;
    }
    for (int m = tid; m < BM; m += Cfg::kThreads) {
      const bool ok = m0 + m < p.Nq;
      sL[m] = ok ? lse_bh[m0 + m] * kLog2e : 0.f;
      sDelta[m] = ok ? delta_bh[m0 + m] : 0.f;
    }
    __syncthreads();

    // S = q̂·k̂ᵀ and dP = dO·Vᵀ: rows tr + 16·i, keys tc + 16·j.
    float s[RQ][CS], dp[RQ][CS];
#pragma unroll
    for (int i = 0; i < RQ; ++i)
#pragma unroll
      for (int j = 0; j < CS; ++j) s[i][j] = dp[i][j] = 0.f;
#pragma unroll 2
    for (int c = 0; c < D; ++c) {
      float qv[RQ], gv[RQ], kv[CS], vv[CS];
#pragma unroll
      for (int i = 0; i < RQ; ++i) {
        qv[i] = sQ[(tr + TR * i) * ld + c];
        gv[i] = sdO[(tr + TR * i) * ld + c];
      }
#pragma unroll
      for (int j = 0; j < CS; ++j) {
        kv[j] = sK[(tc + TC * j) * ld + c];
        vv[j] = sV[(tc + TC * j) * ld + c];
      }
#pragma unroll
      for (int i = 0; i < RQ; ++i)
#pragma unroll
        for (int j = 0; j < CS; ++j) {
          s[i][j] = fmaf(qv[i], kv[j], s[i][j]);
          dp[i][j] = fmaf(gv[i], vv[j], dp[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < RQ; ++i) {
      const int m = tr + TR * i;
      const bool row_ok = m0 + m < p.Nq;
#pragma unroll
      for (int j = 0; j < CS; ++j) {
        const int n = tc + TC * j;
        // A select, not a product: a batch with every key masked has lse = -inf.
        const float pe = row_ok && sKeep[n] != 0.f ? exp2f(__fmul_rn(s[i][j], p.scale_log2) - sL[m]) : 0.f;
        sP[m * LS + n] = pe;
        sdS[m * LS + n] = pe * (dp[i][j] - sDelta[m]) * p.scale;
      }
    }
    __syncthreads();

    // dV += Pᵀ·dO, dK̂ += dSᵀ·q̂: key rows tr + 16·i, head-dim columns tc + 16·j.
#pragma unroll (Cfg::kUnroll)
    for (int m = 0; m < BM; ++m) {
      float pv[RKV], dsv[RKV], gv[CD], qv[CD];
#pragma unroll
      for (int i = 0; i < RKV; ++i) {
        pv[i] = sP[m * LS + tr + TR * i];
        dsv[i] = sdS[m * LS + tr + TR * i];
      }
#pragma unroll
      for (int j = 0; j < CD; ++j) {
        gv[j] = colok[j] ? sdO[m * ld + tc + TC * j] : 0.f;
        qv[j] = colok[j] ? sQ[m * ld + tc + TC * j] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < RKV; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) {
          dv[i][j] = fmaf(pv[i], gv[j], dv[i][j]);
          dk[i][j] = fmaf(dsv[i], qv[j], dk[i][j]);
        }
    }

    // This query block's dQ̂ = dS·k̂: query rows tr + 16·i, head-dim columns tc + 16·j.
    float dq[RQ][CD];
#pragma unroll
    for (int i = 0; i < RQ; ++i)
#pragma unroll
      for (int j = 0; j < CD; ++j) dq[i][j] = 0.f;
#pragma unroll (Cfg::kUnroll)
    for (int n = 0; n < BN; ++n) {
      float dsv[RQ], kv[CD];
#pragma unroll
      for (int i = 0; i < RQ; ++i) dsv[i] = sdS[(tr + TR * i) * LS + n];
#pragma unroll
      for (int j = 0; j < CD; ++j) kv[j] = colok[j] ? sK[n * ld + tc + TC * j] : 0.f;
#pragma unroll
      for (int i = 0; i < RQ; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) dq[i][j] = fmaf(dsv[i], kv[j], dq[i][j]);
    }
#pragma unroll
    for (int i = 0; i < RQ; ++i) {
      const int m = m0 + tr + TR * i;
      if (m >= p.Nq) continue;
      float* dst = dq_bh + int64_t(m) * D + tc;
#pragma unroll
      for (int j = 0; j < CD; ++j) {
        if (!colok[j]) continue;
        // Deterministic: this CTA owns its slab, and the same thread updates the same element in
        // every key block it visits, so plain stores / read-modify-writes keep a fixed order.
        if (!p.deterministic) atomicAdd(dst + TC * j, dq[i][j]);
        else if (accumulate) dst[TC * j] += dq[i][j];
        else dst[TC * j] = dq[i][j];
      }
    }
  }

  // dV in the output dtype and layout; dK̂ in fp32 for the prologue backward. Masked keys get 0.
  T* dvg = static_cast<T*>(p.dv) + b * p.dv_sb + h * p.dv_sh;
  float* dkh = p.dkh + bh * p.Nk * D;
#pragma unroll
  for (int i = 0; i < RKV; ++i) {
    const int n = n0 + tr + TR * i;
    if (n >= p.Nk) continue;
#pragma unroll
    for (int j = 0; j < CD; ++j) {
      if (!colok[j]) continue;
      const int c = tc + TC * j;
      dvg[int64_t(n) * p.dv_sn + c] = simt::from_float<T>(dv[i][j]);
      dkh[int64_t(n) * D + c] = dk[i][j];
    }
  }
}

// Grid (ceil(key blocks / key_blocks_per_cta), H, B); dynamic shared memory Cfg::smem_floats(D).
template <class Cfg, class T>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_bwd_simt_kernel(const BwdParams p) {
  RAEKERN_DYNAMIC_SHARED(float, smem);
  const int h = blockIdx.y, b = blockIdx.z;
  for_each_key_block<Cfg::kBlockN>(
      p, [&](int kb, float* slab, bool accumulate) { bwd_key_block<Cfg, T>(p, smem, kb, b, h, slab, accumulate); });
}

}  // namespace raekern::attention::bwd
