// Schemas of the mlp family: the gated activation between a transformer MLP's GEMMs.
// swiglu(a, b) = silu(a)·b with a, b of one shape [..., H] (any strides, stride 0 included);
// swiglu_packed(ab) takes the [..., 2H] output of a fused w12 Linear (a = first half, b = second
// half of the last dimension, read in place). Outputs and gradients are contiguous; the packed
// backward returns d(ab) as one [..., 2H] tensor.
// transpose_copy(x) = xᵀ of a 2-D x as a new contiguous tensor: the operand copies of a Linear's
// backward where the GEMM takes its reduction dimension contiguous (oneDNN's, models/layers.py).
#pragma once
#include <torch/library.h>

namespace raekern::mlp {

inline void define_schemas(torch::Library& m) {
  m.def("swiglu(Tensor a, Tensor b) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor a, Tensor b) -> (Tensor grad_a, Tensor grad_b)");
  m.def("swiglu_packed(Tensor ab) -> Tensor");
  m.def("swiglu_packed_backward(Tensor grad, Tensor ab) -> Tensor");
  m.def("transpose_copy(Tensor x) -> Tensor");
}

}  // namespace raekern::mlp
