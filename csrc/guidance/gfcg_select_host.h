// Host-side argument handling of raekern::gfcg_select, shared by the CPU kernel, the CUDA launcher
// and the host emulation: the checks every device makes, contiguous inputs and the four outputs.
// Device-specific checks (target values on the CPU; fp64 and devices on CUDA) stay with the caller.
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"

namespace raekern::guidance {

struct PreparedSelect {
  at::Tensor logits, target;           // contiguous; target as int64
  at::Tensor ref, weight, p_target, p_ref;  // [B] outputs
  int64_t B = 0, C = 0;
};

inline PreparedSelect prepare_select(const at::Tensor& logits, const at::Tensor& target) {
  constexpr const char* op = "gfcg_select";
  check_floating(logits, op, "logits");
  check_dim(logits, 2, op, "logits");
  PreparedSelect p;
  p.B = logits.size(0), p.C = logits.size(1);
  RAEKERN_CHECK(p.C >= 2, op, "logits", "must have at least 2 classes, got shape ", logits.sizes());
  RAEKERN_CHECK(target.dim() == 1 && target.size(0) == p.B, op, "target", "must have shape [", p.B,
                "], got ", target.sizes());
  p.logits = logits.contiguous();
  p.target = target.to(at::kLong).contiguous();
  const auto f32 = logits.options().dtype(at::kFloat);
  p.ref = at::empty({p.B}, logits.options().dtype(at::kLong));
  p.weight = at::empty({p.B}, f32);
  p.p_target = at::empty({p.B}, f32);
  p.p_ref = at::empty({p.B}, f32);
  return p;
}

}  // namespace raekern::guidance
