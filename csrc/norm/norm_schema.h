// Schemas of the norm family (DESIGN §3.1). Every forward returns the statistics its backward needs
// (mean/rstd in fp32, fp64 for fp64 input; shape x.shape[:-1]); absent affine gradients come back as
// empty tensors. Broadcast operands (gate, shift, scale) are [B', N', D] with B' in {1, B} and
// N' in {1, N}, read through their strides; their gradients have the operand's shape.
#pragma once
#include <torch/library.h>

namespace raekern::norm {

inline void define_schemas(torch::Library& m) {
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> (Tensor out, Tensor rstd)");
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor rstd)"
        " -> (Tensor grad_x, Tensor grad_weight)");
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def("layer_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean,"
        " Tensor rstd) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("norm_modulate(Tensor x, Tensor shift, Tensor scale, str kind, Tensor? weight, Tensor? bias,"
        " float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def("norm_modulate_backward(Tensor grad_out, Tensor x, Tensor shift, Tensor scale, str kind,"
        " Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd) -> (Tensor grad_x, Tensor grad_shift,"
        " Tensor grad_scale, Tensor grad_weight, Tensor grad_bias)");
  m.def("gated_residual(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("gated_residual_backward(Tensor grad, Tensor gate, Tensor y) -> (Tensor grad_gate, Tensor grad_y)");
  m.def("gated_residual_norm_modulate(Tensor x, Tensor gate, Tensor y, Tensor shift, Tensor scale, str kind,"
        " Tensor? weight, Tensor? bias, float eps) -> (Tensor x_out, Tensor out, Tensor mean, Tensor rstd)");
  m.def("gated_residual_norm_modulate_backward(Tensor? grad_x_out, Tensor? grad_out, Tensor x_out,"
        " Tensor gate, Tensor y, Tensor shift, Tensor scale, str kind, Tensor? weight, Tensor? bias,"
        " Tensor mean, Tensor rstd) -> (Tensor grad_x, Tensor grad_gate, Tensor grad_y, Tensor grad_shift,"
        " Tensor grad_scale, Tensor grad_weight, Tensor grad_bias)");
}

}  // namespace raekern::norm
