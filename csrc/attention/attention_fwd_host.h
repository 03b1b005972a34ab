// Host plan of the CUDA attention forward, shared by the CUDA launcher (attention.cu) and the host
// emulation (attention_emu.cpp): argument checks, outputs, the parameter block, the dtype / head-dim
// / alignment dispatch and the launch shape. The callers differ only in `Mem` and `Launch`
// (common/cuda_launch.h's CudaMem / CudaLaunch, common/emulation_torch.h's emu::Mem / emu::Launch).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "attention/attention_args.h"
#include "attention/attention_prologue_kernel.cuh"
#include "attention/attention_sm80_config.h"
#include "attention/attention_sm80_fwd_kernel.cuh"

namespace raekern::attention::fwd {

template <class Cfg, class E, class Launch>
void launch_cfg(Launch& launch, const sm80::FwdParams& p, bool aligned) {
  const dim3 grid(unsigned((p.Nq + Cfg::kBlockM - 1) / Cfg::kBlockM), unsigned(p.H), unsigned(p.B));
  if (aligned) launch(sm80::attention_fwd_sm80_kernel<Cfg, E, true>, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, p);
  else launch(sm80::attention_fwd_sm80_kernel<Cfg, E, false>, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, p);
}

template <class E, class Launch>
void launch_dh(Launch& launch, int64_t D, const sm80::FwdParams& p, bool aligned) {
  sm80::with_fwd_config(D, sm80::fwd_rows16(), [&](auto cfg) { launch_cfg<decltype(cfg), E>(launch, p, aligned); });
}

template <class Mem, class Launch>
std::tuple<at::Tensor, at::Tensor> run(Mem& mem, Launch& launch, const at::Tensor& q_, const at::Tensor& k_,
                                       const at::Tensor& v_, const std::optional<at::Tensor>& qw,
                                       const std::optional<at::Tensor>& kw, const std::optional<at::Tensor>& mask,
                                       double scale, double eps, int64_t rope_h, int64_t rope_w, double theta,
                                       int64_t layout) {
  check_args(q_, k_, v_, qw, kw, mask, rope_h, rope_w, layout);
  const at::ScalarType st = q_.scalar_type();
  RAEKERN_CHECK(st == at::kBFloat16 || st == at::kHalf, kOp, "q",
                "must be bfloat16 or float16 on CUDA (tensor-core kernel), got ", st);
  const at::Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  const Dims d = dims_of(q, k, layout);
  RAEKERN_CHECK(d.D % 8 == 0 && d.D <= 256, kOp, "q", "head dim ", d.D,
                " is not a multiple of 8 up to 256 (the CUDA kernel's 16-byte rows)");
  RAEKERN_CHECK(d.H <= 65535 && d.B <= 65535, kOp, "q", "batch and heads must be <= 65535 on CUDA, got ",
                q.sizes());
  RAEKERN_CHECK(d.Nq < (int64_t(1) << 31) && d.Nk < (int64_t(1) << 31), kOp, "q", "sequence too long");
  at::Tensor out = empty_in_layout(d, d.Nq, layout, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Nq}, q.options().dtype(at::kFloat));
  // Norm weights in fp32 (a device-side cast, no host sync); held until the launch is queued.
  const at::Tensor qw32 = qw ? qw->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor kw32 = kw ? kw->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor khat;  // k̂ scratch, held until the launches are queued

  auto go = [&](auto elem) {
    using E = decltype(elem);
    using S = std::conditional_t<std::is_same_v<E, typename Mem::template dev_t<c10::BFloat16>>, c10::BFloat16,
                                 c10::Half>;
    sm80::FwdParams p{};
    p.q = mem.template in<S>(q, "q");
    p.v = mem.template in<S>(v, "v");
    p.out = mem.template out<S>(out, "out");
    p.lse = mem.template out<float>(lse, "lse");
    p.q_norm = qw ? mem.template in<float>(qw32, "q_norm_weight") : nullptr;
    p.mask = mask ? mem.template in<bool>(*mask, "key_padding_mask") : nullptr;
    const Strides4 sq = strides_bnhd(q, layout), sk = strides_bnhd(k, layout), sv = strides_bnhd(v, layout),
                   so = strides_bnhd(out, layout);
    const float log2_theta = float(std::log2(theta));
    bool kv_aligned = aligned16(k, layout) && aligned16(v, layout);
    if (kw || rope_h > 0) {
      // k̂ = rope(norm(k)) once into a contiguous [B, H, Nk, D] buffer that the mainloop streams.
      khat = ::raekern::empty_output({d.B, d.H, d.Nk, d.D}, q.options());
      const E* kp = mem.template in<S>(k, "k");
      E* kh = mem.template out<S>(khat, "k_hat");
      const int64_t kp_blocks = std::min<int64_t>((d.H * d.Nk + simt_dev::kKPrologueWarps - 1) / simt_dev::kKPrologueWarps,
                                                  int64_t(1) << 30);
      launch(simt_dev::k_prologue_kernel<E>, dim3(unsigned(kp_blocks), unsigned(d.B)),
             dim3(simt_dev::kKPrologueWarps * 32), 0, kp,
             sk.b, sk.n, sk.h, kh, int(d.H), int(d.Nk), int(d.D),
             kw ? static_cast<const float*>(mem.template in<float>(kw32, "k_norm_weight")) : nullptr, float(eps),
             int(rope_h), int(rope_w), log2_theta);
      p.k = kh;
      p.k_sb = d.H * d.Nk * d.D, p.k_sn = d.D, p.k_sh = d.Nk * d.D;
      kv_aligned = aligned16(v, layout);  // k̂ rows are 16-byte aligned (D % 8 == 0)
    } else {
      p.k = mem.template in<S>(k, "k");
      p.k_sb = sk.b, p.k_sn = sk.n, p.k_sh = sk.h;
    }
    p.q_sb = sq.b, p.q_sn = sq.n, p.q_sh = sq.h;
    p.v_sb = sv.b, p.v_sn = sv.n, p.v_sh = sv.h;
    p.o_sb = so.b, p.o_sn = so.n, p.o_sh = so.h;
    p.mask_sb = mask ? mask->stride(0) : 0;
    p.mask_sn = mask ? mask->stride(1) : 0;
    p.B = int(d.B), p.H = int(d.H), p.Nq = int(d.Nq), p.Nk = int(d.Nk), p.D = int(d.D);
    p.scale_log2 = float(scale * 1.4426950408889634);
    p.eps = float(eps);
    p.rope_h = int(rope_h), p.rope_w = int(rope_w);
    p.log2_theta = log2_theta;
    const bool aligned = aligned16(q, layout) && kv_aligned;
    launch_dh<E>(launch, d.D, p, aligned);
  };
  if (st == at::kBFloat16) go(typename Mem::template dev_t<c10::BFloat16>{});
  else go(typename Mem::template dev_t<c10::Half>{});
  mem.sync();
  return {out, lse};
}

}  // namespace raekern::attention::fwd
