// Launch decisions of guidance_step's and guidance_combine's CUDA kernels (grid, block, passes,
// kernel parameters), shared by the CUDA launcher (guidance_step.cu) and the host emulation
// (guidance_emu.cpp), so the emulated tests run the kernels exactly as a GPU gets them.
// gfcg_select's is in gfcg_select_launch.h.
// Host code only (ATen); the element type DT is the launcher's (cuda_t<T> or emu_t<T>).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/constant_dispatch.h"
#include "common/env_switch.h"

// ATen (through guidance_step.h) before the kernel headers: under the host emulation these define
// CUDA keywords as macros that ATen's headers must not see.
#include "guidance/guidance_step.h"
// clang-format off
#include "guidance/guidance_step_kernel.cuh"
// clang-format on

namespace raekern::guidance::cuda {

// Blocks per sample: enough blocks for the whole GPU at small batches, >= 8 vector iterations each.
inline int64_t pick_chunk(int64_t B, int64_t N, int V) {
  const int64_t min_chunk = int64_t(kThreads) * V * 8;
  int64_t chunks = std::max<int64_t>(1, (N + min_chunk - 1) / min_chunk);
  const int64_t target_blocks = 1024;
  if (B * chunks > target_blocks) chunks = std::max<int64_t>(1, target_blocks / std::max<int64_t>(B, 1));
  int64_t chunk = (N + chunks - 1) / chunks;
  chunk = (chunk + V - 1) / V * V;  // keeps every block's start vector-aligned
  return std::max<int64_t>(chunk, V);
}

// The launches of one guidance_step call. The statistics buffer (float64 [B·chunks, stats_entries],
// every row written by its Gram block) and the device addresses in Params are the launcher's.
struct StepLaunch {
  int64_t blocks = 0;  // B * chunks: grid of the Gram and output kernels (kThreads each)
  bool gram = false;   // statistics pass needed
  int ng = 0;          // Gram size (template argument of gram_kernel)
  int64_t stats_entries = 0;
  size_t gram_smem = 0;
  int64_t solve_blocks = 0;  // solve_kernel: one thread per sample
  int solve_threads = 64;
  bool combine = false;  // output pass (N > 0)
  int combine_ns = 0;    // combine_kernel<DT, combine_ns>: the stream count, or 0 for the generic loop
};

// combine_kernel instances with a compile-time stream count (2 .. kMaxFixedStreams); more streams take
// the generic kernel. RAEKERN_GUIDANCE_COMBINE=generic takes it always, for measuring one against the
// other on a GPU (read at each launch).
constexpr int kMaxFixedStreams = 8;
inline bool fixed_combine_enabled() { return !env_equals("RAEKERN_GUIDANCE_COMBINE", "generic"); }

// Params from the prepared host arguments (pointers as `pr` holds them; an emulating launcher remaps
// them) and the launch plan. DT is the device element type (__half, __nv_bfloat16, float).
template <class DT>
StepLaunch plan_step(const Prepared& pr, Params& p) {
  const Config& cfg = pr.cfg;
  p = Params{};
  p.cfg = cfg;
  p.B = pr.B;
  p.N = pr.N;
  p.ns = cfg.num_streams();
  p.nout = cfg.num_outputs();
  p.first_m = 1 + cfg.K;
  p.last_m = p.first_m + (cfg.has_momentum ? cfg.J : 0);
  constexpr int V = simt::kVec16<DT>;
  bool vec_ok = pr.N % V == 0;
  for (int e = 0; e < p.ns; ++e) {
    p.ptr[e] = pr.streams[e].ptr;
    p.stride[e] = pr.streams[e].stride;
    const bool is_m = e >= p.first_m && e < p.last_m;
    const int64_t esize = is_m ? 4 : int64_t(sizeof(DT));
    vec_ok = vec_ok && reinterpret_cast<uintptr_t>(p.ptr[e]) % 16 == 0 && (p.stride[e] * esize) % 16 == 0;
  }
  // Outputs are fresh allocations, but a vector store must not rely on that silently.
  vec_ok = vec_ok && reinterpret_cast<uintptr_t>(pr.out.const_data_ptr()) % 16 == 0 &&
           (!pr.return_x0 || reinterpret_cast<uintptr_t>(pr.x0.const_data_ptr()) % 16 == 0);
  p.vec_ok = vec_ok;
  p.chunk = pick_chunk(pr.B, pr.N, vec_ok ? V : 1);
  p.chunks = (pr.N + p.chunk - 1) / p.chunk;
  p.return_x0 = pr.return_x0;
  p.gram_x = cfg.stats_read_x();
  p.t = pr.t_tab;
  p.t_next = pr.t_next_tab;
  p.w = pr.w_tab;
  p.zero_init = pr.zero_init.defined() ? static_cast<const unsigned char*>(pr.zero_init.const_data_ptr()) : nullptr;
  p.coeffs = const_cast<double*>(pr.coeffs.const_data_ptr<double>());
  p.out = const_cast<void*>(pr.out.const_data_ptr());
  p.x0 = pr.return_x0 ? const_cast<void*>(pr.x0.const_data_ptr()) : nullptr;
  p.mom_out = cfg.has_momentum ? const_cast<float*>(pr.momentum_out.const_data_ptr<float>()) : nullptr;
  p.stats = nullptr;

  StepLaunch L;
  L.blocks = pr.B * p.chunks;
  L.ng = cfg.gram_size();
  L.gram = cfg.needs_gram() && pr.N > 0;
  // Checked for empty samples too: the solve kernel sums the statistics into a kMaxGram-sized array.
  if (cfg.needs_gram())
    RAEKERN_CHECK(L.ng <= kMaxGram, kOp, "terms", "on CUDA, 1 + K + (momentum terms) must be <= ", kMaxGram,
                  " when a statistic is needed, got ", L.ng);
  if (L.gram) {
    L.stats_entries = gram_entries(L.ng) + L.ng;  // per (sample, chunk) row of the stats buffer
    L.gram_smem = size_t(kThreads / simt::kWarp) * size_t(L.stats_entries) * sizeof(float);
  }
  L.solve_blocks = (pr.B + L.solve_threads - 1) / L.solve_threads;
  L.combine = pr.N > 0;
  L.combine_ns = p.ns >= 2 && p.ns <= kMaxFixedStreams && fixed_combine_enabled() ? p.ns : 0;
  return L;
}

// f(kernel) with the combine_kernel instance for `ns` streams (0: the generic one).
template <class DT, class F>
void with_combine_kernel(int ns, F&& f) {
  bool fixed = false;
  with_constant<2, 3, 4, 5, 6, 7, 8>(ns, [&](auto c) {
    fixed = true;
    f(&combine_kernel<DT, decltype(c)::value>);
  });
  if (!fixed) f(&combine_kernel<DT, 0>);
}

// f(kernel) with the solve_kernel instance for this configuration's raw stream count: the serial
// per-sample solve then loops over 6 or 10 streams instead of kMaxStreams (19) in every vector
// operation (CFG / APG / CFG-Zero* / rescale with two or three branches and one term: 6).
template <class F>
void with_solve_kernel(const Config& cfg, F&& f) {
  const int n = raw_size(cfg);
  if (n <= 6) f(&solve_kernel<6>);
  else if (n <= 10) f(&solve_kernel<10>);
  else f(&solve_kernel<kMaxStreams>);
}

// f(kernel) with the gram_kernel instance of Gram size ng (2..kMaxGram).
template <class DT, class F>
void with_gram_kernel(int ng, F&& f) {
  with_constant<2, 3, 4, 5, 6, 7, 8>(ng, [&](auto c) { f(&gram_kernel<DT, decltype(c)::value>); });
}

// guidance_combine: one block of kThreads per (sample, chunk), scalar loads.
inline int64_t plan_combine(int64_t B, int64_t N, CombineParams& p) {
  p.B = B;
  p.N = N;
  p.chunk = pick_chunk(B, N, 1);
  p.chunks = (N + p.chunk - 1) / p.chunk;
  return B * p.chunks;
}

}  // namespace raekern::guidance::cuda
