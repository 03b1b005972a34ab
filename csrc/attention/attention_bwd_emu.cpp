// The CUDA attention backward (attention_bwd_host.h's plan and its four SIMT kernels) run on the
// host emulation, for python_tests/test_attention.py: torch.ops.raekern_emu.attention_bwd takes
// attention_backward's arguments plus key_blocks_per_cta (0 = the CUDA launcher's choice; > 1 makes
// the deterministic mode accumulate several key blocks into one slab) and mainloop (0 = the
// launcher's choice, 1 = SIMT, 2 = tensor cores).
// Compiles to nothing in a checkout without the host emulation (the tests then skip).
#if defined(RAEKERN_HOST_EMULATION) && __has_include("common/emulation_torch.h")
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/attention_bwd_host.h"
#include "common/emulation_torch.h"

namespace raekern::attention {
namespace {

bwd::Grads attention_bwd_emu(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             const std::optional<at::Tensor>& qw, const std::optional<at::Tensor>& kw,
                             const std::optional<at::Tensor>& mask, double scale, double eps, int64_t rope_h,
                             int64_t rope_w, double theta, int64_t layout, bool deterministic,
                             int64_t key_blocks_per_cta, int64_t mainloop) {
  RAEKERN_CHECK(key_blocks_per_cta >= 0, "attention_bwd", "key_blocks_per_cta", "must be >= 0, got ",
                key_blocks_per_cta);
  emu::Mem mem;
  emu::Launch launch;
  return bwd::run(mem, launch, dout, dlse, q, k, v, out, lse, qw, kw, mask, scale, eps, rope_h, rope_w, theta,
                  layout, deterministic, key_blocks_per_cta, mainloop);
}

}  // namespace
}  // namespace raekern::attention

TORCH_LIBRARY_FRAGMENT(raekern_emu, m) {
  m.def(
      "attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? q_norm_weight, Tensor? k_norm_weight, Tensor? key_padding_mask, float scale, float norm_eps, "
      "int rope_h, int rope_w, float rope_theta, int layout, bool deterministic, int key_blocks_per_cta=0, "
      "int mainloop=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(raekern_emu, CPU, m) { m.impl("attention_bwd", &raekern::attention::attention_bwd_emu); }
#endif
