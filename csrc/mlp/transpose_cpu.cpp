// CPU kernel of transpose_copy (y = xᵀ as one contiguous [C, R] tensor, x a 2-D [R, C]).
//
// Why an op: on AMD CPUs the raekern backend runs fp32 Linears through oneDNN's GEMM
// (raekern/models/layers.py), which takes both operands with the reduction dimension contiguous. A
// Linear's weight gradient dyᵀ·x reduces over the tokens, so dy and x are transposed first, and
// torch copies a transposed fp32 matrix in single-threaded 60×60 blocks: 3.7-10 GB/s on a Zen 5 at
// [2048, 1152..12288], 10 % of a DiT-DH-S training step. Here 16×16 (AVX-512) or 8×8 (AVX2)
// in-register transposes in tasks of kTileR rows × kTileC columns, spread over the threads, into an
// output allocated with the huge-page hint (a 50 MB operand otherwise costs 12,800 page faults).
// 4-byte elements with contiguous rows take it; everything else takes transpose_copy_generic.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/cpu_convert.h"
#include "common/cpu_vec_math.h"
#include "common/output_alloc.h"
#include "mlp/transpose.h"

namespace raekern::mlp {
namespace {

// A task: kTileR input rows × kTileC input columns, i.e. one 64-byte line of each of 1024 input rows
// and 4 KiB runs of 16 output rows. Measured on a Zen 5 against 256 × 64, 128 × 128, 512 × 32 and
// 2048 × 16 tiles: 0.26 against 0.40-0.79 ms at [2048, 1152], 4.5 against 4.8-10 ms at [2048, 6144].
constexpr int64_t kTileR = 1024;
constexpr int64_t kTileC = 16;

#if defined(RAEKERN_CPU_VEC16)
constexpr int64_t kV = 16;
// One kV×kV block: src rows i (stride ss) become dst rows (stride ds).
inline void block(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  raekern::cpu::transpose16(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ds, r[i]);
}
#elif defined(RAEKERN_CPU_VEC8)
constexpr int64_t kV = 8;
inline void block(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  raekern::cpu::transpose8(r);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ds, r[i]);
}
#else
constexpr int64_t kV = 1;
inline void block(const float* src, int64_t, float* dst, int64_t) { *dst = *src; }
#endif

// x: R rows of C floats, row stride sx (unit column stride); y: C rows of R floats.
void transpose_f32(const float* x, int64_t sx, int64_t R, int64_t C, float* y) {
  const int64_t tr = (R + kTileR - 1) / kTileR, tc = (C + kTileC - 1) / kTileC;
  at::parallel_for(0, tr * tc, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r0 = task / tc * kTileR, c0 = task % tc * kTileC;
      const int64_t r1 = std::min(R, r0 + kTileR), c1 = std::min(C, c0 + kTileC);
      int64_t r = r0;
      for (; r + kV <= r1; r += kV) {
        int64_t c = c0;
        for (; c + kV <= c1; c += kV) block(x + r * sx + c, sx, y + c * R + r, R);
        for (; c < c1; ++c)
          for (int64_t i = 0; i < kV; ++i) y[c * R + r + i] = x[(r + i) * sx + c];
      }
      for (; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) y[c * R + r] = x[r * sx + c];
    }
  });
}

at::Tensor transpose_copy_cpu(const at::Tensor& x) {
  check_transpose_input(x);
  // Rows of 4-byte elements, contiguous within the row (any row stride, 0 included). A column-major x
  // (xᵀ contiguous) is a plain copy, which torch's copy does at full speed.
  if (x.element_size() != 4 || x.stride(1) != 1 || x.size(1) == 1 || x.numel() == 0)
    return transpose_copy_generic(x);
  const int64_t R = x.size(0), C = x.size(1);
  at::Tensor y = ::raekern::empty_output({C, R}, x.options());
  transpose_f32(static_cast<const float*>(x.data_ptr()), x.stride(0), R, C, static_cast<float*>(y.data_ptr()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CPU, m) { m.impl("transpose_copy", &transpose_copy_cpu); }

}  // namespace raekern::mlp
