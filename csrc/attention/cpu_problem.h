// What the CPU forward and backward kernels share: raw pointers and (b, n, h, d) strides of every
// operand, the QK-norm weights widened once, the RoPE table, and the per-batch list of kept keys.
#pragma once
#include <ATen/core/Tensor.h>
#include <cmath>
#include <optional>
#include <vector>

#include "attention/attention_args.h"
#include "attention/cpu_prologue.h"

namespace raekern::attention::cpu {

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
inline int64_t round64(int64_t n) { return (n + 63) / 64 * 64; }
// Row stride of the row-major panels: the padded head dim plus one vector, so rows do not all
// land in the same few L1 sets when Dh is a multiple of 64.
inline int64_t panel_ld(int64_t D) { return round16(D) + 16; }
// Transposed panels ([Dh][64 keys] blocks): element (i, key j).
inline int64_t tpanel_index(int64_t D, int64_t i, int64_t j) { return (j / 64) * D * 64 + i * 64 + j % 64; }

template <class T, class C> struct Problem {
  Dims d;
  int64_t Dp;  // head dim padded to 16 lanes for the row-major panels
  int64_t ld;  // their row stride
  const T *q, *k, *v;
  Strides4 sq, sk, sv;
  std::vector<C> qw, kw;  // empty: no QK-norm
  C eps;
  double scale;
  RopeTable<C> rope;
  const bool* mask = nullptr;
  int64_t smb = 0, smn = 0;

  Problem(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
          const std::optional<at::Tensor>& qw_, const std::optional<at::Tensor>& kw_,
          const std::optional<at::Tensor>& mask_, double scale_, double eps_, int64_t rh, int64_t rw,
          double theta, int64_t layout)
      : d(dims_of(q_, k_, layout)),
        Dp(round16(d.D)),
        ld(panel_ld(d.D)),
        q(q_.data_ptr<T>()),
        k(k_.data_ptr<T>()),
        v(v_.data_ptr<T>()),
        sq(strides_bnhd(q_, layout)),
        sk(strides_bnhd(k_, layout)),
        sv(strides_bnhd(v_, layout)),
        eps(C(eps_)),
        scale(scale_),
        rope(rh, rw, d.D, theta) {
    auto widen_weight = [](const std::optional<at::Tensor>& w, std::vector<C>& out) {
      if (!w) return;
      const at::Tensor t = w->to(sizeof(C) == 8 ? at::kDouble : at::kFloat).contiguous();
      out.assign(t.data_ptr<C>(), t.data_ptr<C>() + t.numel());
    };
    widen_weight(qw_, qw);
    widen_weight(kw_, kw);
    if (mask_) {
      mask = mask_->data_ptr<bool>();
      smb = mask_->stride(0);
      smn = mask_->stride(1);
    }
  }

  const C* qwp() const { return qw.empty() ? nullptr : qw.data(); }
  const C* kwp() const { return kw.empty() ? nullptr : kw.data(); }
  const T* q_row(int64_t b, int64_t n, int64_t h) const { return q + b * sq.b + n * sq.n + h * sq.h; }
  const T* k_row(int64_t b, int64_t n, int64_t h) const { return k + b * sk.b + n * sk.n + h * sk.h; }
  const T* v_row(int64_t b, int64_t n, int64_t h) const { return v + b * sv.b + n * sv.n + h * sv.h; }

  // Indices of the keys batch b attends to: masked keys are dropped from the panels altogether.
  void kept_keys(int64_t b, std::vector<int64_t>& idx) const {
    idx.clear();
    for (int64_t n = 0; n < d.Nk; ++n)
      if (!mask || mask[b * smb + n * smn]) idx.push_back(n);
  }
};

}  // namespace raekern::attention::cpu
