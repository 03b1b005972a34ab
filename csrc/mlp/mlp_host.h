// Host side of the mlp family, shared by the CPU, CUDA and emulated registrations: argument checks
// (errors name the op and the argument), output allocation, and the joint collapse of every
// operand's strides into the Params the kernels take (mlp_params.h). Backends provide two kernels.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "mlp/mlp_params.h"
#include "common/output_alloc.h"

namespace raekern::mlp {

struct Backend {
  void (*forward)(const Params&, at::ScalarType);
  void (*backward)(const Params&, at::ScalarType);
};

namespace detail {

// Fills p.ndim/size/rows/cols and each operand's strides; false when the operands' layouts leave
// more than kMaxDims dimensions that cannot be merged (the caller then compacts the inputs).
inline bool collapse(at::IntArrayRef shape, const std::vector<std::pair<Operand*, at::Tensor>>& ops, Params& p) {
  const size_t K = ops.size();
  std::vector<int64_t> size;                   // innermost first
  std::vector<std::vector<int64_t>> stride(K);  // innermost first
  for (int64_t d = int64_t(shape.size()) - 1; d >= 0; --d) {
    if (shape[d] == 1) continue;
    bool merge = !size.empty();
    for (size_t k = 0; k < K && merge; ++k) merge = ops[k].second.stride(d) == stride[k].back() * size.back();
    if (merge) {
      size.back() *= shape[d];  // the merged dimension keeps the stride of its innermost part
      continue;
    }
    size.push_back(shape[d]);
    for (size_t k = 0; k < K; ++k) stride[k].push_back(ops[k].second.stride(d));
  }
  if (size.empty()) {
    size.push_back(1);
    for (auto& s : stride) s.push_back(1);
  }
  if (size.size() > size_t(kMaxDims)) return false;
  const int n = int(size.size());
  p.ndim = n;
  p.rows = 1;
  for (int d = 0; d < n; ++d) {
    p.size[d] = size[n - 1 - d];
    if (d < n - 1) p.rows *= p.size[d];
  }
  p.cols = p.size[n - 1];
  for (size_t k = 0; k < K; ++k) {
    Operand& o = *ops[k].first;
    o.ptr = ops[k].second.data_ptr();
    for (int d = 0; d < n; ++d) o.stride[d] = stride[k][n - 1 - d];
  }
  return true;
}

inline void check_input(const at::Tensor& t, const char* op, const char* arg) {
  check_floating(t, op, arg);
  check_min_dim(t, 1, op, arg);
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, at::IntArrayRef shape, const char* op,
                       const char* arg, const char* what) {
  check_floating(t, op, arg);
  check_same_device(t, ref, op, arg);
  check_same_dtype(t, ref, op, arg);
  RAEKERN_CHECK(t.sizes() == shape, op, arg, "must have the shape of ", what, " ", shape, ", got ", t.sizes());
}

inline void check_packed(const at::Tensor& ab, const char* op) {
  check_input(ab, op, "ab");
  RAEKERN_CHECK(ab.size(-1) % 2 == 0, op, "ab",
                "must have an even last dimension ([..., 2H]: a then b), got shape ", ab.sizes());
}

inline std::vector<int64_t> half_shape(const at::Tensor& ab) {
  std::vector<int64_t> s(ab.sizes().begin(), ab.sizes().end());
  s.back() /= 2;
  return s;
}

inline int cuda_index(const at::Tensor& t) { return t.is_cuda() ? t.device().index() : -1; }

// Runs the forward with out (contiguous, allocated by the caller) = silu(a)·b.
inline void forward(const Backend& be, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  if (out.numel() == 0) return;
  Params p;
  p.device = cuda_index(a);
  at::Tensor ac = a, bc = b;  // keep compacted copies alive through the launch
  if (!collapse(a.sizes(), {{&p.a, a}, {&p.b, b}, {&p.out, out}}, p)) {
    // Rare: more than kMaxDims non-mergeable dimensions; compact inputs always collapse.
    ac = a.contiguous(), bc = b.contiguous();
    const bool ok = collapse(a.sizes(), {{&p.a, ac}, {&p.b, bc}, {&p.out, out}}, p);
    TORCH_INTERNAL_ASSERT(ok);
  }
  be.forward(p, a.scalar_type());
}

inline void backward(const Backend& be, const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& da, const at::Tensor& db) {
  if (da.numel() == 0) return;
  Params p;
  p.device = cuda_index(a);
  at::Tensor gc = grad, ac = a, bc = b;
  if (!collapse(a.sizes(), {{&p.grad, grad}, {&p.a, a}, {&p.b, b}, {&p.da, da}, {&p.db, db}}, p)) {
    // da/db are contiguous or the halves of one contiguous d(ab): only the inputs can block merging.
    gc = grad.contiguous(), ac = a.contiguous(), bc = b.contiguous();
    const bool ok = collapse(a.sizes(), {{&p.grad, gc}, {&p.a, ac}, {&p.b, bc}, {&p.da, da}, {&p.db, db}}, p);
    TORCH_INTERNAL_ASSERT(ok);
  }
  be.backward(p, a.scalar_type());
}

}  // namespace detail

inline at::Tensor swiglu(const Backend& be, const at::Tensor& a, const at::Tensor& b) {
  const char* op = "swiglu";
  detail::check_input(a, op, "a");
  detail::check_like(b, a, a.sizes(), op, "b", "a");
  at::Tensor out = ::raekern::empty_output(a.sizes(), a.options().memory_format(at::MemoryFormat::Contiguous));
  detail::forward(be, a, b, out);
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> swiglu_backward(const Backend& be, const at::Tensor& grad,
                                                          const at::Tensor& a, const at::Tensor& b) {
  const char* op = "swiglu_backward";
  detail::check_input(a, op, "a");
  detail::check_like(b, a, a.sizes(), op, "b", "a");
  detail::check_like(grad, a, a.sizes(), op, "grad", "a");
  const auto opt = a.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor da = ::raekern::empty_output(a.sizes(), opt), db = ::raekern::empty_output(a.sizes(), opt);
  detail::backward(be, grad, a, b, da, db);
  return {da, db};
}

inline at::Tensor swiglu_packed(const Backend& be, const at::Tensor& ab) {
  detail::check_packed(ab, "swiglu_packed");
  const int64_t H = ab.size(-1) / 2;
  at::Tensor out = ::raekern::empty_output(detail::half_shape(ab), ab.options().memory_format(at::MemoryFormat::Contiguous));
  detail::forward(be, ab.narrow(-1, 0, H), ab.narrow(-1, H, H), out);
  return out;
}

inline at::Tensor swiglu_packed_backward(const Backend& be, const at::Tensor& grad, const at::Tensor& ab) {
  const char* op = "swiglu_packed_backward";
  detail::check_packed(ab, op);
  const int64_t H = ab.size(-1) / 2;
  const auto half = detail::half_shape(ab);
  detail::check_like(grad, ab, half, op, "grad", "half of ab");
  at::Tensor dab = ::raekern::empty_output(ab.sizes(), ab.options().memory_format(at::MemoryFormat::Contiguous));
  detail::backward(be, grad, ab.narrow(-1, 0, H), ab.narrow(-1, H, H), dab.narrow(-1, 0, H), dab.narrow(-1, H, H));
  return dab;
}

template <const Backend* be>
inline void register_impls(torch::Library& m) {
  m.impl("swiglu", [](const at::Tensor& a, const at::Tensor& b) { return swiglu(*be, a, b); });
  m.impl("swiglu_backward", [](const at::Tensor& g, const at::Tensor& a, const at::Tensor& b) {
    return swiglu_backward(*be, g, a, b);
  });
  m.impl("swiglu_packed", [](const at::Tensor& ab) { return swiglu_packed(*be, ab); });
  m.impl("swiglu_packed_backward", [](const at::Tensor& g, const at::Tensor& ab) {
    return swiglu_packed_backward(*be, g, ab);
  });
}

}  // namespace raekern::mlp
