// Host side shared by the fusion family's CUDA launchers (*.cu) and their host emulation
// (fusion_emu.cpp): the per-thread row layout and the Dev interface the launch plans are written
// against, so the emulated tests run exactly the launches the real ops make.
//
// A Dev (fusion/cuda_dev.h on CUDA, fusion_emu.cpp's EmuDev in the emulation) supplies:
//   Dev(const at::Tensor& like)              device guard / guarded emulated memory
//   template <class S> using elem            device element type of scalar_t S (__half, __nv_bfloat16)
//   const void* in(t, name)                  pointer the kernel reads t through
//   void* out(t, name)                       ... writes t through (every element must be written)
//   void* inout(t, name)                     ... reads and writes (accumulators, partial writes)
//   void fresh(at::Tensor& t)                marks a new at::empty tensor as unwritten (emulation: NaN)
//   int64_t workers(t)                       SM count of t's device (emulation: configurable)
//   launch(kernel, grid, block, smem, args...)  kernel<<<grid, block, smem, stream>>>(args...)
//   void finish()                            emulation: bounds check, copy outputs back
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "common/checks.h"
#include "common/constant_dispatch.h"
#include "common/env_switch.h"
#include "fusion/fusion_kernel_common.cuh"

namespace raekern::fusion::cuda {

constexpr int kScalarItems = 8;  // scalar path: D ≤ 8·256
constexpr int kVecItems = 2;     // vector path: D ≤ 2·256·(16 B / element)
// Blocks of the token-mean pre-passes per sample (blocks stride over the tokens).
constexpr int64_t kMeanBlocks = 64;

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

// Calls f(std::integral_constant<bool, vec>) with the row layout of tensors `ts` and checks that
// the chosen layout holds D in registers; `arg` names the argument in the error.
template <class F>
void with_layout(at::TensorList ts, int64_t D, int64_t elem, const char* op, const char* arg, F&& f) {
  if (rows_vectorizable(ts, D, elem)) {
    RAEKERN_CHECK(D <= kVecItems * kThreads * (16 / elem), op, arg, "width D = ", D,
                  " exceeds the CUDA kernel's limit of ", kVecItems * kThreads * (16 / elem));
    f(std::true_type{});
  } else {
    RAEKERN_CHECK(D <= kScalarItems * kThreads, op, arg, "width D = ", D, " exceeds the CUDA kernel's limit of ",
                  kScalarItems * kThreads, " for unaligned rows");
    f(std::false_type{});
  }
}

// Warp-per-token kernels (warp_row.cuh): vectors per lane NV from these buckets, at most
// kWarpRowMaxFloats fp32 values of a row per lane (D ≤ 1024 for every dtype; no register spills).
constexpr int kWarpRowNv[] = {1, 2, 3, 4, 6, 8};
constexpr int64_t kWarpRowMaxFloats = 32;

// RAEKERN_FUSION_KERNEL=block keeps layer_stack_fuse and depth_route on their block-per-token kernels
// (the ones of the first H200 run), for measuring one against the other; read at each launch.
inline bool warp_rows_enabled() { return !env_equals("RAEKERN_FUSION_KERNEL", "block"); }

// NV for a row of D elements in vectors of V, or 0 when the warp kernels do not apply (scalar rows,
// rows wider than the buckets, or switched off).
inline int warp_row_nv(bool vec, int64_t D, int64_t V) {
  if (!vec || D <= 0 || !warp_rows_enabled()) return 0;
  const int64_t per_lane = (D / V + simt::kWarp - 1) / simt::kWarp;
  for (int nv : kWarpRowNv)
    if (nv >= per_lane && nv * V <= kWarpRowMaxFloats) return nv;
  return 0;
}

// f(integral_constant<int, NV>) for a runtime NV of kWarpRowNv (the widest buckets only for vectors
// of at most 4 elements, where NV·V stays within kWarpRowMaxFloats).
template <int V, class F>
void with_warp_nv(int nv, F&& f) {
  if constexpr (V <= 4) with_constant<1, 2, 3, 4, 6, 8>(nv, f);
  else with_constant<1, 2, 3, 4>(nv, f);
}

// Vector width and items per thread of a layout.
template <class T, bool kVec> constexpr int kV = kVec ? 16 / int(sizeof(T)) : 1;
template <bool kVec> constexpr int kItems = kVec ? kVecItems : kScalarItems;

inline at::Tensor f32(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

}  // namespace raekern::fusion::cuda
