// The norm family's CUDA kernels (norm/fused_norm_kernel.cuh) run on the host emulation, for
// python_tests/test_norm_emulated.py. The ten ops are the family's own host layer (norm_host.h: the
// same argument checks, output allocation and broadcast-gradient plan as on CUDA) with an emulated
// backend: every pointer of FwdParams/BwdParams is mapped into a guarded "device" buffer and the
// kernels are launched with fused_norm.cu's own launch decisions (norm/norm_launch.h), on which the
// test may override the block size, grid cap and task count (torch.ops.raekern_emu.norm_launch_config).
// Compiles to nothing in a checkout without the norm family's CUDA kernels (the test then skips).
#if defined(RAEKERN_HOST_EMULATION) && __has_include("norm/fused_norm_kernel.cuh")
#include <torch/library.h>

#include <algorithm>

#include "common/emulation_torch.h"
#include "norm/fused_norm_kernel.cuh"
#include "norm/norm_host.h"
#include "norm/norm_launch.h"
#include "norm/norm_schema.h"

namespace raekern::norm {
namespace {

using emu::DeviceMemory;
using emu::emu_t;

// Launch shape for the following emulated norm ops on this thread; 0 = what fused_norm.cu chooses.
thread_local int64_t tl_block = 0;
thread_local int64_t tl_max_grid = 0;
thread_local int64_t tl_workers = 132;  // an H100's SM count, as cuda_workers() would report

void launch_config(int64_t block, int64_t max_grid, int64_t workers) {
  RAEKERN_CHECK(block >= 0 && block <= 1024, "norm_launch_config", "block", "must be in [0, 1024], got ", block);
  RAEKERN_CHECK(max_grid >= 0, "norm_launch_config", "max_grid", "must be >= 0, got ", max_grid);
  RAEKERN_CHECK(workers >= 1, "norm_launch_config", "workers", "must be >= 1, got ", workers);
  tl_block = block, tl_max_grid = max_grid, tl_workers = workers;
}

// ---- fused_norm.cu's launch (norm_launch.h), with the test's overrides on top ----

NormLaunch with_overrides(NormLaunch ln, bool cap_grid) {
  if (tl_block > 0) ln.block = unsigned(tl_block);
  if (cap_grid && tl_max_grid > 0) ln.grid = unsigned(std::min<int64_t>(ln.grid, tl_max_grid));
  return ln;
}

// The block kernel's row buffer, also when a rows-kernel plan falls back to it.
size_t smem_of(const NormLaunch& ln, const FwdParams& p) { return ln.nv > 0 ? size_t(p.D) * sizeof(float) : ln.smem; }

template <class T>
void forward_typed(const FwdParams& p) {
  using E = emu_t<T>;
  constexpr int V = simt::kVec16<E>;
  const NormLaunch ln = with_overrides(forward_launch(p, sizeof(E)), true);
  if (ln.nv > 0 && ln.block % simt::kWarp == 0)  // (a test's block size override: whole warps only)
    cuda::with_rows_kernel<E, V>(ln.nv, [&](auto k) { emu::emulate_launch(k, dim3(ln.grid), dim3(ln.block), 0, p); });
  else if (ln.vec) emu::emulate_launch(cuda::fused_norm_forward<E, V>, dim3(ln.grid), dim3(ln.block), smem_of(ln, p), p);
  else emu::emulate_launch(cuda::fused_norm_forward<E, 1>, dim3(ln.grid), dim3(ln.block), smem_of(ln, p), p);
}

template <class T>
void backward_typed(const BwdParams& p) {
  using E = emu_t<T>;
  constexpr int V = simt::kVec16<E>;
  // One block per task: the grid cannot be capped (no grid-stride loop over tasks).
  const NormLaunch ln = with_overrides(backward_launch(p, sizeof(E)), false);
  if (ln.nv > 0 && ln.block % simt::kWarp == 0)  // a test's block override sizes the per-warp slabs
    cuda::with_rows_backward_kernel<E, V>(ln.nv, [&](auto k) {
      emu::emulate_launch(k, dim3(ln.grid), dim3(ln.block), rows_backward_smem(p, ln.block), p);
    });
  else if (ln.nv > 0) emu::emulate_launch(cuda::fused_norm_backward<E, V>, dim3(ln.grid), dim3(ln.block),
                                          size_t(2 + p.num_partials) * size_t(p.D) * sizeof(float), p);
  else if (ln.vec) emu::emulate_launch(cuda::fused_norm_backward<E, V>, dim3(ln.grid), dim3(ln.block), ln.smem, p);
  else emu::emulate_launch(cuda::fused_norm_backward<E, 1>, dim3(ln.grid), dim3(ln.block), ln.smem, p);
}

// ---- host memory -> guarded device buffers ----

size_t span_bytes(const Operand& o, int64_t B, int64_t N, int64_t D, size_t elem) {
  if (o.ptr == nullptr || B * N * D == 0) return 0;
  return size_t(1 + (B - 1) * o.sb + (N - 1) * o.sn + (D - 1) * o.sd) * elem;
}

Operand dev_in(DeviceMemory& mem, const Operand& o, int64_t B, int64_t N, int64_t D, size_t elem,
               const char* name) {
  Operand d = o;
  d.ptr = mem.in_bytes(o.ptr, span_bytes(o, B, N, D, elem), name);
  return d;
}

void check_dtype(at::ScalarType st, const char* op) {
  RAEKERN_CHECK(st != at::kDouble, op, "x", "float64 has no CUDA kernel; emulate float32/bfloat16/float16");
}

void forward_emu(const FwdParams& hp, at::ScalarType st) {
  check_dtype(st, "norm");
  const int64_t B = hp.B, N = hp.N, D = hp.D, rows = B * N;
  const size_t es = c10::elementSize(st), as = sizeof(float);
  DeviceMemory mem;
  FwdParams p = hp;
  p.x = dev_in(mem, hp.x, B, N, D, es, "x");
  p.gate = dev_in(mem, hp.gate, B, N, D, es, "gate");
  p.y = dev_in(mem, hp.y, B, N, D, es, "y");
  p.shift = dev_in(mem, hp.shift, B, N, D, es, "shift");
  p.scale = dev_in(mem, hp.scale, B, N, D, es, "scale");
  p.weight = mem.in_bytes(hp.weight, D * as, "weight");
  p.bias = mem.in_bytes(hp.bias, D * as, "bias");
  p.x_out = mem.out_bytes(hp.x_out, rows * D * es, "x_out");
  p.out = mem.out_bytes(hp.out, rows * D * es, "out");
  // Statistics exist only when there is a norm; gated_residual's stay as the host allocated them.
  p.mean = hp.kind == Kind::None ? nullptr : mem.out_bytes(hp.mean, rows * as, "mean");
  p.rstd = hp.kind == Kind::None ? nullptr : mem.out_bytes(hp.rstd, rows * as, "rstd");
  RAEKERN_EMU_DISPATCH(st, "norm_forward_emu", [&] { forward_typed<scalar_t>(p); });
  mem.finish();
}

void* dev_slot(DeviceMemory& mem, const GradSlot& s, size_t bytes, const char* name) {
  return s.mode == GradMode::PerRow ? mem.out_bytes(s.ptr, bytes, name) : s.ptr;
}

void backward_emu(const BwdParams& hp, at::ScalarType st) {
  check_dtype(st, "norm_backward");
  const int64_t B = hp.B, N = hp.N, D = hp.D, rows = B * N;
  const size_t es = c10::elementSize(st), as = sizeof(float);
  DeviceMemory mem;
  BwdParams p = hp;
  p.dout = dev_in(mem, hp.dout, B, N, D, es, "grad_out");
  p.dxo = dev_in(mem, hp.dxo, B, N, D, es, "grad_x_out");
  p.xin = dev_in(mem, hp.xin, B, N, D, es, "xin");
  p.gate = dev_in(mem, hp.gate, B, N, D, es, "gate");
  p.y = dev_in(mem, hp.y, B, N, D, es, "y");
  p.scale = dev_in(mem, hp.scale, B, N, D, es, "scale");
  p.weight = mem.in_bytes(hp.weight, D * as, "weight");
  p.bias = mem.in_bytes(hp.bias, D * as, "bias");
  p.mean = mem.in_bytes(hp.mean, rows * as, "mean");
  p.rstd = mem.in_bytes(hp.rstd, rows * as, "rstd");
  p.dx = mem.out_bytes(hp.dx, rows * D * es, "grad_x");
  p.dy = mem.out_bytes(hp.dy, rows * D * es, "grad_y");
  p.dgate.ptr = dev_slot(mem, hp.dgate, rows * D * es, "grad_gate");
  p.dshift.ptr = dev_slot(mem, hp.dshift, rows * D * es, "grad_shift");
  p.dscale.ptr = dev_slot(mem, hp.dscale, rows * D * es, "grad_scale");
  p.dweight.ptr = dev_slot(mem, hp.dweight, rows * D * es, "grad_weight");
  p.dbias.ptr = dev_slot(mem, hp.dbias, rows * D * es, "grad_bias");
  // Every task must write its partial sums in full: they start as NaN.
  p.partials = mem.out_bytes(hp.partials, size_t(B * hp.chunks * hp.num_partials * D) * as, "partials");
  RAEKERN_EMU_DISPATCH(st, "norm_backward_emu", [&] { backward_typed<scalar_t>(p); });
  mem.finish();
}

int64_t emu_workers(const at::Tensor&) { return tl_workers; }

}  // namespace

// Same task granularity as the CUDA backend (fused_norm.cu's kCuda).
const Backend kEmu{forward_emu, backward_emu, emu_workers, kMinTaskRows};

}  // namespace raekern::norm

// torch.ops.raekern_emu.<op> has the schema of torch.ops.raekern.<op> and runs the CUDA kernels here.
TORCH_LIBRARY_FRAGMENT(raekern_emu, m) {
  raekern::norm::define_schemas(m);
  m.def("norm_launch_config(int block=0, int max_grid=0, int workers=132) -> ()", &raekern::norm::launch_config);
}

TORCH_LIBRARY_IMPL(raekern_emu, CPU, m) { raekern::norm::register_impls<&raekern::norm::kEmu>(m); }
#endif  // RAEKERN_HOST_EMULATION
