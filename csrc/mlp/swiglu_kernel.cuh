// Device code of the mlp family: SwiGLU forward and backward as one elementwise SIMT kernel.
// Includes only common/simt.cuh and plain-data headers, so the host emulation runs it in tests.
// Also verified under the host emulation.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
//
// Grid: x = column tiles of blockDim.x * V elements, y = rows of the collapsed shape (mlp_params.h),
// both grid-stride. A thread handles V consecutive elements of a row with V-wide (<= 16-byte)
// accesses when the launcher found every operand aligned (swiglu_launch.h), scalar otherwise; a
// row's last partial vector runs scalar. Arithmetic is fp32 (mlp_params.h's sigmoid_pair, stable
// for any |a|), rounded once on store. All indices are 64-bit.
#pragma once
#include "common/simt.cuh"
#include "mlp/mlp_params.h"

namespace raekern::mlp::cuda {

using simt::from_float;
using simt::to_float;

template <class T, int V>
__global__ void swiglu_forward(Params p) {
  const int in = p.ndim - 1;
  const int64_t L = p.cols;
  const int64_t sa = p.a.stride[in], sb = p.b.stride[in], so = p.out.stride[in];
  const int64_t col_step = int64_t(gridDim.x) * blockDim.x * V;
  const int64_t col0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    if (col0 >= L) break;
    const Operand* const ops[3] = {&p.a, &p.b, &p.out};
    int64_t off[3];
    row_offsets(p, row, ops, off);
    const T* a = static_cast<const T*>(p.a.ptr) + off[0];
    const T* b = static_cast<const T*>(p.b.ptr) + off[1];
    T* out = static_cast<T*>(p.out.ptr) + off[2];
    for (int64_t c = col0; c < L; c += col_step) {
      if (V > 1 && c + V <= L) {
        float av[V], bv[V];
        simt::load_vec<T, V>(a + c, av);
        simt::load_vec<T, V>(b + c, bv);
#pragma unroll
        for (int j = 0; j < V; ++j) av[j] = swiglu_value(av[j], bv[j]);
        simt::store_vec<T, V>(out + c, av);
      } else {
        const int64_t end = c + V < L ? c + V : L;
        for (int64_t i = c; i < end; ++i)
          out[i * so] = from_float<T>(swiglu_value(to_float(a[i * sa]), to_float(b[i * sb])));
      }
    }
  }
}

template <class T, int V>
__global__ void swiglu_backward(Params p) {
  const int in = p.ndim - 1;
  const int64_t L = p.cols;
  const int64_t sg = p.grad.stride[in], sa = p.a.stride[in], sb = p.b.stride[in];
  const int64_t sda = p.da.stride[in], sdb = p.db.stride[in];
  const int64_t col_step = int64_t(gridDim.x) * blockDim.x * V;
  const int64_t col0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    if (col0 >= L) break;
    const Operand* const ops[5] = {&p.grad, &p.a, &p.b, &p.da, &p.db};
    int64_t off[5];
    row_offsets(p, row, ops, off);
    const T* g = static_cast<const T*>(p.grad.ptr) + off[0];
    const T* a = static_cast<const T*>(p.a.ptr) + off[1];
    const T* b = static_cast<const T*>(p.b.ptr) + off[2];
    T* da = static_cast<T*>(p.da.ptr) + off[3];
    T* db = static_cast<T*>(p.db.ptr) + off[4];
    for (int64_t c = col0; c < L; c += col_step) {
      if (V > 1 && c + V <= L) {
        float gv[V], av[V], bv[V];
        simt::load_vec<T, V>(g + c, gv);
        simt::load_vec<T, V>(a + c, av);
        simt::load_vec<T, V>(b + c, bv);
#pragma unroll
        for (int j = 0; j < V; ++j) swiglu_grad(gv[j], av[j], bv[j], av[j], bv[j]);
        simt::store_vec<T, V>(da + c, av);
        simt::store_vec<T, V>(db + c, bv);
      } else {
        const int64_t end = c + V < L ? c + V : L;
        for (int64_t i = c; i < end; ++i) {
          float ga, gb;
          swiglu_grad(to_float(g[i * sg]), to_float(a[i * sa]), to_float(b[i * sb]), ga, gb);
          da[i * sda] = from_float<T>(ga);
          db[i * sdb] = from_float<T>(gb);
        }
      }
    }
  }
}

}  // namespace raekern::mlp::cuda
