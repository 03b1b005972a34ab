// The test-only library raekern._emu: SIMT CUDA kernels launched through the host emulation
// (common/host_emulation.h). Ops live under torch.ops.raekern_emu; each family adds its own with
// TORCH_LIBRARY_FRAGMENT(raekern_emu, m) in csrc/<family>/<family>_emu.cpp.
#ifdef RAEKERN_HOST_EMULATION
#include <Python.h>
#include <torch/library.h>

#include "common/emulation_torch.h"

namespace raekern::emu {
namespace {

void set_schedule_op(const std::string& policy, int64_t seed) { set_schedule(parse_schedule(policy), uint64_t(seed)); }

std::string schedule_op() {
  switch (schedule()) {
    case Schedule::kForward: return "forward";
    case Schedule::kReverse: return "reverse";
    case Schedule::kRandom: break;
  }
  return "random";
}

}  // namespace
}  // namespace raekern::emu

TORCH_LIBRARY(raekern_emu, m) {
  // Thread order between barriers for the following launches on the calling thread.
  m.def("set_schedule(str policy, int seed=0) -> ()", &raekern::emu::set_schedule_op);
  m.def("schedule() -> str", &raekern::emu::schedule_op);
}

// `import raekern._emu` loads this library and so registers torch.ops.raekern_emu.*.
extern "C" __attribute__((visibility("default"))) PyObject* PyInit__emu(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_emu",
                            "raekern SIMT CUDA kernels on the host emulation (tests only)", -1, nullptr};
  return PyModule_Create(&def);
}
#endif  // RAEKERN_HOST_EMULATION
