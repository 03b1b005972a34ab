// Launch shape of the SwiGLU SIMT kernels (swiglu_kernel.cuh), shared by the CUDA launcher
// (swiglu.cu) and the host-emulated one (mlp_emu.cpp) so both run the kernels the same way.
// Plain C++: no CUDA or torch headers.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "mlp/mlp_params.h"

namespace raekern::mlp {

struct Launch {
  int vec = 1;          // elements per vector access (1: scalar, any strides)
  unsigned threads = 32;
  int64_t grid_x = 1;   // column tiles of threads * vec elements (grid-stride beyond)
  int64_t grid_y = 1;   // rows (grid-stride beyond)
};

// Every row start of `o` must be aligned to v elements, and the row itself unit-stride.
inline bool vec_ok(const Params& p, const Operand& o, int v, size_t elem) {
  if (v == 1) return true;
  if (reinterpret_cast<uintptr_t>(o.ptr) % (size_t(v) * elem) != 0) return false;
  if (o.stride[p.ndim - 1] != 1) return false;
  for (int d = 0; d < p.ndim - 1; ++d)
    if (o.stride[d] % v != 0) return false;
  return true;
}

// The kernels loop over columns and rows grid-stride, so any block size and any grid cover the
// problem; the emulation tests shrink both on top of this plan to exercise those loops.
inline Launch plan_launch(const Params& p, bool backward, size_t elem) {
  Launch l;
  // Widest access (<= 16 bytes) every operand allows; a row's tail shorter than it runs scalar.
  for (int v = int(16 / elem); v > 1; v /= 2) {
    const bool ok = backward ? vec_ok(p, p.grad, v, elem) && vec_ok(p, p.a, v, elem) && vec_ok(p, p.b, v, elem) &&
                                   vec_ok(p, p.da, v, elem) && vec_ok(p, p.db, v, elem)
                             : vec_ok(p, p.a, v, elem) && vec_ok(p, p.b, v, elem) && vec_ok(p, p.out, v, elem);
    if (ok && p.cols >= v) {
      l.vec = v;
      break;
    }
  }
  const int64_t vecs = (p.cols + l.vec - 1) / l.vec;
  l.threads = unsigned(std::clamp<int64_t>((vecs + 31) / 32 * 32, 32, 256));
  const int64_t tile = int64_t(l.threads) * l.vec;
  l.grid_x = std::min<int64_t>((p.cols + tile - 1) / tile, int64_t(1) << 30);
  l.grid_y = std::min<int64_t>(p.rows, 65535);
  l.grid_x = std::max<int64_t>(l.grid_x, 1);
  l.grid_y = std::max<int64_t>(l.grid_y, 1);
  return l;
}

}  // namespace raekern::mlp
