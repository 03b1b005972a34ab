// Plain data shared by the host layer (mlp_host.h), the CPU kernel and the CUDA/emulated kernel of
// the mlp family, plus the scalar SwiGLU math both device kinds use (one definition).
//
// Every operand is a strided view of the same logical shape [..., L] (a, b, their gradients, the
// output). The host collapses the shape jointly over all operands (adjacent dimensions that every
// operand can address with one stride are merged; size-1 dimensions dropped), so a contiguous
// problem becomes a single row of numel elements and the packed form [R, 2H] -> two [R, H] views
// becomes R rows of H. At most kMaxDims dimensions survive; the innermost ("row", length `cols`)
// is the one the kernels vectorise along.
#pragma once
#include <math.h>
#include <cstdint>

#ifndef RAEKERN_HD
#if defined(__CUDACC__) || defined(RAEKERN_HOST_EMULATION)
#define RAEKERN_HD __host__ __device__
#else
#define RAEKERN_HD
#endif
#endif

namespace raekern::mlp {

constexpr int kMaxDims = 4;

struct Operand {
  void* ptr = nullptr;
  int64_t stride[kMaxDims] = {0, 0, 0, 0};  // in elements, innermost last (index ndim - 1)
};

struct Params {
  int ndim = 1;
  int64_t size[kMaxDims] = {1, 1, 1, 1};
  int64_t rows = 1;  // product of size[0 .. ndim-2]
  int64_t cols = 0;  // size[ndim-1]
  // Forward reads a, b and writes out; backward reads grad, a, b and writes da, db.
  Operand a, b, grad, out, da, db;
  int device = -1;  // CUDA device index (launchers set their guard from it)
};

// Element offsets of row `row` in up to 6 operands, sharing one index decomposition.
template <int K>
RAEKERN_HD inline void row_offsets(const Params& p, int64_t row, const Operand* const (&ops)[K], int64_t (&off)[K]) {
  for (int k = 0; k < K; ++k) off[k] = 0;
  for (int d = p.ndim - 2; d >= 0; --d) {
    const int64_t n = p.size[d];
    const int64_t q = row / n, i = row - q * n;
    row = q;
    for (int k = 0; k < K; ++k) off[k] += i * ops[k]->stride[d];
  }
}

RAEKERN_HD inline float exp_neg_abs(float x) { return expf(-fabsf(x)); }
RAEKERN_HD inline double exp_neg_abs(double x) { return ::exp(-::fabs(x)); }

// sigmoid(x) and sigmoid(-x) = 1 - sigmoid(x) without overflow for any x: with e = exp(-|x|) in
// (0, 1], 1/(1+e) and e/(1+e) are the two values, assigned by the sign of x. Forming 1 - s by
// subtraction would lose all precision of sigmoid(-x) for large x (it matters in the backward).
template <class F>
RAEKERN_HD inline void sigmoid_pair(F x, F& s, F& sc) {
  const F e = exp_neg_abs(x);
  const F r = F(1) / (F(1) + e);
  const F q = e * r;
  const bool pos = x >= F(0);
  s = pos ? r : q;
  sc = pos ? q : r;
}

// silu(a)·b.
template <class F>
RAEKERN_HD inline F swiglu_value(F a, F b) {
  F s, sc;
  sigmoid_pair(a, s, sc);
  return a * s * b;
}

// d/da silu(a) = s·(1 + a·(1 - s)); returns {d a, d b} for upstream gradient g.
template <class F>
RAEKERN_HD inline void swiglu_grad(F g, F a, F b, F& da, F& db) {
  F s, sc;
  sigmoid_pair(a, s, sc);
  db = g * a * s;
  da = g * b * s * (F(1) + a * sc);
}

}  // namespace raekern::mlp
