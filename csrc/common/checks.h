// Argument checks shared by every op. Each error names the op, the argument and what was expected,
// so a user sees e.g. "raekern.rms_norm: argument 'weight' must have 768 elements, got 512".
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <initializer_list>
#include <string>

namespace raekern {

#define RAEKERN_CHECK(cond, op, arg, ...) \
  TORCH_CHECK_VALUE((cond), "raekern.", op, ": argument '", arg, "' ", __VA_ARGS__)

inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  RAEKERN_CHECK(t.is_floating_point() && t.scalar_type() != at::kFloat8_e4m3fn &&
                    t.scalar_type() != at::kFloat8_e5m2,
                op, arg, "must be float64/float32/bfloat16/float16, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg) {
  RAEKERN_CHECK(t.dim() == dim, op, arg, "must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_min_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg) {
  RAEKERN_CHECK(t.dim() >= dim, op, arg, "must have at least ", dim, " dimensions, got shape ",
                t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* arg) {
  RAEKERN_CHECK(t.device() == ref.device(), op, arg, "must be on ", ref.device(), " like the input, got ",
                t.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* arg) {
  RAEKERN_CHECK(t.scalar_type() == ref.scalar_type(), op, arg, "must have dtype ", ref.scalar_type(),
                " like the input, got ", t.scalar_type());
}

inline void check_last_dim(const at::Tensor& t, int64_t d, const char* op, const char* arg) {
  RAEKERN_CHECK(t.dim() >= 1 && t.size(-1) == d, op, arg, "must have last dimension ", d, ", got shape ",
                t.sizes());
}

// Index arithmetic is 64-bit everywhere; this only guards kernels that keep a 32-bit fast path.
inline bool fits_int32(const at::Tensor& t) { return t.numel() < (int64_t(1) << 31); }

}  // namespace raekern
