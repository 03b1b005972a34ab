// Parameters and tile configurations of the CUDA attention backward, kept apart from the kernels:
// the tensor-core mainloop (attention_bwd_sm80_kernel.cuh) and the SIMT one (attention_bwd_kernel.cuh)
// share the preprocess / prologue-backward kernels and the host plan.
// Plain C++ (no torch, no CUDA headers): included by the device code, the launcher and the emulation.
#pragma once
#include <cstdint>

namespace raekern::attention::bwd {

// Everything the four backward kernels read, by value in the kernels' parameter space. Strides are
// in elements, 64-bit, in (batch, token, head) order whatever the tensors' layout; the head dim has
// unit stride. fp32 scratch tensors are contiguous [B, H, N, Dh] ("rows" = (b, h, n) in that order).
struct BwdParams {
  // Inputs (element type T), strided.
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  int64_t q_sb, q_sn, q_sh, k_sb, k_sn, k_sh, v_sb, v_sn, v_sh, o_sb, o_sn, o_sh, do_sb, do_sn, do_sh;
  const float* lse;   // [B, H, Nq], natural log (the forward's lse)
  const float* dlse;  // [B, H, Nq] or nullptr
  const float* q_norm;  // [Dh] fp32 or nullptr (no QK-norm on q)
  const float* k_norm;
  const bool* mask;     // [B, Nk], True = keep, or nullptr
  int64_t mask_sb, mask_sn;
  // Outputs (element type T), contiguous in the input layout; strides as above.
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_sb, dq_sn, dq_sh, dk_sb, dk_sn, dk_sh, dv_sb, dv_sn, dv_sh;
  // fp32 scratch.
  float* qh;       // [B,H,Nq,Dh] rope(norm(q)), unscaled
  float* kh;       // [B,H,Nk,Dh] rope(norm(k))
  void* qh16;      // the same in the input dtype (bf16/fp16) for the tensor-core mainloop, or nullptr
  void* kh16;
  float* rstd_q;   // [B,H,Nq] QK-norm 1/rms (only with q_norm)
  float* rstd_k;   // [B,H,Nk] (only with k_norm)
  float* delta;    // [B,H,Nq] rowsum(dO∘O) - dlse
  float* dqh;      // num_slabs × [B,H,Nq,Dh]: dL/dq̂ (atomic accumulator, or one partial per slab)
  float* dkh;      // [B,H,Nk,Dh] dL/dk̂
  float* dw_part;  // [2][dw_blocks][Dh] per-block partial norm-weight gradients (q, then k)
  float* dw;       // [2][Dh] their ordered sums
  int64_t slab_stride;  // elements between two dqh slabs (B·H·Nq·Dh)
  int B, H, Nq, Nk, D;
  int num_slabs;           // 1 with atomics; ceil(key blocks / key_blocks_per_cta) when deterministic
  int key_blocks_per_cta;  // > 1 only in deterministic mode (bounds the slab memory)
  int deterministic;
  int dw_blocks;           // blocks per row kind (q / k) of the prologue-backward kernel
  int64_t dw_rows_q, dw_rows_k;  // rows per block of that kernel, for q rows and for k rows
  float scale;             // softmax scale
  float scale_log2;        // scale · log2(e)
  float eps;
  int rope_h, rope_w;      // 0, 0: no RoPE
  // RoPE cos / sin per position and pair, [(rope_h + rope_w) × Dh/4]: grid rows 0..rope_h-1 (first
  // half of Dh), then grid columns (second half). Computed once per call in fp64 from θ^(-2p/(Dh/2)),
  // as the CPU kernel and the PyTorch reference do, so no row kernel evaluates a transcendental.
  const float* rope_cos;
  const float* rope_sin;
};

// Head-dim buckets: the kernels keep per-thread register tiles sized for the bucket's maximum and
// predicate the columns past the actual Dh, so any Dh in [1, 256] runs (RoPE needs Dh % 4 == 0).
inline int head_dim_bucket(int64_t D) { return D <= 64 ? 64 : D <= 96 ? 96 : D <= 128 ? 128 : 256; }

// SIMT mainloop tiles. One CTA = kBlockN keys of one (batch, head); 256 threads as a 16 × 16 grid
// (tr, tc): rows of a tile are strided by 16 over tr, head-dim / key columns by 16 over tc, so a warp
// reads 16 consecutive fp32 words of a shared-memory row (conflict-free) and 2 broadcast words.
template <int MaxD> struct BwdSimtConfig {
  static_assert(MaxD % 16 == 0 && MaxD <= 256, "head-dim bucket must be a multiple of 16, <= 256");
  static constexpr int kMaxD = MaxD;
  static constexpr int kThreads = 256;
  static constexpr int kTR = 16, kTC = 16;
  // Sized so every bucket fits in 99 KiB of shared memory (sm_86/89's limit; sm_80 code runs there).
  static constexpr int kBlockN = MaxD <= 128 ? 64 : 16;  // keys per CTA: dK/dV live in registers
  static constexpr int kBlockM = MaxD <= 96 ? 32 : 16;   // query rows per mainloop step
  static constexpr int kRowsKV = kBlockN / kTR;          // dK/dV rows per thread
  static constexpr int kColsD = MaxD / kTC;              // head-dim columns per thread
  static constexpr int kRowsQ = kBlockM / kTR;           // S / dQ rows per thread
  static constexpr int kColsS = kBlockN / kTC;           // S key columns per thread
  static constexpr int kLdS = kBlockN + 1;               // odd strides: column reads hit distinct banks
  static constexpr int kUnroll = MaxD <= 128 ? 2 : 1;    // 16 head-dim columns per thread: no room for 2
  // Dynamic shared memory in floats for head dim D (row stride D + 1, odd when D is even):
  // K̂ and V [kBlockN], Q̂ and dO [kBlockM], P and dS [kBlockM × kLdS], keep flags, lse, Δ.
  static constexpr int64_t smem_floats(int D) {
    const int64_t ld = D % 2 ? D : D + 1;
    return 2 * kBlockN * ld + 2 * kBlockM * ld + 2 * kBlockM * kLdS + kBlockN + 2 * kBlockM;
  }
  static constexpr int ld_of(int D) { return D % 2 ? D : D + 1; }
};

// Tensor-core (mma.sync m16n8k16) mainloop, bf16/fp16, Dh 64/72/128 exact and any other multiple of 8
// up to 128 in a bucket (64, 96, 128: head dim at run time, padding columns zero, columns past it not
// stored) (attention_bwd_sm80_kernel.cuh).
// One CTA = kBlockN = 64 keys of one (batch, head), 4 warps; per step kBlockM = 64 query rows: each
// warp forms S and dP for 16 query rows × 64 keys (and their dQ̂), then dV and dK̂ for 16 keys from
// P and dS staged in shared memory. Reductions over the head dim run to kHeadDimP = Dh rounded up
// to 16 (zero columns), the output tiles to Dh (nine 8-wide tiles at Dh = 72).
template <int HeadDim, bool Exact = true> struct BwdTcConfig {
  static_assert(HeadDim % 8 == 0 && HeadDim <= 128, "tensor-core backward: head dim a multiple of 8, <= 128");
  static constexpr int kHeadDim = HeadDim;  // the bucket's largest head dim (the head dim when exact)
  static constexpr bool kExact = Exact;
  static constexpr int kHeadDimP = (HeadDim + 15) / 16 * 16;
  static constexpr int kBlockN = 64;
  static constexpr int kBlockM = 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLd = kHeadDimP + 8;   // K̂, V, Q̂, dO rows: +16 bytes keeps ldmatrix conflict-free
  static constexpr int kLdP = kBlockN + 8;    // P, dS rows [query][key]
  static constexpr int kNTilesKey = kBlockN / 8;
  static constexpr int kNTilesD = HeadDim / 8;
  static constexpr int kKStepsD = kHeadDimP / 16;
  // Query-block buffers: two (the next block's q̂ / dO load under this block's products) where the
  // shared memory still allows two CTAs per SM; one at Dh = 128 (124 KiB would allow only one).
  static constexpr int kQBufs = HeadDim <= 72 ? 2 : 1;
  // K̂, V, kQBufs × (Q̂, dO) tiles and P, dS (elements of the input dtype), then kQBufs × (lse·log2e, Δ)
  // per query row.
  static constexpr int kSmemElems = (2 + 2 * kQBufs) * 64 * kLd + 2 * kBlockM * kLdP;
  static constexpr int kSmemBytes = kSmemElems * 2 + 2 * kQBufs * kBlockM * 4;
};

// Row kernels (preprocess and prologue backward): one warp per row, lane l owns columns l + 32·j.
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;

}  // namespace raekern::attention::bwd
