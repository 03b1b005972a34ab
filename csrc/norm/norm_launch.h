// Launch decisions of the norm family's CUDA kernels (row layout, grid, block, dynamic shared
// memory), shared by the CUDA launcher (fused_norm.cu) and the host emulation (norm_emu.cpp), so the
// emulated tests run exactly the launch the real op makes. Host-only, no torch or CUDA headers.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "common/env_switch.h"
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
  int nv = 0;      // forward: > 0 = fused_norm_forward_rows with nv vectors per lane
};

// The instances of fused_norm_forward_rows (vectors per lane), smallest first; a lane holds at most
// kRowsMaxFloats fp32 values of its row (D <= 2048 for every dtype, no register spills).
constexpr int kRowsNv[] = {1, 2, 3, 4, 5, 6, 8, 12, 16};
constexpr int64_t kRowsMaxFloats = 64;
constexpr unsigned kRowsWarpsPerBlock = 4;

// RAEKERN_NORM_FORWARD=block keeps every forward on the one-block-per-row kernel, for measuring one
// kernel against the other on a GPU; read at each launch, so a test or benchmark can switch it.
inline bool rows_forward_enabled() { return !env_equals("RAEKERN_NORM_FORWARD", "block"); }

// Vectors per lane for a row of D elements in vectors of V, or 0 when the row does not fit.
inline int rows_nv(int64_t D, int64_t V) {
  const int64_t per_lane = (D / V + 31) / 32;
  for (int nv : kRowsNv)
    if (nv >= per_lane && nv * V <= kRowsMaxFloats) return nv;
  return 0;
}

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

// Rows that fit in a warp's registers: kRowsWarpsPerBlock rows per block, one per warp. Otherwise one
// block per row (grid-stride beyond 2^30 rows), the row staged in shared memory.
inline NormLaunch forward_launch(const FwdParams& p, size_t elem) {
  const int64_t V = int64_t(16 / elem);
  const bool vec = p.D % V == 0 && vec_ok(p.x, V, elem) && vec_ok(p.gate, V, elem) && vec_ok(p.y, V, elem) &&
                   vec_ok(p.shift, V, elem) && vec_ok(p.scale, V, elem);
  const int64_t rows = p.B * p.N;
  const int nv = vec && p.D > 0 && rows_forward_enabled() ? rows_nv(p.D, V) : 0;
  if (nv > 0) {
    const int64_t blocks = (rows + kRowsWarpsPerBlock - 1) / kRowsWarpsPerBlock;
    return {true, unsigned(std::clamp<int64_t>(blocks, 1, int64_t(1) << 30)), kRowsWarpsPerBlock * 32, 0, nv};
  }
  return {vec, unsigned(std::clamp<int64_t>(rows, 1, int64_t(1) << 30)), threads_for(p.D, vec ? V : 1),
          size_t(p.D) * sizeof(float)};
}

// The backward keeps two row arrays per lane (x̂ and d x̂·weight) beside the gradient being read, so
// its rows kernel takes at most this many floats per lane and array (D <= 1536; no register spills).
constexpr int64_t kRowsBwdMaxFloats = 48;
constexpr unsigned kRowsBwdMaxWarps = 8;
// Per-warp partial-sum slabs stay within the default 48 KiB of shared memory (no opt-in, and room
// for several blocks per SM).
constexpr size_t kRowsBwdSmemBytes = 48 * 1024;

// RAEKERN_NORM_BACKWARD=block keeps the one-block-per-task kernel with a block-wide row (the only
// backward of the first H200 run), for measuring one against the other; read at each launch.
inline bool rows_backward_enabled() { return !env_equals("RAEKERN_NORM_BACKWARD", "block"); }

// Vectors per lane for the backward's rows kernel, or 0 when the row does not fit.
inline int rows_bwd_nv(int64_t D, int64_t V) {
  const int nv = rows_nv(D, V);
  return nv > 0 && nv * V <= kRowsBwdMaxFloats ? nv : 0;
}

// One block per task (p.chunks tasks per sample; no grid-stride loop, so the grid is never capped).
// Rows that fit a warp's registers: up to kRowsBwdMaxWarps warps per block, one row per warp at a
// time, shared memory = one [num_partials, D] slab per warp. Otherwise one thread per vector of the
// row; shared memory holds two rows and the task's partial sums.
inline NormLaunch backward_launch(const BwdParams& p, size_t elem) {
  const int64_t V = int64_t(16 / elem);
  const bool vec = p.D % V == 0 && vec_ok(p.dout, V, elem) && vec_ok(p.dxo, V, elem) && vec_ok(p.xin, V, elem) &&
                   vec_ok(p.gate, V, elem) && vec_ok(p.y, V, elem) && vec_ok(p.scale, V, elem);
  const unsigned grid = unsigned(p.B * p.chunks);
  const int nv = vec && p.D > 0 && rows_backward_enabled() ? rows_bwd_nv(p.D, V) : 0;
  if (nv > 0) {
    const size_t slab = size_t(p.num_partials) * size_t(p.D) * sizeof(float);
    const int64_t fit = slab > 0 ? int64_t(kRowsBwdSmemBytes / slab) : int64_t(kRowsBwdMaxWarps);
    const int64_t warps = std::clamp<int64_t>(std::min<int64_t>(fit, p.rows_per_task), 1, kRowsBwdMaxWarps);
    if (size_t(warps) * slab <= kRowsBwdSmemBytes)
      return {true, grid, unsigned(warps) * 32, size_t(warps) * slab, nv};
  }
  return {vec, grid, threads_for(p.D, vec ? V : 1), size_t(2 + p.num_partials) * size_t(p.D) * sizeof(float)};
}

// Shared memory of the backward's rows kernel for a block of `block` threads (whole warps).
inline size_t rows_backward_smem(const BwdParams& p, unsigned block) {
  return size_t(block / 32) * size_t(p.num_partials) * size_t(p.D) * sizeof(float);
}

}  // namespace raekern::norm
