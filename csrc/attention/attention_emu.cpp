// The attention family's CUDA forward run on the host emulation, for python_tests/test_attention.py:
// the SIMT prologue (QK-norm + RoPE) and softmax epilogue on their own, and the whole sm80 forward
// (attention_fwd_host.h's plan; mma.sync, ldmatrix and cp.async emulated by common/tensor_core.cuh)
// as torch.ops.raekern_emu.attention with the schema of raekern::attention.
// Compiles to nothing in a checkout without the host emulation (the tests then skip).
#if defined(RAEKERN_HOST_EMULATION) && __has_include("common/emulation_torch.h")
#include <torch/library.h>

#include <cmath>

#include "attention/attention_emu_kernel.cuh"
#include "attention/attention_fwd_host.h"
#include "common/checks.h"
#include "common/emulation_torch.h"

namespace raekern::attention {
namespace {

// x [B, N, H, Dh] -> rope(norm(x)) with the prologue's device function, two threads per row.
at::Tensor prologue_emu(const at::Tensor& x, const std::optional<at::Tensor>& w, double eps, int64_t gh,
                        int64_t gw, double theta) {
  RAEKERN_CHECK(x.dim() == 4, "attention_prologue", "x", "must be [B, N, H, Dh], got ", x.sizes());
  RAEKERN_CHECK(x.size(3) % 2 == 0 && (gh == 0 || x.size(3) % 4 == 0), "attention_prologue", "x",
                "head dim must be even (divisible by 4 with RoPE), got ", x.size(3));
  const int64_t B = x.size(0), N = x.size(1), H = x.size(2), D = x.size(3), rows = B * N * H;
  const int64_t padded = (rows + 31) / 32 * 32;
  at::Tensor buf = at::zeros({padded, D}, x.options());
  buf.narrow(0, 0, rows).copy_(x.reshape({rows, D}));
  const at::Tensor w32 = w ? w->to(at::kFloat).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "attention_prologue_emu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      emu::DeviceMemory mem;
      auto* xp = mem.inout<scalar_t>(buf, "x");
      const float* wp = w ? mem.in<float>(w32, "w") : nullptr;
      emu::emulate_launch(simt_dev::prologue_rows_kernel<emu::emu_t<scalar_t>>, dim3(unsigned(padded / 32)),
                          dim3(64), 0, xp, int(D), int(H), int(N), wp, float(eps), int(gh), int(gw),
                          float(std::log2(theta)));
      mem.finish();
    } else {
      RAEKERN_CHECK(false, "attention_prologue", "x", "must be float32/bfloat16/float16 (device types)");
    }
  });
  return buf.narrow(0, 0, rows).reshape({B, N, H, D});
}

std::tuple<at::Tensor, at::Tensor> finalize_emu(const at::Tensor& m, const at::Tensor& l) {
  const at::Tensor mc = m.to(at::kFloat).contiguous(), lc = l.to(at::kFloat).contiguous();
  at::Tensor inv = at::empty_like(mc), lse = at::empty_like(mc);
  emu::DeviceMemory mem;
  const int n = int(mc.numel());
  emu::emulate_launch(simt_dev::softmax_finalize_kernel, dim3(unsigned((n + 63) / 64)), dim3(64), 0,
                      mem.in<float>(mc, "m"), mem.in<float>(lc, "l"), mem.out<float>(inv, "inv_l"),
                      mem.out<float>(lse, "lse"), n);
  mem.finish();
  return {inv, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_sm80_emu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& qw,
                                                      const std::optional<at::Tensor>& kw,
                                                      const std::optional<at::Tensor>& mask, double scale,
                                                      double eps, int64_t rope_h, int64_t rope_w, double theta,
                                                      int64_t layout) {
  emu::Mem mem;
  emu::Launch launch;
  return fwd::run(mem, launch, q, k, v, qw, kw, mask, scale, eps, rope_h, rope_w, theta, layout);
}

}  // namespace
}  // namespace raekern::attention

TORCH_LIBRARY_FRAGMENT(raekern_emu, m) {
  m.def("attention_prologue(Tensor x, Tensor? w, float eps, int grid_h, int grid_w, float theta) -> Tensor");
  m.def("attention_softmax_finalize(Tensor m, Tensor l) -> (Tensor, Tensor)");
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? q_norm_weight, Tensor? k_norm_weight, "
      "Tensor? key_padding_mask, float scale, float norm_eps, int rope_h, int rope_w, float rope_theta, "
      "int layout) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(raekern_emu, CPU, m) {
  m.impl("attention_prologue", &raekern::attention::prologue_emu);
  m.impl("attention_softmax_finalize", &raekern::attention::finalize_emu);
  m.impl("attention", &raekern::attention::attention_sm80_emu);
}
#endif
