// Host side of the norm family, shared by the CPU and CUDA registrations: argument checks (errors
// name the op and the argument), output allocation, and the translation of tensors into the
// stride-based FwdParams/BwdParams the kernels take. Backends only provide the two kernels.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "norm/norm_params.h"
#include "common/output_alloc.h"

namespace raekern::norm {

using OptTensor = std::optional<at::Tensor>;

struct Backend {
  void (*forward)(const FwdParams&, at::ScalarType);
  void (*backward)(const BwdParams&, at::ScalarType);
  int64_t (*workers)(const at::Tensor& like);  // parallel workers the reduction tasks should fill
  int64_t min_rows_per_task;
};

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline Kind parse_kind(c10::string_view kind, const char* op) {
  if (kind == "layer") return Kind::Layer;
  if (kind == "rms") return Kind::Rms;
  RAEKERN_CHECK(false, op, "kind", "must be 'layer' or 'rms', got '", std::string(kind), "'");
  return Kind::None;
}

inline Operand operand(const at::Tensor& t) {
  Operand o;
  o.ptr = t.data_ptr();
  o.sb = t.size(0) == 1 ? 0 : t.stride(0);
  o.sn = t.size(1) == 1 ? 0 : t.stride(1);
  o.sd = t.size(2) == 1 ? 1 : t.stride(2);
  return o;
}

inline Operand operand(const OptTensor& t) { return t ? operand(*t) : Operand{}; }

// x as [P, N, D] with its own strides: 1-D and 2-D inputs gain leading 1s, >3-D inputs fold their
// leading dimensions (a copy only when those cannot be folded as a view).
inline at::Tensor as_rows3(const at::Tensor& x) {
  if (x.dim() == 1) return x.view({1, 1, x.size(0)});
  if (x.dim() == 2) return x.unsqueeze(0);
  if (x.dim() == 3) return x;
  return x.flatten(0, x.dim() - 3);
}

inline void check_input(const at::Tensor& x, const char* op, const char* arg, int64_t dim) {
  check_floating(x, op, arg);
  if (dim > 0) check_dim(x, dim, op, arg);
  else check_min_dim(x, 1, op, arg);
}

// A [B', N', D] operand that broadcasts to x's [B, N, D] (B' in {1, B}, N' in {1, N}).
inline void check_operand(const at::Tensor& t, const at::Tensor& x, const char* op, const char* arg) {
  check_floating(t, op, arg);
  check_same_device(t, x, op, arg);
  check_same_dtype(t, x, op, arg);
  check_dim(t, 3, op, arg);
  RAEKERN_CHECK(t.size(2) == x.size(2) && (t.size(0) == 1 || t.size(0) == x.size(0)) &&
                    (t.size(1) == 1 || t.size(1) == x.size(1)),
                op, arg, "of shape ", t.sizes(), " does not broadcast to the input's shape ", x.sizes());
}

// weight/bias: [D], any floating dtype; the kernels read them as a contiguous accumulator-typed copy.
inline at::Tensor affine_param(const OptTensor& t, const at::Tensor& x, int64_t D, const char* op,
                               const char* arg) {
  if (!t) return at::Tensor();
  check_floating(*t, op, arg);
  check_same_device(*t, x, op, arg);
  RAEKERN_CHECK(t->dim() == 1 && t->size(0) == D, op, arg, "must have shape [", D, "], got ", t->sizes());
  return t->to(acc_type(x.scalar_type())).contiguous();
}

struct FwdOut {
  at::Tensor x_out, out, mean, rstd;
};

// x [B, N, D]; gate/y/shift/scale as [B' , N', D] views (or absent).
inline FwdOut run_forward(const Backend& be, const char* op, const at::Tensor& x, const OptTensor& gate,
                          const OptTensor& y, const OptTensor& shift, const OptTensor& scale, Kind kind,
                          const OptTensor& weight, const OptTensor& bias, double eps) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  RAEKERN_CHECK(eps >= 0, op, "eps", "must be >= 0, got ", eps);
  for (auto [t, name] : {std::pair{&gate, "gate"}, {&y, "y"}, {&shift, "shift"}, {&scale, "scale"}})
    if (*t) check_operand(**t, x, op, name);
  at::Tensor w = affine_param(weight, x, D, op, "weight");
  at::Tensor b = affine_param(bias, x, D, op, "bias");
  const auto acc = acc_type(x.scalar_type());
  FwdOut r;
  r.mean = ::raekern::empty_output({B * N}, x.options().dtype(acc));
  r.rstd = ::raekern::empty_output({B * N}, x.options().dtype(acc));
  FwdParams p;
  p.B = B, p.N = N, p.D = D, p.kind = kind, p.eps = eps;
  p.device = x.is_cuda() ? x.device().index() : -1;
  p.x = operand(x), p.gate = operand(gate), p.y = operand(y);
  p.shift = operand(shift), p.scale = operand(scale);
  p.weight = w.defined() ? w.data_ptr() : nullptr;
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  if (gate) {
    r.x_out = ::raekern::empty_output({B, N, D}, x.options());
    p.x_out = r.x_out.data_ptr();
  }
  if (kind != Kind::None) {
    r.out = ::raekern::empty_output({B, N, D}, x.options());
    p.out = r.out.data_ptr();
  }
  p.mean = r.mean.data_ptr(), p.rstd = r.rstd.data_ptr();
  if (B * N * D > 0) be.forward(p, x.scalar_type());
  return r;
}

struct BwdOut {
  at::Tensor dx, dy, dgate, dshift, dscale, dweight, dbias;
};

namespace detail {
// Chooses how the gradient of `t` (shape [B', N', D]) is produced; PerRow grads are allocated here.
struct SlotPlan {
  GradSlot slot;
  at::Tensor rows;        // PerRow target
  bool sum_batch = false; // [1, N, D] operand with B > 1: per-row grads, then summed over the batch
};
inline SlotPlan plan_slot(const at::IntArrayRef shape, int64_t B, int64_t N, const at::TensorOptions& opt,
                          int32_t& num_partials) {
  SlotPlan s;
  const int64_t b = shape[0], n = shape[1], D = shape[shape.size() - 1];
  // n == 1 first: with a single token (N == 1) a per-sample or shared operand ([B,1,D], [D]) must still
  // be reduced through the partials, which the kernels always write; only true per-token operands
  // take per-row gradients.
  if (n == 1) {
    s.slot.mode = b == B ? GradMode::PerSample : GradMode::Global;
    s.slot.partial = num_partials++;
    return s;
  } else if (b == B && n == N) {
    s.slot.mode = GradMode::PerRow;
  } else {
    s.slot.mode = GradMode::PerRow;
    s.sum_batch = true;
  }
  s.rows = ::raekern::empty_output({B, N, D}, opt);
  s.slot.ptr = s.rows.data_ptr();
  return s;
}
}  // namespace detail

// xin is the tensor that was normalised (x, or x_out of the residual stage), [B, N, D].
// Gradients of broadcast operands come back in the operand's own [B', N', D] shape.
inline BwdOut run_backward(const Backend& be, const char* op, const OptTensor& dout, const OptTensor& dxo,
                           const at::Tensor& xin, const OptTensor& gate, const OptTensor& y,
                           const OptTensor& shift, const OptTensor& scale, Kind kind,
                           const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
                           const OptTensor& rstd) {
  const int64_t B = xin.size(0), N = xin.size(1), D = xin.size(2);
  const auto acc = acc_type(xin.scalar_type());
  for (auto [t, name] : {std::pair{&dout, "grad_out"}, {&dxo, "grad_x_out"}, {&gate, "gate"}, {&y, "y"},
                         {&shift, "shift"}, {&scale, "scale"}})
    if (*t) check_operand(**t, xin, op, name);
  at::Tensor w = affine_param(weight, xin, D, op, "weight");
  at::Tensor bi = affine_param(bias, xin, D, op, "bias");
  at::Tensor mu, rs;
  if (kind != Kind::None) {
    for (auto [t, name] : {std::pair{&mean, "mean"}, {&rstd, "rstd"}}) {
      if (kind == Kind::Rms && t == &mean) continue;  // RMSNorm has no mean
      RAEKERN_CHECK(t->has_value() && (*t)->numel() == B * N, op, name, "must hold ", B * N,
                    " statistics saved by the forward");
      check_same_device(**t, xin, op, name);
    }
    if (kind == Kind::Layer) mu = mean->to(acc).contiguous();
    rs = rstd->to(acc).contiguous();
  }
  BwdParams p;
  p.B = B, p.N = N, p.D = D, p.kind = kind;
  p.device = xin.is_cuda() ? xin.device().index() : -1;
  p.dout = operand(dout), p.dxo = operand(dxo), p.xin = operand(xin);
  p.gate = operand(gate), p.y = operand(y), p.scale = operand(scale);
  p.weight = w.defined() ? w.data_ptr() : nullptr;
  p.bias = bi.defined() ? bi.data_ptr() : nullptr;
  p.mean = mu.defined() ? mu.data_ptr() : nullptr;
  p.rstd = rs.defined() ? rs.data_ptr() : nullptr;

  BwdOut r;
  r.dx = ::raekern::empty_output({B, N, D}, xin.options());
  p.dx = r.dx.data_ptr();
  if (gate) {
    r.dy = ::raekern::empty_output({B, N, D}, xin.options());
    p.dy = r.dy.data_ptr();
  }
  int32_t np = 0;
  const auto opt = xin.options();
  std::vector<int64_t> dshape{1, 1, D};
  detail::SlotPlan sg, ssh, ssc, sw, sb;
  if (gate) sg = detail::plan_slot(gate->sizes(), B, N, opt, np);
  if (shift && kind != Kind::None) ssh = detail::plan_slot(shift->sizes(), B, N, opt, np);
  if (scale && kind != Kind::None) ssc = detail::plan_slot(scale->sizes(), B, N, opt, np);
  if (w.defined()) sw = detail::plan_slot(dshape, B, N, opt, np);
  if (bi.defined()) sb = detail::plan_slot(dshape, B, N, opt, np);
  p.dgate = sg.slot, p.dshift = ssh.slot, p.dscale = ssc.slot, p.dweight = sw.slot, p.dbias = sb.slot;

  const TaskPlan plan = plan_tasks(B, N, be.workers(xin), be.min_rows_per_task);
  p.chunks = plan.chunks, p.rows_per_task = plan.rows_per_task, p.num_partials = np;
  at::Tensor partials;
  if (np > 0) {
    partials = ::raekern::empty_output({B, plan.chunks, np, D}, xin.options().dtype(acc));
    p.partials = partials.data_ptr();
  }
  if (B * N * D > 0) be.backward(p, xin.scalar_type());
  else if (np > 0) partials.zero_();

  auto finish = [&](const detail::SlotPlan& s, const at::IntArrayRef shape, at::ScalarType dt) -> at::Tensor {
    switch (s.slot.mode) {
      case GradMode::PerRow:
        return s.sum_batch ? s.rows.sum(0, true, acc).to(dt) : s.rows;
      case GradMode::PerSample:
        return partials.select(2, s.slot.partial).sum(1).view(shape).to(dt);
      case GradMode::Global:
        return partials.select(2, s.slot.partial).sum(at::IntArrayRef{0, 1}).view(shape).to(dt);
      default:
        return at::Tensor();
    }
  };
  const auto dt = xin.scalar_type();
  if (gate) r.dgate = finish(sg, gate->sizes(), dt);
  if (shift) r.dshift = kind == Kind::None ? at::zeros_like(*shift) : finish(ssh, shift->sizes(), dt);
  if (scale) r.dscale = kind == Kind::None ? at::zeros_like(*scale) : finish(ssc, scale->sizes(), dt);
  if (weight) r.dweight = finish(sw, weight->sizes(), weight->scalar_type());
  if (bias) r.dbias = finish(sb, bias->sizes(), bias->scalar_type());
  return r;
}

// ---- the ten ops of the family, written once for every backend ----

inline at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : ::raekern::empty_output({0}, like.options());
}

inline std::vector<int64_t> lead_shape(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

inline std::tuple<at::Tensor, at::Tensor> rms_norm(const Backend& be, const at::Tensor& x,
                                                   const OptTensor& weight, double eps) {
  check_input(x, "rms_norm", "x", 0);
  auto r = run_forward(be, "rms_norm", as_rows3(x), {}, {}, {}, {}, Kind::Rms, weight, {}, eps);
  return {r.out.view(x.sizes()), r.rstd.view(lead_shape(x))};
}

inline std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const Backend& be, const at::Tensor& grad_out,
                                                            const at::Tensor& x, const OptTensor& weight,
                                                            const at::Tensor& rstd) {
  check_input(x, "rms_norm_backward", "x", 0);
  RAEKERN_CHECK(grad_out.sizes() == x.sizes(), "rms_norm_backward", "grad_out", "must have shape ",
                x.sizes(), ", got ", grad_out.sizes());
  auto r = run_backward(be, "rms_norm_backward", as_rows3(grad_out), {}, as_rows3(x), {}, {}, {}, {},
                        Kind::Rms, weight, {}, {}, rstd);
  return {r.dx.view(x.sizes()), or_empty(r.dweight, x)};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const Backend& be, const at::Tensor& x,
                                                                 const OptTensor& weight,
                                                                 const OptTensor& bias, double eps) {
  check_input(x, "layer_norm", "x", 0);
  auto r = run_forward(be, "layer_norm", as_rows3(x), {}, {}, {}, {}, Kind::Layer, weight, bias, eps);
  auto lead = lead_shape(x);
  return {r.out.view(x.sizes()), r.mean.view(lead), r.rstd.view(lead)};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const Backend& be, const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& weight,
    const OptTensor& bias, const at::Tensor& mean, const at::Tensor& rstd) {
  check_input(x, "layer_norm_backward", "x", 0);
  RAEKERN_CHECK(grad_out.sizes() == x.sizes(), "layer_norm_backward", "grad_out", "must have shape ",
                x.sizes(), ", got ", grad_out.sizes());
  auto r = run_backward(be, "layer_norm_backward", as_rows3(grad_out), {}, as_rows3(x), {}, {}, {}, {},
                        Kind::Layer, weight, bias, mean, rstd);
  return {r.dx.view(x.sizes()), or_empty(r.dweight, x), or_empty(r.dbias, x)};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_modulate(
    const Backend& be, const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
    c10::string_view kind, const OptTensor& weight, const OptTensor& bias, double eps) {
  check_input(x, "norm_modulate", "x", 3);
  auto r = run_forward(be, "norm_modulate", x, {}, {}, shift, scale, parse_kind(kind, "norm_modulate"),
                       weight, bias, eps);
  auto lead = lead_shape(x);
  return {r.out, r.mean.view(lead), r.rstd.view(lead)};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_modulate_backward(
    const Backend& be, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shift,
    const at::Tensor& scale, c10::string_view kind, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "norm_modulate_backward";
  check_input(x, op, "x", 3);
  auto r = run_backward(be, op, grad_out, {}, x, {}, {}, shift, scale, parse_kind(kind, op), weight, bias,
                        mean, rstd);
  return {r.dx, r.dshift, r.dscale, or_empty(r.dweight, x), or_empty(r.dbias, x)};
}

inline at::Tensor gated_residual(const Backend& be, const at::Tensor& x, const at::Tensor& gate,
                                 const at::Tensor& y) {
  check_input(x, "gated_residual", "x", 3);
  return run_forward(be, "gated_residual", x, gate, y, {}, {}, Kind::None, {}, {}, 0.0).x_out;
}

inline std::tuple<at::Tensor, at::Tensor> gated_residual_backward(const Backend& be, const at::Tensor& grad,
                                                                  const at::Tensor& gate,
                                                                  const at::Tensor& y) {
  const char* op = "gated_residual_backward";
  check_input(grad, op, "grad", 3);
  auto r = run_backward(be, op, {}, grad, grad, gate, y, {}, {}, Kind::None, {}, {}, {}, {});
  return {r.dgate, r.dy};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_norm_modulate(
    const Backend& be, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y,
    const at::Tensor& shift, const at::Tensor& scale, c10::string_view kind, const OptTensor& weight,
    const OptTensor& bias, double eps) {
  const char* op = "gated_residual_norm_modulate";
  check_input(x, op, "x", 3);
  auto r = run_forward(be, op, x, gate, y, shift, scale, parse_kind(kind, op), weight, bias, eps);
  auto lead = lead_shape(x);
  return {r.x_out, r.out, r.mean.view(lead), r.rstd.view(lead)};
}

// Returns (grad_x, grad_gate, grad_y, grad_shift, grad_scale, grad_weight, grad_bias).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_residual_norm_modulate_backward(const Backend& be, const OptTensor& grad_x_out,
                                      const OptTensor& grad_out, const at::Tensor& x_out,
                                      const at::Tensor& gate, const at::Tensor& y, const at::Tensor& shift,
                                      const at::Tensor& scale, c10::string_view kind,
                                      const OptTensor& weight, const OptTensor& bias,
                                      const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "gated_residual_norm_modulate_backward";
  check_input(x_out, op, "x_out", 3);
  RAEKERN_CHECK(grad_out.has_value() || grad_x_out.has_value(), op, "grad_out",
                "and 'grad_x_out' cannot both be None");
  auto r = run_backward(be, op, grad_out, grad_x_out, x_out, gate, y, shift, scale, parse_kind(kind, op),
                        weight, bias, mean, rstd);
  return {r.dx, r.dgate, r.dy, r.dshift, r.dscale, or_empty(r.dweight, x_out), or_empty(r.dbias, x_out)};
}

// Registers the ten ops for one dispatch key; every backend calls this with its kernels.
template <const Backend* be>
inline void register_impls(torch::Library& m) {
  m.impl("rms_norm", [](const at::Tensor& x, const OptTensor& w, double eps) { return rms_norm(*be, x, w, eps); });
  m.impl("rms_norm_backward", [](const at::Tensor& go, const at::Tensor& x, const OptTensor& w,
                                 const at::Tensor& rstd) { return rms_norm_backward(*be, go, x, w, rstd); });
  m.impl("layer_norm", [](const at::Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
    return layer_norm(*be, x, w, b, eps);
  });
  m.impl("layer_norm_backward", [](const at::Tensor& go, const at::Tensor& x, const OptTensor& w,
                                   const OptTensor& b, const at::Tensor& mean, const at::Tensor& rstd) {
    return layer_norm_backward(*be, go, x, w, b, mean, rstd);
  });
  m.impl("norm_modulate", [](const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                             c10::string_view kind, const OptTensor& w, const OptTensor& b, double eps) {
    return norm_modulate(*be, x, shift, scale, kind, w, b, eps);
  });
  m.impl("norm_modulate_backward",
         [](const at::Tensor& go, const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
            c10::string_view kind, const OptTensor& w, const OptTensor& b, const at::Tensor& mean,
            const at::Tensor& rstd) {
           return norm_modulate_backward(*be, go, x, shift, scale, kind, w, b, mean, rstd);
         });
  m.impl("gated_residual", [](const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
    return gated_residual(*be, x, gate, y);
  });
  m.impl("gated_residual_backward", [](const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& y) {
    return gated_residual_backward(*be, grad, gate, y);
  });
  m.impl("gated_residual_norm_modulate",
         [](const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y, const at::Tensor& shift,
            const at::Tensor& scale, c10::string_view kind, const OptTensor& w, const OptTensor& b,
            double eps) { return gated_residual_norm_modulate(*be, x, gate, y, shift, scale, kind, w, b, eps); });
  m.impl("gated_residual_norm_modulate_backward",
         [](const OptTensor& gxo, const OptTensor& go, const at::Tensor& x_out, const at::Tensor& gate,
            const at::Tensor& y, const at::Tensor& shift, const at::Tensor& scale, c10::string_view kind,
            const OptTensor& w, const OptTensor& b, const at::Tensor& mean, const at::Tensor& rstd) {
           return gated_residual_norm_modulate_backward(*be, gxo, go, x_out, gate, y, shift, scale, kind, w, b,
                                                        mean, rstd);
         });
}

}  // namespace raekern::norm
