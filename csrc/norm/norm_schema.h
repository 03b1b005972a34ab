// Schemas of the norm family (DESIGN §3.1).
#pragma once
#include <torch/library.h>

namespace raekern::norm {

inline void define_schemas(torch::Library& m) {
  (void)m;  // the norm family's schemas are added with its kernels
}

}  // namespace raekern::norm
