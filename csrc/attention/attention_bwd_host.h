// Host plan of the CUDA attention backward, shared by the CUDA launcher (attention_bwd.cu) and the
// host emulation (attention_bwd_emu.cpp): argument checks, output and scratch allocation, the
// parameter block, launch shapes and the order of the four kernels. The two callers differ only in
// `Mem` (how a tensor becomes a device pointer: data_ptr on CUDA, a guarded buffer in the emulation)
// and `Launch` (a <<<>>> launch on the current stream, or emulate_launch).
//
//   Mem:    template <class T> using dev_t;  in<T>(t, name) / out<T>(t, name) / inout<T>(t, name)
//           -> (const) dev_t<T>*;  void sync()  (results readable on the host side of the plan)
//   Launch: operator()(kernel, dim3 grid, dim3 block, size_t shared_bytes, args...)
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/outer.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "attention/attention_args.h"
#include "attention/attention_bwd_config.h"
#include "attention/attention_bwd_kernel.cuh"
#include "attention/attention_bwd_sm80_kernel.cuh"
#include "attention/attention_bwd_prologue_kernel.cuh"
#include "common/output_alloc.h"

namespace raekern::attention::bwd {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Deterministic mode keeps one fp32 dq̂ slab per CTA column; above this many bytes of slabs, a CTA
// walks several key blocks (fewer slabs, less parallelism) instead.
constexpr int64_t kMaxSlabBytes = int64_t(1) << 30;
// Blocks per row kind of the prologue-backward kernel: bounds the partial norm-weight gradients.
constexpr int64_t kMaxDwBlocks = 1024;

struct Inputs {
  at::Tensor dout, q, k, v, out, lse, dlse, qw, kw, mask;  // dlse/qw/kw/mask may be undefined
  double scale, eps, theta;
  int64_t rope_h, rope_w, layout;
  bool deterministic;
  int64_t key_blocks_per_cta;  // 0: chosen here
  int64_t mainloop;            // 0: chosen here; 1: SIMT; 2: tensor cores (bf16/fp16, Dh % 8 == 0 ≤ 128, aligned v/dO)
};

template <class Mem, class T>
const void* map_in(Mem& mem, const at::Tensor& t, const char* name) {
  return t.defined() ? static_cast<const void*>(mem.template in<T>(t, name)) : nullptr;
}

// Head dims the tensor-core mainloop takes: multiples of 8 up to 128 (the SIMT buckets 64/96/128).
template <int MaxD> inline bool tc_head_dim(int64_t D) { return MaxD <= 128 && D % 8 == 0; }

// Exact configs for 64, 72 and 128; every other head dim runs in its bucket's config.
template <class E, int MaxD, class Launch>
void launch_tc(Launch& launch, int64_t D, dim3 grid, const BwdParams& p) {
  auto go = [&](auto cfg) {
    using C = decltype(cfg);
    launch(attention_bwd_sm80_kernel<C, E>, grid, dim3(C::kThreads), size_t(C::kSmemBytes), p);
  };
  if constexpr (!std::is_same_v<E, float> && MaxD <= 128) {
    if constexpr (MaxD == 64) D == 64 ? go(BwdTcConfig<64>{}) : go(BwdTcConfig<64, false>{});
    if constexpr (MaxD == 96) D == 72 ? go(BwdTcConfig<72>{}) : go(BwdTcConfig<96, false>{});
    if constexpr (MaxD == 128) D == 128 ? go(BwdTcConfig<128>{}) : go(BwdTcConfig<128, false>{});
  }
}

template <class T, int MaxD, class Mem, class Launch>
Grads run_typed(Mem& mem, Launch& launch, const Inputs& in) {
  using E = typename Mem::template dev_t<T>;
  using Cfg = BwdSimtConfig<MaxD>;
  constexpr int kCols = (MaxD + 31) / 32;
  const at::Tensor &q = in.q, &k = in.k, &v = in.v;
  const int64_t layout = in.layout;
  const Dims d = dims_of(q, k, layout);
  const auto f32 = q.options().dtype(at::kFloat);

  at::Tensor dq = empty_in_layout(d, d.Nq, layout, q.options());
  at::Tensor dk = empty_in_layout(d, d.Nk, layout, q.options());
  at::Tensor dv = empty_in_layout(d, d.Nk, layout, q.options());
  const at::Tensor lse32 = in.lse.to(at::kFloat).contiguous();
  const at::Tensor dlse32 = in.dlse.defined() ? in.dlse.to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor qw32 = in.qw.defined() ? in.qw.to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor kw32 = in.kw.defined() ? in.kw.to(at::kFloat).contiguous() : at::Tensor();

  const int64_t n_kblocks = (d.Nk + Cfg::kBlockN - 1) / Cfg::kBlockN;
  const int64_t slab_elems = d.B * d.H * d.Nq * d.D;
  int64_t per_cta = 1;
  if (in.deterministic) {
    per_cta = in.key_blocks_per_cta > 0 ? in.key_blocks_per_cta : 1;
    if (in.key_blocks_per_cta <= 0) {
      const int64_t max_slabs = std::max<int64_t>(1, kMaxSlabBytes / std::max<int64_t>(1, slab_elems * 4));
      per_cta = (n_kblocks + max_slabs - 1) / max_slabs;
    }
  }
  const int64_t ctas_x = (n_kblocks + per_cta - 1) / per_cta;
  const int64_t slabs = in.deterministic ? ctas_x : 1;
  RAEKERN_CHECK(ctas_x < (int64_t(1) << 31), kOp, "k", "too many key blocks for one grid: ", n_kblocks);

  at::Tensor qh = ::raekern::empty_output({d.B, d.H, d.Nq, d.D}, f32), kh = ::raekern::empty_output({d.B, d.H, d.Nk, d.D}, f32);
  at::Tensor rstd_q = in.qw.defined() ? ::raekern::empty_output({d.B, d.H, d.Nq}, f32) : at::Tensor();
  at::Tensor rstd_k = in.kw.defined() ? ::raekern::empty_output({d.B, d.H, d.Nk}, f32) : at::Tensor();
  at::Tensor delta = ::raekern::empty_output({d.B, d.H, d.Nq}, f32);
  // Atomic mode accumulates into zeros; every slab of the deterministic mode is fully stored first.
  at::Tensor dqh = in.deterministic ? ::raekern::empty_output({slabs, d.B, d.H, d.Nq, d.D}, f32)
                                    : at::zeros({d.B, d.H, d.Nq, d.D}, f32);
  at::Tensor dkh = ::raekern::empty_output({d.B, d.H, d.Nk, d.D}, f32);
  const int64_t rows_q = d.B * d.H * d.Nq, rows_k = d.B * d.H * d.Nk;
  const int64_t dw_blocks = std::min<int64_t>(kMaxDwBlocks, (std::max(rows_q, rows_k) + 63) / 64);
  at::Tensor dw_part = ::raekern::empty_output({2, dw_blocks, d.D}, f32);
  at::Tensor dw = ::raekern::empty_output({2, d.D}, f32);

  // Tensor-core mainloop for bf16/fp16 at Dh ≤ 128 (multiples of 8) when V and dO rows are 16-byte aligned; it
  // reads q̂ and k̂ in the input dtype (a second output of the preprocess).
  const bool tc_ok = !std::is_same_v<T, float> && tc_head_dim<MaxD>(d.D) && aligned16(v, layout) &&
                     aligned16(in.dout, layout);
  RAEKERN_CHECK(in.mainloop != 2 || tc_ok, kOp, "q",
                "the tensor-core backward needs bfloat16/float16, a head dim that is a multiple of 8 up to 128, "
                "and 16-byte aligned v / grad_out rows");
  const bool tc = in.mainloop == 2 || (in.mainloop == 0 && tc_ok);
  at::Tensor qh16 = tc ? ::raekern::empty_output({d.B, d.H, d.Nq, d.D}, q.options()) : at::Tensor();
  at::Tensor kh16 = tc ? ::raekern::empty_output({d.B, d.H, d.Nk, d.D}, q.options()) : at::Tensor();

  BwdParams p{};
  p.q = map_in<Mem, T>(mem, q, "q");
  p.k = map_in<Mem, T>(mem, k, "k");
  p.v = map_in<Mem, T>(mem, v, "v");
  p.out = map_in<Mem, T>(mem, in.out, "out");
  p.dout = map_in<Mem, T>(mem, in.dout, "grad_out");
  const Strides4 sq = strides_bnhd(q, layout), sk = strides_bnhd(k, layout), sv = strides_bnhd(v, layout),
                 so = strides_bnhd(in.out, layout), sdo = strides_bnhd(in.dout, layout);
  p.q_sb = sq.b, p.q_sn = sq.n, p.q_sh = sq.h;
  p.k_sb = sk.b, p.k_sn = sk.n, p.k_sh = sk.h;
  p.v_sb = sv.b, p.v_sn = sv.n, p.v_sh = sv.h;
  p.o_sb = so.b, p.o_sn = so.n, p.o_sh = so.h;
  p.do_sb = sdo.b, p.do_sn = sdo.n, p.do_sh = sdo.h;
  p.lse = static_cast<const float*>(map_in<Mem, float>(mem, lse32, "lse"));
  p.dlse = static_cast<const float*>(map_in<Mem, float>(mem, dlse32, "grad_lse"));
  p.q_norm = static_cast<const float*>(map_in<Mem, float>(mem, qw32, "q_norm_weight"));
  p.k_norm = static_cast<const float*>(map_in<Mem, float>(mem, kw32, "k_norm_weight"));
  p.mask = static_cast<const bool*>(map_in<Mem, bool>(mem, in.mask, "key_padding_mask"));
  p.mask_sb = in.mask.defined() ? in.mask.stride(0) : 0;
  p.mask_sn = in.mask.defined() ? in.mask.stride(1) : 0;
  p.dq = mem.template out<T>(dq, "grad_q");
  p.dk = mem.template out<T>(dk, "grad_k");
  p.dv = mem.template out<T>(dv, "grad_v");
  const Strides4 sdq = strides_bnhd(dq, layout), sdk = strides_bnhd(dk, layout), sdv = strides_bnhd(dv, layout);
  p.dq_sb = sdq.b, p.dq_sn = sdq.n, p.dq_sh = sdq.h;
  p.dk_sb = sdk.b, p.dk_sn = sdk.n, p.dk_sh = sdk.h;
  p.dv_sb = sdv.b, p.dv_sn = sdv.n, p.dv_sh = sdv.h;
  p.qh = mem.template out<float>(qh, "q_hat");
  p.kh = mem.template out<float>(kh, "k_hat");
  p.qh16 = tc ? mem.template out<T>(qh16, "q_hat16") : nullptr;
  p.kh16 = tc ? mem.template out<T>(kh16, "k_hat16") : nullptr;
  p.rstd_q = rstd_q.defined() ? mem.template out<float>(rstd_q, "rstd_q") : nullptr;
  p.rstd_k = rstd_k.defined() ? mem.template out<float>(rstd_k, "rstd_k") : nullptr;
  p.delta = mem.template out<float>(delta, "delta");
  p.dqh = in.deterministic ? mem.template out<float>(dqh, "dq_hat_slabs") : mem.template inout<float>(dqh, "dq_hat");
  p.dkh = mem.template out<float>(dkh, "dk_hat");
  p.dw_part = mem.template out<float>(dw_part, "dw_partials");
  p.dw = mem.template out<float>(dw, "dw");
  p.slab_stride = slab_elems;
  p.B = int(d.B), p.H = int(d.H), p.Nq = int(d.Nq), p.Nk = int(d.Nk), p.D = int(d.D);
  p.num_slabs = int(slabs);
  p.key_blocks_per_cta = int(per_cta);
  p.deterministic = in.deterministic ? 1 : 0;
  p.dw_blocks = int(dw_blocks);
  p.dw_rows_q = (rows_q + dw_blocks - 1) / dw_blocks;
  p.dw_rows_k = (rows_k + dw_blocks - 1) / dw_blocks;
  p.scale = float(in.scale);
  p.scale_log2 = float(in.scale * 1.4426950408889634);
  p.eps = float(in.eps);
  p.rope_h = int(in.rope_h), p.rope_w = int(in.rope_w);
  at::Tensor rope_cos, rope_sin;
  if (in.rope_h > 0) {
    // Device-side ops in fp64 (no host sync): angle = pos · θ^(-2p/(Dh/2)), rows then columns.
    const auto f64 = q.options().dtype(at::kDouble);
    const at::Tensor freq = at::pow(at::full({}, in.theta, f64), at::arange(d.D / 4, f64).mul(-2.0 / double(d.D / 2)));
    const at::Tensor pos = at::cat({at::arange(in.rope_h, f64), at::arange(in.rope_w, f64)});
    const at::Tensor ang = at::outer(pos, freq);
    rope_cos = ang.cos().to(at::kFloat).contiguous();
    rope_sin = ang.sin().to(at::kFloat).contiguous();
  }
  p.rope_cos = static_cast<const float*>(map_in<Mem, float>(mem, rope_cos, "rope_cos"));
  p.rope_sin = static_cast<const float*>(map_in<Mem, float>(mem, rope_sin, "rope_sin"));

  const int64_t row_blocks = std::min<int64_t>((std::max(rows_q, rows_k) + kRowWarps - 1) / kRowWarps, 1 << 20);
  launch(attention_bwd_preprocess_kernel<E, kCols>, dim3(unsigned(row_blocks), 2), dim3(kRowThreads), 0, p);
  const dim3 grid(unsigned(ctas_x), unsigned(d.H), unsigned(d.B));
  if (tc) launch_tc<E, MaxD>(launch, d.D, grid, p);
  else launch(attention_bwd_simt_kernel<Cfg, E>, grid, dim3(Cfg::kThreads), size_t(Cfg::smem_floats(p.D)) * sizeof(float), p);
  launch(attention_bwd_prologue_backward_kernel<E, kCols>, dim3(unsigned(dw_blocks), 2), dim3(kRowThreads),
         size_t(kRowWarps) * size_t(d.D) * sizeof(float), p);
  if (in.qw.defined() || in.kw.defined())
    launch(attention_bwd_dw_reduce_kernel<8>, dim3(unsigned((d.D + 31) / 32), 2), dim3(256), 0, p);
  mem.sync();

  auto finish = [&](const at::Tensor& w, int64_t i) {
    if (!w.defined()) return at::zeros({0}, q.options());
    return dw.select(0, i).to(w.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  };
  return {dq, dk, dv, finish(in.qw, 0), finish(in.kw, 1)};
}

template <class Mem, class Launch>
Grads run(Mem& mem, Launch& launch, const at::Tensor& dout_, const std::optional<at::Tensor>& dlse,
          const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
          const at::Tensor& lse, const std::optional<at::Tensor>& qw, const std::optional<at::Tensor>& kw,
          const std::optional<at::Tensor>& mask, double scale, double eps, int64_t rope_h, int64_t rope_w,
          double theta, int64_t layout, bool deterministic, int64_t key_blocks_per_cta = 0, int64_t mainloop = 0) {
  check_args(q_, k_, v_, qw, kw, mask, rope_h, rope_w, layout);
  const at::ScalarType st = q_.scalar_type();
  RAEKERN_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, kOp, "q",
                "must be float32, bfloat16 or float16 for the CUDA backward, got ", st);
  const Dims d = dims_of(q_, k_, layout);
  check_backward_args(dout_, out_, lse, dlse, q_, d);
  Inputs in;
  in.q = unit_last(q_), in.k = unit_last(k_), in.v = unit_last(v_);
  in.dout = unit_last(dout_), in.out = unit_last(out_);
  RAEKERN_CHECK(d.H <= 65535 && d.B <= 65535, kOp, "q", "batch and heads must be <= 65535 on CUDA, got ",
                q_.sizes());
  RAEKERN_CHECK(d.Nq < (int64_t(1) << 31) && d.Nk < (int64_t(1) << 31), kOp, "q", "sequence too long");
  in.lse = lse;
  if (dlse) in.dlse = *dlse;
  if (qw) in.qw = *qw;
  if (kw) in.kw = *kw;
  if (mask) in.mask = *mask;
  in.scale = scale, in.eps = eps, in.theta = theta;
  in.rope_h = rope_h, in.rope_w = rope_w, in.layout = layout;
  in.deterministic = deterministic;
  in.key_blocks_per_cta = key_blocks_per_cta;
  RAEKERN_CHECK(mainloop >= 0 && mainloop <= 2, kOp, "mainloop", "must be 0 (auto), 1 (SIMT) or 2 (tensor cores), got ",
                mainloop);
  in.mainloop = mainloop;
  auto by_dim = [&](auto tag) -> Grads {
    using T = decltype(tag);
    switch (head_dim_bucket(d.D)) {
      case 64: return run_typed<T, 64>(mem, launch, in);
      case 96: return run_typed<T, 96>(mem, launch, in);
      case 128: return run_typed<T, 128>(mem, launch, in);
      default: return run_typed<T, 256>(mem, launch, in);
    }
  };
  if (st == at::kFloat) return by_dim(float{});
  if (st == at::kBFloat16) return by_dim(c10::BFloat16{});
  return by_dim(c10::Half{});
}

}  // namespace raekern::attention::bwd
