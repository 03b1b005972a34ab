// The mlp family's CUDA kernels (mlp/swiglu_kernel.cuh) run on the host emulation, for
// python_tests/test_mlp.py. The four ops are the family's own host layer (mlp_host.h: the same
// checks, output allocation and stride collapse as on CUDA) with an emulated backend: every operand
// is mapped into a guarded "device" buffer covering the span its strides address, and the kernels
// are launched with swiglu_launch.h's plan, as swiglu.cu launches them; on top of it the test may
// force the block size and cap the grid (torch.ops.raekern_emu.swiglu_launch_config) to exercise
// partial blocks and the grid-stride loops.
#if defined(RAEKERN_HOST_EMULATION) && __has_include("mlp/swiglu_kernel.cuh")
#include <torch/library.h>

#include <algorithm>

#include "common/emulation_torch.h"
#include "mlp/mlp_host.h"
#include "mlp/mlp_schema.h"
#include "mlp/swiglu_kernel.cuh"
#include "mlp/swiglu_launch.h"

namespace raekern::mlp {
namespace {

using emu::DeviceMemory;
using emu::emu_t;

thread_local int64_t tl_block = 0, tl_grid_x = 0, tl_grid_y = 0;

void launch_config(int64_t block, int64_t max_grid_x, int64_t max_grid_y) {
  RAEKERN_CHECK(block >= 0 && block <= 1024, "swiglu_launch_config", "block", "must be in [0, 1024], got ", block);
  RAEKERN_CHECK(max_grid_x >= 0, "swiglu_launch_config", "max_grid_x", "must be >= 0, got ", max_grid_x);
  RAEKERN_CHECK(max_grid_y >= 0, "swiglu_launch_config", "max_grid_y", "must be >= 0, got ", max_grid_y);
  tl_block = block, tl_grid_x = max_grid_x, tl_grid_y = max_grid_y;
}

// Host bytes [begin, end) an operand's strides address.
std::pair<uintptr_t, uintptr_t> span(const Params& p, const Operand& o, size_t elem) {
  int64_t last = 0;
  for (int d = 0; d < p.ndim; ++d) last += (p.size[d] - 1) * o.stride[d];
  const auto begin = reinterpret_cast<uintptr_t>(o.ptr);
  return {begin, begin + size_t(last + 1) * elem};
}

void place_in(DeviceMemory& mem, const Params& hp, Operand& o, size_t elem, const char* name) {
  const auto [b, e] = span(hp, o, elem);
  o.ptr = const_cast<void*>(mem.in_bytes(o.ptr, e - b, name));
}

// Outputs start as NaN, so an element the kernel misses is seen. Two outputs that share storage (the
// packed backward's halves of d(ab)) get one buffer, so copying one back cannot undo the other.
void place_outs(DeviceMemory& mem, const Params& hp, Operand& x, Operand& y, size_t elem, const char* nx,
                const char* ny) {
  const auto [xb, xe] = span(hp, x, elem);
  if (!y.ptr) {
    x.ptr = mem.out_bytes(x.ptr, xe - xb, nx);
    return;
  }
  const auto [yb, ye] = span(hp, y, elem);
  if (xb < ye && yb < xe) {
    const uintptr_t b = std::min(xb, yb), e = std::max(xe, ye);
    auto* buf = static_cast<char*>(mem.out_bytes(reinterpret_cast<void*>(b), e - b, "grad_ab"));
    x.ptr = buf + (xb - b);
    y.ptr = buf + (yb - b);
    return;
  }
  x.ptr = mem.out_bytes(x.ptr, xe - xb, nx);
  y.ptr = mem.out_bytes(y.ptr, ye - yb, ny);
}

template <class T>
void launch(const Params& p, bool backward) {
  using E = emu_t<T>;
  Launch l = plan_launch(p, backward, sizeof(E));
  // Test knobs on top of the shared plan (the kernels are grid-stride in both directions).
  if (tl_block > 0) l.threads = unsigned(tl_block);
  if (tl_grid_x > 0) l.grid_x = std::min(l.grid_x, tl_grid_x);
  if (tl_grid_y > 0) l.grid_y = std::min(l.grid_y, tl_grid_y);
  const dim3 grid(unsigned(l.grid_x), unsigned(l.grid_y)), block(l.threads);
  auto go = [&](auto fwd, auto bwd) {
    if (backward) emu::emulate_launch(bwd, grid, block, 0, p);
    else emu::emulate_launch(fwd, grid, block, 0, p);
  };
  switch (l.vec) {
    case 1: return go(cuda::swiglu_forward<E, 1>, cuda::swiglu_backward<E, 1>);
    case 2: return go(cuda::swiglu_forward<E, 2>, cuda::swiglu_backward<E, 2>);
    case 4: return go(cuda::swiglu_forward<E, 4>, cuda::swiglu_backward<E, 4>);
    default:
      if constexpr (sizeof(E) <= 2) return go(cuda::swiglu_forward<E, 8>, cuda::swiglu_backward<E, 8>);
  }
}

void run(const Params& hp, at::ScalarType st, bool backward) {
  RAEKERN_CHECK(st != at::kDouble, backward ? "swiglu_backward" : "swiglu", "a",
                "float64 has no CUDA kernel; emulate float32/bfloat16/float16");
  const size_t es = c10::elementSize(st);
  DeviceMemory mem;
  Params p = hp;
  place_in(mem, hp, p.a, es, "a");
  place_in(mem, hp, p.b, es, "b");
  if (backward) {
    place_in(mem, hp, p.grad, es, "grad");
    place_outs(mem, hp, p.da, p.db, es, "grad_a", "grad_b");
  } else {
    Operand none;
    place_outs(mem, hp, p.out, none, es, "out", "");
  }
  RAEKERN_EMU_DISPATCH(st, "swiglu_emu", [&] { launch<scalar_t>(p, backward); });
  mem.finish();
}

void forward_emu(const Params& p, at::ScalarType st) { run(p, st, false); }
void backward_emu(const Params& p, at::ScalarType st) { run(p, st, true); }

}  // namespace

const Backend kEmu{forward_emu, backward_emu};

}  // namespace raekern::mlp

// torch.ops.raekern_emu.<op> has the schema of torch.ops.raekern.<op> and runs the CUDA kernels here.
TORCH_LIBRARY_FRAGMENT(raekern_emu, m) {
  raekern::mlp::define_schemas(m);
  m.def("swiglu_launch_config(int block=0, int max_grid_x=0, int max_grid_y=0) -> ()",
        &raekern::mlp::launch_config);
}

TORCH_LIBRARY_IMPL(raekern_emu, CPU, m) { raekern::mlp::register_impls<&raekern::mlp::kEmu>(m); }
#endif  // RAEKERN_HOST_EMULATION
