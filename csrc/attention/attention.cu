// CUDA launcher of raekern::attention (forward only): argument checks, dtype / head-dim / alignment
// dispatch to the sm80 mma.sync kernel, current stream, no host synchronisation.
// NOT YET RUN ON A GPU — compiled for sm_80 and sm_90a; the GPU check (benchmarks/gpu_check.sh)
// verifies it. raekern.ops.attention routes only bf16/fp16, Dh ∈ {64, 72, 128}, inference calls
// here; everything else goes to the CPU kernel or the SDPA fallback. attention_backward has no
// CUDA kernel yet.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "attention/attention_args.h"
#include "attention/attention_sm80_config.h"
#include "attention/attention_sm80_fwd_kernel.cuh"
#include "common/cuda_launch.h"

namespace raekern::attention::cuda {

namespace {

bool aligned16(const at::Tensor& t, int64_t layout) {
  const Strides4 s = strides_bnhd(t, layout);
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && s.b % 8 == 0 && s.n % 8 == 0 &&
         s.h % 8 == 0;
}

template <int HeadDim, class T>
void launch(const sm80::FwdParams& p, bool aligned) {
  using Cfg = sm80::FwdConfig<HeadDim>;
  static_assert(Cfg::kBlockM == Cfg::kBlockN, "the padding fill treats Q and both K buffers as one array");
  auto kernel = aligned ? sm80::attention_fwd_sm80_kernel<Cfg, T, true>
                        : sm80::attention_fwd_sm80_kernel<Cfg, T, false>;
  constexpr int smem = Cfg::kSmemBytes;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.Nq + Cfg::kBlockM - 1) / Cfg::kBlockM, p.H, p.B);
  kernel<<<grid, Cfg::kThreads, smem, current_stream()>>>(p);
  RAEKERN_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_dh(int64_t D, const sm80::FwdParams& p, bool aligned) {
  switch (D) {
    case 64: return launch<64, T>(p, aligned);
    case 72: return launch<72, T>(p, aligned);
    case 128: return launch<128, T>(p, aligned);
    default: RAEKERN_CHECK(false, kOp, "q", "head dim ", D, " has no CUDA tile config (64, 72, 128)");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                  const at::Tensor& v_, const std::optional<at::Tensor>& qw,
                                                  const std::optional<at::Tensor>& kw,
                                                  const std::optional<at::Tensor>& mask, double scale,
                                                  double eps, int64_t rope_h, int64_t rope_w, double theta,
                                                  int64_t layout) {
  check_args(q_, k_, v_, qw, kw, mask, rope_h, rope_w, layout);
  RAEKERN_CHECK(q_.scalar_type() == at::kBFloat16 || q_.scalar_type() == at::kHalf, kOp, "q",
                "must be bfloat16 or float16 on CUDA (tensor-core kernel), got ", q_.scalar_type());
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  const Dims d = dims_of(q, k, layout);
  RAEKERN_CHECK(d.H <= 65535 && d.B <= 65535, kOp, "q", "batch and heads must be <= 65535 on CUDA, got ",
                q.sizes());
  at::Tensor out = empty_in_layout(d, d.Nq, layout, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Nq}, q.options().dtype(at::kFloat));
  // Norm weights in fp32 (a device-side cast, no host sync); held until the launch is queued.
  const at::Tensor qw32 = qw ? qw->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor kw32 = kw ? kw->to(at::kFloat).contiguous() : at::Tensor();
  sm80::FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_norm = qw ? qw32.data_ptr<float>() : nullptr;
  p.k_norm = kw ? kw32.data_ptr<float>() : nullptr;
  p.mask = mask ? mask->data_ptr<bool>() : nullptr;
  const Strides4 sq = strides_bnhd(q, layout), sk = strides_bnhd(k, layout), sv = strides_bnhd(v, layout),
                 so = strides_bnhd(out, layout);
  p.q_sb = sq.b, p.q_sn = sq.n, p.q_sh = sq.h;
  p.k_sb = sk.b, p.k_sn = sk.n, p.k_sh = sk.h;
  p.v_sb = sv.b, p.v_sn = sv.n, p.v_sh = sv.h;
  p.o_sb = so.b, p.o_sn = so.n, p.o_sh = so.h;
  p.mask_sb = mask ? mask->stride(0) : 0;
  p.mask_sn = mask ? mask->stride(1) : 0;
  p.B = int(d.B), p.H = int(d.H), p.Nq = int(d.Nq), p.Nk = int(d.Nk);
  RAEKERN_CHECK(d.Nq < (int64_t(1) << 31) && d.Nk < (int64_t(1) << 31), kOp, "q", "sequence too long");
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.eps = float(eps);
  p.rope_h = int(rope_h), p.rope_w = int(rope_w);
  p.log2_theta = float(std::log2(theta));
  const bool aligned = aligned16(q, layout) && aligned16(k, layout) && aligned16(v, layout);
  if (q.scalar_type() == at::kBFloat16)
    launch_dh<__nv_bfloat16>(d.D, p, aligned);
  else
    launch_dh<__half>(d.D, p, aligned);
  return {out, lse};
}

}  // namespace raekern::attention::cuda

TORCH_LIBRARY_IMPL(raekern, CUDA, m) { m.impl("attention", &raekern::attention::cuda::attention_cuda); }
