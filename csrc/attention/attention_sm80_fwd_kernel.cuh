// sm80 attention forward mainloop: FlashAttention-2 structure with hand-written tensor-core code.
// CTA = 128 query rows × one (batch, head), split over warps as the config says (4 warps × 32 rows,
// or 8 × 16); K/V tiles of kBlockN keys stream through double-buffered shared memory with cp.async;
// S = Q·Kᵀ and O += P·V use mma.sync.m16n8k16 (bf16/fp16 in, fp32 accumulate); the online softmax
// (log2 units) stays in registers and P is fed to the second MMA straight from the S accumulators.
// Every fragment comes from shared memory by ldmatrix (K and V as x4 loads covering two MMA n-tiles,
// each feeding every m-tile of the warp). QK-norm and RoPE: the Q tile in shared memory once, keys
// by a pre-pass (k_prologue_kernel, attention_prologue_kernel.cuh) run once per call instead of once
// per CTA.
// Also runs on the host emulation (tensor-core instructions emulated from their PTX fragment
// layouts, common/tensor_core.cuh).
// Ran on an H200 (2026-11-30) with one m-tile per warp (RAEKERN_ATTENTION_FWD=rows16 now): GPU tests
// pass; timings in benchmarks/results/2026-11-30-h200.txt. The two-m-tile configs have not run on a GPU.
#pragma once
#include <cstdint>

#include "attention/attention_prologue_kernel.cuh"
#include "attention/attention_sm80_config.h"
#include "common/simt.cuh"
#include "common/tensor_core.cuh"

namespace raekern::attention::sm80 {

using tc::Mma;
using tc::cp_async_commit;
using tc::cp_async_wait;

// rows × D elements from global (token stride sn) into smem (row stride ld). Aligned: 16-byte
// cp.async chunks (async, zero-fill past `rows_valid`); otherwise plain element copies.
template <class Cfg, class T, bool kAligned>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, int ld, const T* __restrict__ src, int64_t sn,
                                          int rows, int rows_valid, int D) {
  if constexpr (kAligned) {
    tc::cp_async_rows<Cfg::kThreads>(dst, ld, src, sn, rows, rows_valid, D);
  } else {
    for (int e = threadIdx.x; e < rows * D; e += Cfg::kThreads) {
      const int r = e / D, col = e % D;
      dst[r * ld + col] = r < rows_valid ? src[int64_t(r) * sn + col] : simt::from_float<T>(0.f);
    }
  }
}

// QK-norm + RoPE on the Q tile in smem: two threads per row, the block's threads walking the rows.
// Keys arrive already rotated and normalised (k_prologue_kernel), so only Q is processed here.
template <class Cfg, class T>
__device__ __forceinline__ void prologue_q_tile(T* tile, int ld, int token0, const FwdParams& p) {
  static_assert(Cfg::kBlockM % (Cfg::kThreads / 2) == 0, "every pass over the rows is a whole one");
  const int half = threadIdx.x & 1;
#pragma unroll 1
  for (int r = threadIdx.x >> 1; r < Cfg::kBlockM; r += Cfg::kThreads / 2) {
    const int token = token0 + r;
    const bool rope = p.rope_h > 0 && token < p.rope_h * p.rope_w;
    const int pos = rope ? (half ? token % p.rope_w : token / p.rope_w) : 0;
    simt_dev::qk_prologue_half_row<T>(tile + r * ld, simt_dev::config_head_dim<Cfg>(p.D), half, p.q_norm, p.eps,
                                      rope, pos, p.log2_theta);
  }
}

template <class Cfg, class T, bool kAligned>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_fwd_sm80_kernel(const FwdParams p) {
  constexpr int kM = Cfg::kBlockM, kN = Cfg::kBlockN, DQK = Cfg::kHeadDimQK, MT = Cfg::kRowTiles;
  constexpr int NS = Cfg::kNTilesS, NO = Cfg::kNTilesO;
  const int D = simt_dev::config_head_dim<Cfg>(p.D);
  constexpr int LQ = Cfg::kLdQK, LV = Cfg::kLdV;
  RAEKERN_DYNAMIC_SHARED(T, smem);
  T* sQ = smem;
  T* sK = sQ + kM * LQ;       // [2][kN][LQ]
  T* sV = sK + 2 * kN * LQ;   // [2][kN][LV]

  const int m0 = blockIdx.x * kM, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * 16 * MT;  // this warp's rows: warp_row0 + 16·m + (g, g + 8), m < MT
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + int64_t(m0) * p.q_sn;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;

  // The QKᵀ padding columns (D..DQK) must read as zero in Q and in both K buffers (V's columns past D
  // only feed output columns that are never stored).
  if (DQK > D) {
    for (int e = threadIdx.x; e < (kM + 2 * kN) * (DQK - D); e += Cfg::kThreads) {
      const int r = e / (DQK - D), c = D + e % (DQK - D);
      sQ[r * LQ + c] = simt::from_float<T>(0.f);  // rows 0..kM+2·kN span sQ and both sK buffers
    }
  }
  const int n_blocks = (p.Nk + kN - 1) / kN;
  load_tile<Cfg, T, kAligned>(sQ, LQ, qg, p.q_sn, kM, min(kM, p.Nq - m0), D);
  load_tile<Cfg, T, kAligned>(sK, LQ, kg, p.k_sn, kN, min(kN, p.Nk), D);
  load_tile<Cfg, T, kAligned>(sV, LV, vg, p.v_sn, kN, min(kN, p.Nk), D);
  if constexpr (kAligned) cp_async_commit();

  // Per m-tile m: O accumulators, and the running max / sum of rows g (index 0) and g + 8 (index 1).
  float acc_o[MT][NO][4];
  float row_m[MT][2], row_l[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int n = 0; n < NO; ++n) acc_o[m][n][0] = acc_o[m][n][1] = acc_o[m][n][2] = acc_o[m][n][3] = 0.f;
    row_m[m][0] = row_m[m][1] = -INFINITY;
    row_l[m][0] = row_l[m][1] = 0.f;
  }
  const bool* mask = p.mask ? p.mask + b * p.mask_sb : nullptr;

  for (int j = 0; j < n_blocks; ++j) {
    const int buf = j & 1, n0 = j * kN;
    if (j + 1 < n_blocks) {
      const int nb = (j + 1) & 1, n1 = n0 + kN;
      load_tile<Cfg, T, kAligned>(sK + nb * kN * LQ, LQ, kg + int64_t(n1) * p.k_sn, p.k_sn, kN, min(kN, p.Nk - n1), D);
      load_tile<Cfg, T, kAligned>(sV + nb * kN * LV, LV, vg + int64_t(n1) * p.v_sn, p.v_sn, kN, min(kN, p.Nk - n1), D);
      if constexpr (kAligned) {
        cp_async_commit();
        cp_async_wait<1>();
      }
    } else if constexpr (kAligned) {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (mask) {  // masked keys' V rows to zero, as the CPU kernel skips them (a block-uniform branch)
      tc::zero_masked_rows<Cfg::kThreads, T>(sV + buf * kN * LV, nullptr, LV, kN, D, n0, p.Nk, mask, p.mask_sn);
      __syncthreads();
    }
    const T* k_tile = sK + buf * kN * LQ;
    const T* v_tile = sV + buf * kN * LV;
    if (j == 0 && (p.q_norm || p.rope_h > 0)) {
      prologue_q_tile<Cfg, T>(sQ, LQ, m0, p);
      __syncthreads();
    }

    // S = Q·Kᵀ for this warp's MT·16 rows × kN keys (Q fragments re-read every block, as
    // FlashAttention-2 does, to leave the registers to the accumulators).
    float acc_s[MT][NS][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NS; ++n) acc_s[m][n][0] = acc_s[m][n][1] = acc_s[m][n][2] = acc_s[m][n][3] = 0.f;
    tc::mma_rows_nk_tiles<Cfg::kKStepsQK, NS, MT, T>(acc_s, sQ + warp_row0 * LQ, LQ, k_tile, LQ, lane);

    // Online softmax in log2 units; 4 lanes share a row. Keys past Nk (only in the last block) and
    // masked keys become -inf.
    const bool edge = n0 + kN > p.Nk;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // Rounded product (never contracted into the exp2 argument below): the row max and the
          // exponents must see the same value, or at scores near 1e10 the max key gets 2^(±512).
          float s = __fmul_rn(acc_s[m][n][e], p.scale_log2);
          if (edge || mask) {
            const int col = n0 + n * 8 + 2 * t + (e & 1);
            if (col >= p.Nk || (mask && !mask[int64_t(col) * p.mask_sn])) s = -INFINITY;
          }
          acc_s[m][n][e] = s;
          mx[e >> 1] = fmaxf(mx[e >> 1], s);
        }
      float alpha[2], shift[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(simt::kFullMask, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(simt::kFullMask, mx[r], 2));
        const float m_new = fmaxf(row_m[m][r], mx[r]);
        shift[r] = m_new == -INFINITY ? 0.f : m_new;  // no key yet: keep exp2(-inf) = 0, not NaN
        alpha[r] = exp2f(row_m[m][r] - shift[r]);
        row_m[m][r] = m_new;
        row_l[m][r] *= alpha[r];
      }
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = exp2f(acc_s[m][n][e] - shift[e >> 1]);
          acc_s[m][n][e] = pe;
          row_l[m][e >> 1] += pe;
        }
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        acc_o[m][n][0] *= alpha[0];
        acc_o[m][n][1] *= alpha[0];
        acc_o[m][n][2] *= alpha[1];
        acc_o[m][n][3] *= alpha[1];
      }
    }

    // O += P·V: the S accumulators of two adjacent n-tiles form one A fragment (k = 16 keys); each
    // V fragment serves the warp's MT m-tiles.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        a[m][0] = Mma<T>::pack(acc_s[m][2 * kk][0], acc_s[m][2 * kk][1]);
        a[m][1] = Mma<T>::pack(acc_s[m][2 * kk][2], acc_s[m][2 * kk][3]);
        a[m][2] = Mma<T>::pack(acc_s[m][2 * kk + 1][0], acc_s[m][2 * kk + 1][1]);
        a[m][3] = Mma<T>::pack(acc_s[m][2 * kk + 1][2], acc_s[m][2 * kk + 1][3]);
      }
      tc::mma_frag_kn_tiles<NO, MT, T>(acc_o, a, v_tile + kk * 16 * LV, LV, lane);
    }
    __syncthreads();  // this buffer is refilled by the prefetch of step j+2
  }

  // Epilogue: full row sums across the 4 lanes of a row, normalise, write out and lse.
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_l[m][r];
      l += __shfl_xor_sync(simt::kFullMask, l, 1);
      l += __shfl_xor_sync(simt::kFullMask, l, 2);
      const int row = m0 + warp_row0 + 16 * m + g + 8 * r;
      const simt_dev::RowFinal fin = simt_dev::softmax_finalize(row_m[m][r], l);
      if (row >= p.Nq) continue;
      T* og = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + int64_t(row) * p.o_sn;
#pragma unroll
      for (int n = 0; n < NO; ++n)
        if (Cfg::kExact || n * 8 < D)
          simt::store_u32(og + n * 8 + 2 * t,
                          Mma<T>::pack(acc_o[m][n][2 * r] * fin.inv_l, acc_o[m][n][2 * r + 1] * fin.inv_l));
      if (t == 0) p.lse[(int64_t(b) * p.H + h) * p.Nq + row] = fin.lse;
    }
}

}  // namespace raekern::attention::sm80
