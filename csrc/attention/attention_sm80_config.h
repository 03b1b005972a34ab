// Tile configuration of the sm80 (mma.sync) attention forward, kept apart from the mainloop so a
// Hopper wgmma/TMA mainloop can be added as its own translation unit with its own configs.
// Dh = 72 runs natively: only the QKᵀ reduction is padded (to 80, a multiple of the MMA k = 16);
// V, the output and the P·V product use 72 columns (nine 8-wide MMA n-tiles). The first-class head
// dims 64, 72, 128 have exact configs (Exact: the head dim is a compile-time constant); every other
// multiple of 8 up to 256 runs in the next bucket (64, 96, 128, 256) with the head dim read at run
// time, the QKᵀ columns past it zero and the output tiles past it computed but not stored.
#pragma once
#include <cstdint>

namespace raekern::attention::sm80 {

template <int HeadDim, bool Exact = true> struct FwdConfig {
  static_assert(HeadDim % 8 == 0 && HeadDim <= 256, "head dim must be a multiple of 8, <= 256");
  static constexpr int kHeadDim = HeadDim;  // the bucket's largest head dim (the head dim when exact)
  static constexpr bool kExact = Exact;
  static constexpr int kHeadDimQK = (HeadDim + 15) / 16 * 16;  // k-extent of QKᵀ (72 -> 80)
  // 128 query rows per CTA (8 warps × 16): each K/V tile brought into shared memory serves 128 rows,
  // halving the L2 → SM traffic of 64-row CTAs (which at H100 rates would approach L2 bandwidth).
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 64;                           // keys per mainloop step
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static_assert(kThreads == 2 * kBlockM, "the Q prologue runs two threads per row");
  // +8 elements per row: fragment loads of 8 rows hit 8 distinct bank groups; rows stay 16-byte aligned.
  static constexpr int kLdQK = kHeadDimQK + 8;
  static constexpr int kLdV = HeadDim + 8;
  static constexpr int kNTilesS = kBlockN / 8;   // S accumulator n-tiles per warp
  static constexpr int kNTilesO = HeadDim / 8;   // O accumulator n-tiles per warp
  static constexpr int kKStepsQK = kHeadDimQK / 16;
  // Q once, K and V double-buffered (cp.async prefetch of step j+1 during step j), in elements.
  static constexpr int kSmemElems = kBlockM * kLdQK + 2 * kBlockN * kLdQK + 2 * kBlockN * kLdV;
  static constexpr int kSmemBytes = kSmemElems * 2;  // bf16 / fp16
};

// The forward's config for a head dim (a multiple of 8 up to 256): the exact config at the
// first-class 64/72/128, otherwise the next bucket. f receives a FwdConfig value.
template <class F> decltype(auto) with_fwd_config(int64_t D, F&& f) {
  switch (D) {
    case 64: return f(FwdConfig<64, true>{});
    case 72: return f(FwdConfig<72, true>{});
    case 128: return f(FwdConfig<128, true>{});
    default:
      if (D < 64) return f(FwdConfig<64, false>{});
      if (D <= 96) return f(FwdConfig<96, false>{});
      if (D < 128) return f(FwdConfig<128, false>{});
      return f(FwdConfig<256, false>{});
  }
}

// Dynamic shared memory of the forward at head dim D: the dispatcher compares it with the device's
// per-block limit (A100: 163 KiB, sm_86/89: 99 KiB, H100/H200: 227 KiB) and falls back where it does not fit.
inline int64_t fwd_smem_bytes(int64_t D) {
  return with_fwd_config(D, [](auto cfg) { return int64_t(decltype(cfg)::kSmemBytes); });
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
