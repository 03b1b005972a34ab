// Launchers for common/emulation_selftest_kernel.cuh under the host emulation: the emulation's own
// tests (python_tests/test_emulation.py), as torch.ops.raekern_emu.selftest_*.
#ifdef RAEKERN_HOST_EMULATION
#include <torch/library.h>

#include "common/emulation_selftest_kernel.cuh"
#include "common/emulation_torch.h"

namespace raekern::emu_selftest {
namespace {

using emu::DeviceMemory;
using emu::emu_t;
using emu::emulate_launch;

// -> [rows, 3]: block_sum, block_sum2's sum, block_sum2's sum of squares.
at::Tensor row_stats(const at::Tensor& x, int64_t block, int64_t vec, bool broken, int64_t max_blocks) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.stride(1) == 1, "selftest_row_stats: 'x' must be 2-D with unit column stride");
  auto out = at::empty({x.size(0), 3}, x.options().dtype(at::kFloat));
  RAEKERN_EMU_DISPATCH(x.scalar_type(), "selftest_row_stats", [&] {
    using T = emu_t<scalar_t>;
    DeviceMemory mem;
    const T* px = mem.in<scalar_t>(x, "x");
    float* po = mem.out<float>(out, "out");
    const int64_t rows = x.size(0), cols = x.size(1), rs = x.stride(0);
    constexpr int V = simt::kVec16<T>;
    const bool aligned = reinterpret_cast<uintptr_t>(px) % 16 == 0 && rs % V == 0;
    const dim3 grid(unsigned(std::min<int64_t>(std::max<int64_t>(rows, 1), max_blocks)));
    const size_t smem = 2 * simt::kWarp * sizeof(float);
    if (broken)
      emulate_launch(row_stats_kernel<T, 1, true>, grid, dim3(block), smem, px, po, rows, cols, rs);
    else if (vec > 1 && aligned)
      emulate_launch(row_stats_kernel<T, V, false>, grid, dim3(block), smem, px, po, rows, cols, rs);
    else
      emulate_launch(row_stats_kernel<T, 1, false>, grid, dim3(block), smem, px, po, rows, cols, rs);
    mem.finish();
  });
  return out;
}

at::Tensor reverse(const at::Tensor& x, int64_t block, const std::string& variant) {
  TORCH_CHECK_VALUE(x.dim() == 1, "selftest_reverse: 'x' must be 1-D");
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  RAEKERN_EMU_DISPATCH(x.scalar_type(), "selftest_reverse", [&] {
    using T = emu_t<scalar_t>;
    DeviceMemory mem;
    const T* px = mem.in<scalar_t>(x, "x");
    T* py = mem.out<scalar_t>(y, "y");
    const int64_t n = x.numel();
    const dim3 grid(unsigned((n + block - 1) / block));
    const size_t smem = size_t(block) * sizeof(T);
    if (variant == "dynamic") emulate_launch(reverse_kernel<T, 0>, grid, dim3(block), smem, px, py, n);
    else if (variant == "static") emulate_launch(reverse_kernel<T, 1>, grid, dim3(block), 0, px, py, n);
    else if (variant == "missing_sync") emulate_launch(reverse_kernel<T, 2>, grid, dim3(block), smem, px, py, n);
    else if (variant == "smem_overflow") emulate_launch(reverse_kernel<T, 3>, grid, dim3(block), smem, px, py, n);
    else TORCH_CHECK_VALUE(false, "selftest_reverse: unknown 'variant' ", variant);
    mem.finish();
  });
  return y;
}

at::Tensor warp_ops(const at::Tensor& x, int64_t block, int64_t width, int64_t delta) {
  TORCH_CHECK_VALUE(x.dim() == 1 && x.scalar_type() == at::kInt && x.numel() % block == 0,
                    "selftest_warp_ops: 'x' must be int32 with a multiple of 'block' elements");
  auto out = at::empty({kWarpOps, x.numel()}, x.options());
  DeviceMemory mem;
  const int* px = mem.in<int>(x, "x");
  int* po = mem.out<int>(out, "out");
  emulate_launch(warp_ops_kernel, dim3(unsigned(x.numel() / block)), dim3(block), 0, px, po, int(width), int(delta));
  mem.finish();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> atomics(const at::Tensor& idx, const at::Tensor& val, int64_t bins,
                                                       int64_t grid, int64_t block) {
  auto hist = at::zeros({bins}, val.options());
  auto stats = at::zeros({3}, idx.options());
  auto block_pos = at::empty({grid}, idx.options());
  DeviceMemory mem;
  const int* pi = mem.in<int>(idx, "idx");
  const float* pv = mem.in<float>(val, "val");
  float* ph = mem.inout<float>(hist, "hist");
  int* ps = mem.inout<int>(stats, "stats");
  int* pb = mem.out<int>(block_pos, "block_pos");
  emulate_launch(atomics_kernel, dim3(unsigned(grid)), dim3(unsigned(block)), 0, pi, pv, idx.numel(), ph, ps, pb);
  mem.finish();
  return {hist, stats, block_pos};
}

at::Tensor coords(at::IntArrayRef grid, at::IntArrayRef block) {
  TORCH_CHECK_VALUE(grid.size() == 3 && block.size() == 3, "selftest_coords: 'grid' and 'block' take 3 values");
  const int64_t n = grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2];
  auto out = at::empty({n, 12}, at::TensorOptions().dtype(at::kInt));
  DeviceMemory mem;
  int* po = mem.out<int>(out, "out");
  emulate_launch(coords_kernel, dim3(unsigned(grid[0]), unsigned(grid[1]), unsigned(grid[2])),
                 dim3(unsigned(block[0]), unsigned(block[1]), unsigned(block[2])), 0, po);
  mem.finish();
  return out;
}

at::Tensor math(const at::Tensor& x) {
  auto out = at::empty({8, x.numel()}, x.options());
  DeviceMemory mem;
  const float* px = mem.in<float>(x, "x");
  float* po = mem.out<float>(out, "out");
  emulate_launch(math_kernel, dim3(unsigned((x.numel() + 127) / 128)), dim3(128), 0, px, po, x.numel());
  mem.finish();
  return out;
}

std::tuple<at::Tensor, at::Tensor> convert(const at::Tensor& x, at::ScalarType dtype) {
  auto y = at::empty_like(x, x.options().dtype(dtype));
  auto back = at::empty_like(x);
  RAEKERN_EMU_DISPATCH(dtype, "selftest_convert", [&] {
    using T = emu_t<scalar_t>;
    DeviceMemory mem;
    const float* px = mem.in<float>(x, "x");
    T* py = mem.out<scalar_t>(y, "y");
    float* pb = mem.out<float>(back, "back");
    emulate_launch(convert_kernel<T>, dim3(unsigned((x.numel() + 63) / 64)), dim3(64), 0, px, py, pb, x.numel());
    mem.finish();
  });
  return {y, back};
}

// D = A·B + C through emulated ldmatrix + mma.sync (one warp); see mma_kernel for `variant`.
at::Tensor mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, int64_t variant) {
  TORCH_CHECK_VALUE(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 8}) &&
                        c.sizes() == at::IntArrayRef({16, 8}) && a.scalar_type() == b.scalar_type(),
                    "selftest_mma: a [16, 16], b [16, 8] (same 16-bit dtype), c [16, 8] float");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous(), cc = c.to(at::kFloat).contiguous();
  auto d = at::empty({16, 8}, c.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(a.scalar_type(), "selftest_mma", AT_DISPATCH_CASE(at::kBFloat16, [&] {
    DeviceMemory mem;
    emulate_launch(mma_kernel<emu_t<scalar_t>>, dim3(1), dim3(32), (16 * 16 + 16 * 24 + 8 * 24) * 2, mem.in<scalar_t>(ac, "a"),
                   mem.in<scalar_t>(bc, "b"), mem.in<float>(cc, "c"), mem.out<float>(d, "d"), int(variant));
    mem.finish();
  }) AT_DISPATCH_CASE(at::kHalf, [&] {
    DeviceMemory mem;
    emulate_launch(mma_kernel<emu_t<scalar_t>>, dim3(1), dim3(32), (16 * 16 + 16 * 24 + 8 * 24) * 2, mem.in<scalar_t>(ac, "a"),
                   mem.in<scalar_t>(bc, "b"), mem.in<float>(cc, "c"), mem.out<float>(d, "d"), int(variant));
    mem.finish();
  }));
  return d;
}

// x [n, 4] float -> y [n, 4] through cp.async into shared memory; see cp_async_kernel.
at::Tensor cp_async(const at::Tensor& x, int64_t valid, int64_t variant) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(),
                    "selftest_cp_async: 'x' must be a contiguous float [n, 4]");
  auto y = at::empty_like(x);
  DeviceMemory mem;
  const auto* px = reinterpret_cast<const float4*>(mem.in<float>(x, "x"));
  auto* py = reinterpret_cast<float4*>(mem.out<float>(y, "y"));
  emulate_launch(cp_async_kernel, dim3(1), dim3(unsigned(x.size(0))), size_t(x.size(0)) * 16, px, py, int(valid),
                 int(variant));
  mem.finish();
  return y;
}

// Runs one deliberately broken kernel; returns its output when the emulation did not object.
at::Tensor broken(const std::string& name, int64_t n) {
  auto out = at::zeros({std::max<int64_t>(n, 64)}, at::TensorOptions().dtype(at::kFloat));
  DeviceMemory mem;
  if (name == "oob_read") {
    auto x = at::ones({n}, out.options());
    const float* px = mem.in<float>(x, "x");
    float* po = mem.inout<float>(out, "out");
    emulate_launch(oob_read_kernel, dim3(unsigned((n + 31) / 32)), dim3(32), 0, px, po, n);
    mem.finish();
    return out.narrow(0, 0, n);
  }
  if (name.rfind("oob_write", 0) == 0) {
    auto y = at::zeros({n}, out.options());
    float* py = mem.inout<float>(y, "y");
    const int64_t offset = name == "oob_write_end" ? 0 : name == "oob_write_far" ? 5000 : -(n + 1);
    emulate_launch(oob_write_kernel, dim3(unsigned(n / 32 + 1)), dim3(32), 0, py, n, offset);
    mem.finish();
    return y;
  }
  float* po = mem.inout<float>(out, "out");
  if (name == "shfl_inactive_lane") emulate_launch(shfl_inactive_lane_kernel, dim3(1), dim3(32), 0, po);
  else if (name == "shfl_exited_lane") emulate_launch(shfl_exited_lane_kernel, dim3(1), dim3(32), 0, po);
  else if (name == "shfl_mask_excludes_self") emulate_launch(shfl_mask_excludes_self_kernel, dim3(1), dim3(32), 0, po);
  else if (name == "partial_warp") emulate_launch(partial_warp_kernel, dim3(1), dim3(48), 0, po);
  else if (name == "divergent_barrier") emulate_launch(divergent_barrier_kernel, dim3(1), dim3(64), 0, po);
  else if (name == "misaligned_vec") emulate_launch(misaligned_vec_kernel, dim3(1), dim3(8), 0, po);
  else if (name == "block_too_large") emulate_launch(partial_warp_kernel, dim3(1), dim3(2048), 0, po);
  else TORCH_CHECK_VALUE(false, "selftest_broken: unknown 'name' ", name);
  mem.finish();
  return out;
}

}  // namespace
}  // namespace raekern::emu_selftest

TORCH_LIBRARY_FRAGMENT(raekern_emu, m) {
  namespace st = raekern::emu_selftest;
  m.def("selftest_row_stats(Tensor x, int block, int vec, bool broken=False, int max_blocks=65535) -> Tensor",
        &st::row_stats);
  m.def("selftest_reverse(Tensor x, int block, str variant) -> Tensor", &st::reverse);
  m.def("selftest_warp_ops(Tensor x, int block, int width, int delta) -> Tensor", &st::warp_ops);
  m.def("selftest_atomics(Tensor idx, Tensor val, int bins, int grid, int block) -> (Tensor, Tensor, Tensor)",
        &st::atomics);
  m.def("selftest_coords(int[] grid, int[] block) -> Tensor", &st::coords);
  m.def("selftest_math(Tensor x) -> Tensor", &st::math);
  m.def("selftest_convert(Tensor x, ScalarType dtype) -> (Tensor, Tensor)", &st::convert);
  m.def("selftest_broken(str name, int n=64) -> Tensor", &st::broken);
  m.def("selftest_mma(Tensor a, Tensor b, Tensor c, int variant=0) -> Tensor", &st::mma);
  m.def("selftest_cp_async(Tensor x, int valid, int variant=0) -> Tensor", &st::cp_async);
}
#endif  // RAEKERN_HOST_EMULATION
