// Tile configuration of the sm80 (mma.sync) attention forward, kept apart from the mainloop so a
// Hopper wgmma/TMA mainloop can be added as its own translation unit with its own configs.
// Dh = 72 runs natively: only the QKᵀ reduction is padded (to 80, a multiple of the MMA k = 16);
// V, the output and the P·V product use 72 columns (nine 8-wide MMA n-tiles). The first-class head
// dims 64, 72, 128 have exact configs (Exact: the head dim is a compile-time constant); every other
// multiple of 8 up to 256 runs in the next bucket (64, 96, 128, 256) with the head dim read at run
// time, the QKᵀ columns past it zero and the output tiles past it computed but not stored.
#pragma once
#include <cstdint>

#include "common/env_switch.h"

namespace raekern::attention::sm80 {

template <int HeadDim, bool Exact = true, int RowTiles = 2, int BlockN = 64> struct FwdConfig {
  static_assert(HeadDim % 8 == 0 && HeadDim <= 256, "head dim must be a multiple of 8, <= 256");
  static_assert(RowTiles == 1 || RowTiles == 2, "a warp owns one or two 16-row m-tiles");
  static_assert(BlockN % 16 == 0, "keys per step come in 16-key MMA k-steps");
  static constexpr int kHeadDim = HeadDim;  // the bucket's largest head dim (the head dim when exact)
  static constexpr bool kExact = Exact;
  static constexpr int kHeadDimQK = (HeadDim + 15) / 16 * 16;  // k-extent of QKᵀ (72 -> 80)
  // 128 query rows per CTA: each K/V tile brought into shared memory serves 128 rows, halving the
  // L2 → SM traffic of 64-row CTAs (which at H100 rates would approach L2 bandwidth).
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = BlockN;                       // keys per mainloop step
  // 16-row m-tiles per warp. Two (FlashAttention-2's 4 warps × 32 rows): every K and V fragment read
  // from shared memory feeds two MMAs, half the shared-memory bytes per MMA of one, at twice the
  // accumulator registers. One (8 warps × 16 rows): the kernel measured on the H200 (2026-11-30),
  // kept for head dims whose accumulators would not fit twice and behind RAEKERN_ATTENTION_FWD=rows16.
  static constexpr int kRowTiles = RowTiles;
  static constexpr int kWarps = kBlockM / (16 * RowTiles);
  static constexpr int kThreads = kWarps * 32;
  // +8 elements per row: fragment loads of 8 rows hit 8 distinct bank groups; rows stay 16-byte aligned.
  static constexpr int kLdQK = kHeadDimQK + 8;
  static constexpr int kLdV = HeadDim + 8;
  static constexpr int kNTilesS = kBlockN / 8;   // S accumulator n-tiles per m-tile
  static constexpr int kNTilesO = HeadDim / 8;   // O accumulator n-tiles per m-tile
  static constexpr int kKStepsQK = kHeadDimQK / 16;
  // Q once, K and V double-buffered (cp.async prefetch of step j+1 during step j), in elements.
  static constexpr int kSmemElems = kBlockM * kLdQK + 2 * kBlockN * kLdQK + 2 * kBlockN * kLdV;
  static constexpr int kSmemBytes = kSmemElems * 2;  // bf16 / fp16
};

// RAEKERN_ATTENTION_FWD=rows16 selects the measured one-m-tile configs (read at each launch, so the
// bench times both in one run).
inline bool fwd_rows16() { return env_equals("RAEKERN_ATTENTION_FWD", "rows16"); }

// The forward's config for a head dim (a multiple of 8 up to 256): the exact config at the
// first-class 64/72/128, otherwise the next bucket. Two m-tiles per warp up to Dh 128, with 32-key
// steps past Dh 72 so that S and O accumulators (2·(kBlockN + Dh)/2 fp32 per lane) and the ~70
// registers of addresses and fragments stay under 255 without spills (ptxas, sm_80 and sm_90a);
// Dh 256's accumulators fit only once. `rows16`: one m-tile and 64-key steps everywhere (the
// measured kernel). f receives a FwdConfig value.
template <class F> decltype(auto) with_fwd_config(int64_t D, bool rows16, F&& f) {
  if (rows16) {
    switch (D) {
      case 64: return f(FwdConfig<64, true, 1>{});
      case 72: return f(FwdConfig<72, true, 1>{});
      case 128: return f(FwdConfig<128, true, 1>{});
      default:
        if (D < 64) return f(FwdConfig<64, false, 1>{});
        if (D <= 96) return f(FwdConfig<96, false, 1>{});
        if (D < 128) return f(FwdConfig<128, false, 1>{});
        return f(FwdConfig<256, false, 1>{});
    }
  }
  switch (D) {
    case 64: return f(FwdConfig<64, true, 2, 64>{});
    case 72: return f(FwdConfig<72, true, 2, 64>{});
    case 128: return f(FwdConfig<128, true, 2, 32>{});
    default:
      if (D < 64) return f(FwdConfig<64, false, 2, 64>{});
      if (D <= 96) return f(FwdConfig<96, false, 2, 32>{});
      if (D < 128) return f(FwdConfig<128, false, 2, 32>{});
      return f(FwdConfig<256, false, 1>{});
  }
}

// Dynamic shared memory of the forward at head dim D: the dispatcher compares it with the device's
// per-block limit (A100: 163 KiB, sm_86/89: 99 KiB, H100/H200: 227 KiB) and falls back where it does not fit.
inline int64_t fwd_smem_bytes(int64_t D) {
  return with_fwd_config(D, fwd_rows16(), [](auto cfg) { return int64_t(decltype(cfg)::kSmemBytes); });
}

// Everything the kernel reads, by value in the kernel's parameter space. Strides are in elements,
// 64-bit, in (batch, token, head) order whatever the tensors' layout.
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;            // [B, H, Nq]
  const float* q_norm;   // [Dh] fp32 or nullptr (keys are normalised by the k̂ pre-pass)
  const bool* mask;      // [B, Nk] (True = keep) or nullptr
  int64_t q_sb, q_sn, q_sh, k_sb, k_sn, k_sh, v_sb, v_sn, v_sh, o_sb, o_sn, o_sh;
  int64_t mask_sb, mask_sn;
  int B, H, Nq, Nk;
  int D;                 // head dim (≤ the config's kHeadDim)
  float scale_log2;      // softmax scale · log2(e)
  float eps;
  int rope_h, rope_w;    // 0, 0: no RoPE
  float log2_theta;
};

}  // namespace raekern::attention::sm80
