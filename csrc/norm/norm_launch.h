// Launch decisions of the norm family's CUDA kernels (row layout, grid, block, dynamic shared
// memory), shared by the CUDA launcher (fused_norm.cu) and the host emulation (norm_emu.cpp), so the
// emulated tests run exactly the launch the real op makes. Host-only, no torch or CUDA headers.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "norm/norm_params.h"

namespace raekern::norm {

// Backward tasks of >= 16 tokens: about four blocks per SM for DiT shapes, partial sums ~1/16 of
// the data (the min_rows of plan_tasks, norm_params.h).
constexpr int64_t kMinTaskRows = 16;

struct NormLaunch {
  bool vec;        // 16-byte vectors (V = 16 / element size) or one element per access
  unsigned grid;   // blocks
  unsigned block;  // threads per block
  size_t smem;     // dynamic shared memory, bytes
};

// 128-bit accesses need unit feature stride and 16-byte aligned row starts.
inline bool vec_ok(const Operand& o, int64_t V, size_t elem) {
  if (!o.ptr) return true;
  const auto addr = reinterpret_cast<uintptr_t>(o.ptr);
  return o.sd == 1 && addr % (V * elem) == 0 && o.sb % V == 0 && o.sn % V == 0;
}

// One thread per vector of the row, in whole warps, between 64 and 512.
inline unsigned threads_for(int64_t D, int64_t V) {
  const int64_t vecs = (D + V - 1) / V;
  return unsigned(std::clamp<int64_t>((vecs + 31) / 32 * 32, 64, 512));
}

// One block per row (grid-stride beyond 2^30 rows); the row is staged in shared memory.
inline NormLaunch forward_launch(const FwdParams& p, size_t elem) {
  const int64_t V = int64_t(16 / elem);
  const bool vec = p.D % V == 0 && vec_ok(p.x, V, elem) && vec_ok(p.gate, V, elem) && vec_ok(p.y, V, elem) &&
                   vec_ok(p.shift, V, elem) && vec_ok(p.scale, V, elem);
  const int64_t rows = p.B * p.N;
  return {vec, unsigned(std::clamp<int64_t>(rows, 1, int64_t(1) << 30)), threads_for(p.D, vec ? V : 1),
          size_t(p.D) * sizeof(float)};
}

// One block per task (p.chunks tasks per sample; no grid-stride loop, so the grid is never capped);
// shared memory holds two rows and the task's partial sums.
inline NormLaunch backward_launch(const BwdParams& p, size_t elem) {
  const int64_t V = int64_t(16 / elem);
  const bool vec = p.D % V == 0 && vec_ok(p.dout, V, elem) && vec_ok(p.dxo, V, elem) && vec_ok(p.xin, V, elem) &&
                   vec_ok(p.gate, V, elem) && vec_ok(p.y, V, elem) && vec_ok(p.scale, V, elem);
  return {vec, unsigned(p.B * p.chunks), threads_for(p.D, vec ? V : 1),
          size_t(2 + p.num_partials) * size_t(p.D) * sizeof(float)};
}

}  // namespace raekern::norm
