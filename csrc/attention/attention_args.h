// Host-side argument handling shared by the CPU and CUDA attention launchers: validation with
// errors naming the argument, and the view of q/k/v/out as (b, n, h, d) strides whatever the layout.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <optional>

#include "common/checks.h"
#include "common/output_alloc.h"

namespace raekern::attention {

constexpr const char* kOp = "attention";

// (b, n, h, d) strides of a tensor stored in `layout`.
struct Strides4 {
  int64_t b, n, h, d;
};

inline Strides4 strides_bnhd(const at::Tensor& t, int64_t layout) {
  if (layout == 0) return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  return {t.stride(0), t.stride(2), t.stride(1), t.stride(3)};
}

// Whether every (b, n, h) row of a 16-bit tensor starts 16-byte aligned: the tensor-core kernels
// move rows by 16-byte cp.async chunks.
inline bool aligned16(const at::Tensor& t, int64_t layout) {
  const Strides4 s = strides_bnhd(t, layout);
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && s.b % 8 == 0 && s.n % 8 == 0 && s.h % 8 == 0;
}

struct Dims {
  int64_t B, H, Nq, Nk, D;
};

inline Dims dims_of(const at::Tensor& q, const at::Tensor& k, int64_t layout) {
  const int64_t n_dim = layout == 0 ? 1 : 2, h_dim = layout == 0 ? 2 : 1;
  return {q.size(0), q.size(h_dim), q.size(n_dim), k.size(n_dim), q.size(3)};
}

// Kernels read the last dimension with unit stride; anything else (rare) is made contiguous once.
inline at::Tensor unit_last(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous();
}

inline at::Tensor empty_in_layout(const Dims& d, int64_t n, int64_t layout, const at::TensorOptions& o) {
  return layout == 0 ? ::raekern::empty_output({d.B, n, d.H, d.D}, o) : ::raekern::empty_output({d.B, d.H, n, d.D}, o);
}

inline void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& qw, const std::optional<at::Tensor>& kw,
                       const std::optional<at::Tensor>& mask, int64_t rope_h, int64_t rope_w,
                       int64_t layout) {
  RAEKERN_CHECK(layout == 0 || layout == 1, kOp, "layout", "must be 0 (bnhd) or 1 (bhnd), got ", layout);
  check_floating(q, kOp, "q");
  check_dim(q, 4, kOp, "q");
  check_dim(k, 4, kOp, "k");
  check_dim(v, 4, kOp, "v");
  check_same_dtype(k, q, kOp, "k");
  check_same_dtype(v, q, kOp, "v");
  check_same_device(k, q, kOp, "k");
  check_same_device(v, q, kOp, "v");
  const Dims d = dims_of(q, k, layout);
  const int64_t n_dim = layout == 0 ? 1 : 2, h_dim = layout == 0 ? 2 : 1;
  RAEKERN_CHECK(k.size(0) == d.B && k.size(h_dim) == d.H && k.size(3) == d.D, kOp, "k",
                "must match q in batch, heads and head dim, got ", k.sizes(), " vs q ", q.sizes());
  RAEKERN_CHECK(v.sizes() == k.sizes(), kOp, "v", "must have the shape of k ", k.sizes(), ", got ",
                v.sizes());
  RAEKERN_CHECK(d.Nq >= 1 && d.Nk >= 1 && d.B >= 1 && d.H >= 1, kOp, "q",
                "must have non-empty batch, heads and tokens, got ", q.sizes(), " and k ", k.sizes());
  RAEKERN_CHECK(d.D >= 1 && d.D <= 256, kOp, "q", "head dim must be in [1, 256], got ", d.D);
  (void)n_dim;
  if (qw) {
    check_floating(*qw, kOp, "q_norm_weight");
    RAEKERN_CHECK(qw->dim() == 1 && qw->size(0) == d.D, kOp, "q_norm_weight", "must have shape [",
                  d.D, "], got ", qw->sizes());
    check_same_device(*qw, q, kOp, "q_norm_weight");
  }
  if (kw) {
    check_floating(*kw, kOp, "k_norm_weight");
    RAEKERN_CHECK(kw->dim() == 1 && kw->size(0) == d.D, kOp, "k_norm_weight", "must have shape [",
                  d.D, "], got ", kw->sizes());
    check_same_device(*kw, q, kOp, "k_norm_weight");
  }
  if (mask) {
    RAEKERN_CHECK(mask->scalar_type() == at::kBool, kOp, "key_padding_mask", "must be bool, got ",
                  mask->scalar_type());
    RAEKERN_CHECK(mask->dim() == 2 && mask->size(0) == d.B && mask->size(1) == d.Nk, kOp,
                  "key_padding_mask", "must have shape [", d.B, ", ", d.Nk, "], got ", mask->sizes());
    check_same_device(*mask, q, kOp, "key_padding_mask");
  }
  RAEKERN_CHECK(rope_h >= 0 && rope_w >= 0 && (rope_h == 0) == (rope_w == 0), kOp, "rope_grid",
                "must be two positive ints (or both 0 for no RoPE), got (", rope_h, ", ", rope_w, ")");
  RAEKERN_CHECK(rope_h == 0 || d.D % 4 == 0, kOp, "rope_grid",
                "needs a head dim divisible by 4 (two halves of interleaved pairs), got ", d.D);
}

// The backward's extra operands (after check_args): grad_out / out like q, lse [B, H, Nq] fp32/fp64,
// grad_lse like lse. Shared by the CPU and CUDA backward launchers.
inline void check_backward_args(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                                const std::optional<at::Tensor>& dlse, const at::Tensor& q, const Dims& d) {
  RAEKERN_CHECK(dout.sizes() == q.sizes(), kOp, "grad_out", "must have the shape of q ", q.sizes(), ", got ",
                dout.sizes());
  RAEKERN_CHECK(out.sizes() == q.sizes(), kOp, "out", "must have the shape of q ", q.sizes(), ", got ",
                out.sizes());
  check_same_dtype(dout, q, kOp, "grad_out");
  check_same_dtype(out, q, kOp, "out");
  check_same_device(dout, q, kOp, "grad_out");
  check_same_device(out, q, kOp, "out");
  RAEKERN_CHECK(lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.H && lse.size(2) == d.Nq &&
                    (lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble),
                kOp, "lse", "must be float32/float64 of shape [", d.B, ", ", d.H, ", ", d.Nq, "], got ",
                lse.scalar_type(), " ", lse.sizes());
  check_same_device(lse, q, kOp, "lse");
  if (dlse) {
    RAEKERN_CHECK(dlse->sizes() == lse.sizes(), kOp, "grad_lse", "must have the shape of lse ", lse.sizes(),
                  ", got ", dlse->sizes());
    check_same_device(*dlse, q, kOp, "grad_lse");
  }
}

}  // namespace raekern::attention
