// Host-side choice of the per-thread row layout of the fusion family's SIMT kernels.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace raekern::fusion::cuda {

// 16-byte vectors when every row of every tensor starts 16-byte aligned and is contiguous in D.
inline bool rows_vectorizable(at::TensorList ts, int64_t D, int64_t elem) {
  const int64_t v = 16 / elem;
  if (D % v) return false;
  for (const auto& t : ts) {
    if (t.stride(-1) != 1) return false;
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
    for (int64_t k = 0; k + 1 < t.dim(); ++k)
      if (t.size(k) > 1 && t.stride(k) % v) return false;
  }
  return true;
}

}  // namespace raekern::fusion::cuda
