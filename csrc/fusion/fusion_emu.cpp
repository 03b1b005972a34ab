// The fusion family's CUDA kernels (fusion/*_kernel.cuh) run on the host emulation, for
// python_tests/test_fusion_emulation.py. The ops are the CUDA launch plans themselves
// (fusion/*_launch.h: the same checks, allocation, row layout, grids, shared memory and passes as
// the .cu files) instantiated with EmuDev, which maps every tensor into a guarded "device" buffer
// and launches through emulate_launch. Registered as torch.ops.raekern_emu.<op> with the schemas of
// torch.ops.raekern.<op>, on CPU tensors.
// Compiles to nothing in a checkout without the host emulation (the tests then skip).
#if defined(RAEKERN_HOST_EMULATION) && __has_include("common/emulation_torch.h")
#include <torch/library.h>

#include <limits>
#include <utility>
#include <vector>

#include "common/emulation_torch.h"
#include "fusion/depth_route_launch.h"
#include "fusion/fusion_schema.h"
#include "fusion/latent_normalize_launch.h"
#include "fusion/layer_stack_fuse_launch.h"

namespace raekern::fusion::cuda {
namespace {

// SM count the emulated launches plan for (depth_route backward's grid); the test lowers it to make
// blocks stride over several tokens.
thread_local int64_t tl_workers = 132;  // an H100's, as CudaDev::workers would report

void launch_config(int64_t workers) {
  RAEKERN_CHECK(workers >= 1, "fusion_launch_config", "workers", "must be >= 1, got ", workers);
  tl_workers = workers;
}

// Bytes of storage a view addresses from its first element (strides are non-negative here).
size_t span_bytes(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
  return size_t(span) * t.element_size();
}

struct EmuDev {
  template <class S> using elem = emu::emu_t<S>;
  explicit EmuDev(const at::Tensor& like) {
    RAEKERN_CHECK(like.device().is_cpu(), "raekern_emu", "tensors", "must be CPU tensors (the emulation runs on the host)");
  }
  const void* in(const at::Tensor& t, const char* name) { return mem.in_bytes(t.data_ptr(), span_bytes(t), name); }
  void* out(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_non_overlapping_and_dense(), "host emulation: output '", name, "' must be dense");
    keep.push_back(t);
    return mem.out_bytes(t.data_ptr(), span_bytes(t), name);
  }
  void* inout(const at::Tensor& t, const char* name) {
    keep.push_back(t);
    return mem.inout_bytes(t.data_ptr(), span_bytes(t), name);
  }
  // A GPU's fresh allocation holds garbage: NaN makes an element the kernel fails to write visible.
  void fresh(at::Tensor& t) { t.fill_(std::numeric_limits<double>::quiet_NaN()); }
  int64_t workers(const at::Tensor&) { return tl_workers; }
  template <class... P, class... A>
  void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
    emu::emulate_launch(kernel, grid, block, smem, std::forward<A>(args)...);
  }
  void finish() { mem.finish(); }
  emu::DeviceMemory mem;
  // finish() copies results back into these: a plan may drop its handle to a scratch tensor (the
  // backward's token-mean buffer) before finishing, as a CUDA launcher may.
  std::vector<at::Tensor> keep;
};

}  // namespace
}  // namespace raekern::fusion::cuda

TORCH_LIBRARY_FRAGMENT(raekern_emu, m) {
  raekern::fusion::define_schemas(m);
  m.def("fusion_launch_config(int workers=132) -> ()", &raekern::fusion::cuda::launch_config);
}

TORCH_LIBRARY_IMPL(raekern_emu, CPU, m) {
  using raekern::fusion::cuda::EmuDev;
  namespace c = raekern::fusion::cuda;
  m.impl("layer_stack_fuse", &c::layer_stack_fuse_op<EmuDev>);
  m.impl("layer_stack_fuse_backward", &c::layer_stack_fuse_backward_op<EmuDev>);
  m.impl("depth_route", &c::depth_route_op<EmuDev>);
  m.impl("depth_route_backward", &c::depth_route_backward_op<EmuDev>);
  m.impl("latent_normalize", &c::latent_normalize_op<EmuDev>);
  m.impl("latent_normalize_backward", &c::latent_normalize_backward_op<EmuDev>);
  m.impl("latent_denormalize", &c::latent_denormalize_op<EmuDev>);
  m.impl("latent_denormalize_backward", &c::latent_denormalize_backward_op<EmuDev>);
}
#endif  // RAEKERN_HOST_EMULATION
