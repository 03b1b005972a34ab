// Every raekern schema, grouped by family. Each family lists its schemas in
// csrc/<family>/<family>_schema.h; CPU and CUDA implementations register beside their kernels.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "attention/attention_schema.h"
#include "common/output_alloc.h"
#include "fusion/fusion_schema.h"
#include "guidance/guidance_schema.h"
#include "mlp/mlp_schema.h"
#include "norm/norm_schema.h"

namespace raekern {

// What `raekern info` reports about this build.
static std::string build_info() {
  std::string s = "cpu_arch=" RAEKERN_CPU_ARCH_NAME;
#if defined(__AVX512F__)
  s += ";cpu_isa=avx512f";
#if defined(__AVX512BF16__)
  s += "+avx512bf16";
#endif
#elif defined(__AVX2__)
  s += ";cpu_isa=avx2";
#else
  s += ";cpu_isa=baseline";
#endif
#if defined(__FMA__)
  s += "+fma";
#endif
#ifdef RAEKERN_WITH_CUDA
  s += ";cuda_archs=" RAEKERN_CUDA_ARCHS_STR;
#else
  s += ";cuda_archs=";
#endif
  s += ";openmp=";
#ifdef _OPENMP
  s += std::to_string(_OPENMP);
#endif
  return s;
}

}  // namespace raekern

TORCH_LIBRARY(raekern, m) {
  m.def("build_info() -> str", &raekern::build_info);
  // The cache of large CPU output blocks (common/output_alloc.h): give them back / how much it holds.
  m.def("release_cpu_output_cache() -> int", [] { return raekern::LargeBlockCache::get().release(); });
  m.def("cpu_output_cache_bytes() -> int", [] { return raekern::LargeBlockCache::get().cached_bytes(); });
  // An uninitialised CPU tensor allocated like the ops' outputs (from the cache from 32 MiB on), for
  // Python callers that write it in full through an out= argument (the model backend's large GEMMs).
  m.def("empty_cpu_output(int[] size, ScalarType dtype) -> Tensor",
        [](c10::IntArrayRef size, c10::ScalarType dtype) { return raekern::empty_output(size, at::TensorOptions().dtype(dtype)); });
  raekern::attention::define_schemas(m);
  raekern::fusion::define_schemas(m);
  raekern::guidance::define_schemas(m);
  raekern::mlp::define_schemas(m);
  raekern::norm::define_schemas(m);
}

// `import raekern._C` loads this library (and so registers the ops); it holds no Python API.
extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "raekern compiled ops (see torch.ops.raekern)", -1,
                            nullptr};
  return PyModule_Create(&def);
}
