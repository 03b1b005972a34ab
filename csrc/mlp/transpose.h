// transpose_copy(x) = xᵀ of a 2-D x [R, C] as a new contiguous [C, R] tensor: the argument check and
// the generic path (torch's copy), shared by the CPU kernel (other dtypes, strided rows) and the CUDA
// registration (torch's tiled CUDA transpose is used there as it is).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/checks.h"

namespace raekern::mlp {

inline void check_transpose_input(const at::Tensor& x) {
  RAEKERN_CHECK(x.dim() == 2, "transpose_copy", "x", "must be a 2-D tensor [R, C], got ", x.dim(), "-D ",
                x.sizes());
}

// Never x itself (an op's output must not alias its input), even where xᵀ is already contiguous.
inline at::Tensor transpose_copy_generic(const at::Tensor& x) {
  check_transpose_input(x);
  return at::empty({x.size(1), x.size(0)}, x.options()).copy_(x.t());
}

}  // namespace raekern::mlp
