// Launch decision of gfcg_select's CUDA kernel, shared by gfcg_select.cu and the host emulation
// (guidance_emu.cpp). Separate from guidance_launch.h so that gfcg_select.cu does not compile
// guidance_step's kernels (solve_kernel would then be defined in two translation units).
#pragma once
#include <cstdint>

#include "guidance/gfcg_select_kernel.cuh"

namespace raekern::guidance::cuda {

// One block of kSelectThreads per classifier row.
inline int64_t select_blocks(int64_t B) { return B; }

}  // namespace raekern::guidance::cuda
