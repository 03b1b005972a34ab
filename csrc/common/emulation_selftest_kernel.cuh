// Kernels that test the host emulation itself (python_tests/test_emulation.py): correct ones that
// exercise every emulated feature, and deliberately broken ones that the emulation must catch.
// Like every <op>_kernel.cuh, this includes only common/simt.cuh, so nvcc compiles it too.
#pragma once
#include "common/simt.cuh"
#include "common/tensor_core.cuh"

namespace raekern::emu_selftest {

using namespace raekern::simt;

// Block reduction with the second barrier missing: warp 0 may read a partial sum before another
// warp has stored its own.
__device__ __forceinline__ float block_sum_missing_barrier(float v, float* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  v = lane < nwarps ? smem[lane] : 0.f;
  return warp_sum(v);
}

// Per row, out[row] = {sum by block_sum (static shared memory), sum and sum of squares by block_sum2
// (dynamic shared memory)}. VEC elements per 16-byte load when the launcher found the row aligned.
template <class T, int VEC, bool kBroken>
__global__ void __launch_bounds__(1024)
    row_stats_kernel(const T* __restrict__ x, float* __restrict__ out, int64_t rows, int64_t cols,
                     int64_t row_stride) {
  __shared__ float red[kWarp];
  RAEKERN_DYNAMIC_SHARED(float, red2);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* p = x + row * row_stride;
    float s = 0.f, q = 0.f;
    const int64_t nvec = VEC > 1 ? cols / VEC : 0;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      float v[VEC];
      load_vec<T, VEC>(p + i * VEC, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += v[k], q += v[k] * v[k];
    }
    for (int64_t i = nvec * VEC + threadIdx.x; i < cols; i += blockDim.x) {
      const float v = to_float(p[i]);
      s += v, q += v * v;
    }
    float s2 = s;
    const float total = kBroken ? block_sum_missing_barrier(s, red) : block_sum(s, red);
    block_sum2(s2, q, red2);
    if (threadIdx.x == 0) {
      out[row * 3 + 0] = total;
      out[row * 3 + 1] = s2;
      out[row * 3 + 2] = q;
    }
  }
}

// Reverses each chunk of blockDim.x elements through shared memory. kVariant: 0 dynamic shared
// memory, 1 static, 2 dynamic without the barrier (a race), 3 one element past the dynamic allocation.
template <class T, int kVariant>
__global__ void reverse_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  __shared__ T stat[1024];
  RAEKERN_DYNAMIC_SHARED(T, dyn);
  T* buf = kVariant == 1 ? stat : dyn;
  const int64_t base = int64_t(blockIdx.x) * blockDim.x;
  const int len = int(n - base < int64_t(blockDim.x) ? n - base : int64_t(blockDim.x));
  const int t = threadIdx.x;
  if (t < len) buf[t] = x[base + t];
  if (kVariant == 3 && t == 0) buf[blockDim.x] = x[base];
  if (kVariant != 2) __syncthreads();
  if (t < len) y[base + t] = buf[len - 1 - t];
}

// Every warp collective; out is [kWarpOps][n] with n = gridDim.x * blockDim.x.
constexpr int kWarpOps = 11;
__global__ void warp_ops_kernel(const int* __restrict__ x, int* __restrict__ out, int width, int delta) {
  const int64_t n = int64_t(gridDim.x) * blockDim.x;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % kWarp;
  const int v = x[i];
  out[0 * n + i] = __shfl_sync(kFullMask, v, (lane * 7 + 3) % kWarp, width);
  out[1 * n + i] = __shfl_up_sync(kFullMask, v, delta, width);
  out[2 * n + i] = __shfl_down_sync(kFullMask, v, delta, width);
  out[3 * n + i] = __shfl_xor_sync(kFullMask, v, delta, width);
  out[4 * n + i] = int(__ballot_sync(kFullMask, v & 1));
  out[5 * n + i] = __any_sync(kFullMask, v > 90);
  out[6 * n + i] = __all_sync(kFullMask, v >= 0);
  out[7 * n + i] = __reduce_add_sync(kFullMask, v);
  out[8 * n + i] = __reduce_max_sync(kFullMask, v);
  // A collective over half a warp, only in the lower half.
  int h = -1;
  if (lane < 16) h = __shfl_down_sync(0x0000ffffu, v, 1, 16);
  __syncwarp();
  out[9 * n + i] = h;
  out[10 * n + i] = int(__match_any_sync(kFullMask, v % 3));
}

// Grid-stride histogram with float and integer atomics, a CAS loop and __syncthreads_count.
__global__ void atomics_kernel(const int* __restrict__ idx, const float* __restrict__ val, int64_t n,
                               float* __restrict__ hist, int* __restrict__ stats, int* __restrict__ block_pos) {
  int pos = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    atomicAdd(&hist[idx[i]], val[i]);
    atomicAdd(&stats[0], 1);
    atomicMax(&stats[1], idx[i]);
    // Float max via compare-and-swap on the bit pattern (values are non-negative).
    unsigned* bits = reinterpret_cast<unsigned*>(&stats[2]);
    unsigned old = *bits, assumed;
    do {
      assumed = old;
      if (__uint_as_float(assumed) >= val[i]) break;
      old = atomicCAS(bits, assumed, __float_as_uint(val[i]));
    } while (old != assumed);
    pos += val[i] > 0.5f;
  }
  const int c = __syncthreads_count(pos);
  if (threadIdx.x == 0) block_pos[blockIdx.x] = c;
}

// Each thread writes its coordinates: out[gid] = {threadIdx.xyz, blockIdx.xyz, blockDim.xyz, gridDim.xyz}.
__global__ void coords_kernel(int* __restrict__ out) {
  const int64_t block = blockIdx.x + int64_t(gridDim.x) * (blockIdx.y + int64_t(gridDim.y) * blockIdx.z);
  const int64_t tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int* o = out + (block * (blockDim.x * blockDim.y * blockDim.z) + tid) * 12;
  o[0] = threadIdx.x, o[1] = threadIdx.y, o[2] = threadIdx.z;
  o[3] = blockIdx.x, o[4] = blockIdx.y, o[5] = blockIdx.z;
  o[6] = blockDim.x, o[7] = blockDim.y, o[8] = blockDim.z;
  o[9] = gridDim.x, o[10] = gridDim.y, o[11] = gridDim.z;
}

// Math intrinsics; out is [8][n].
__global__ void math_kernel(const float* __restrict__ x, float* __restrict__ out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = __ldg(x + i);
  out[0 * n + i] = rsqrtf(v);
  out[1 * n + i] = __expf(-v);
  out[2 * n + i] = __fdividef(1.f, v);
  out[3 * n + i] = __logf(v);
  out[4 * n + i] = tanhf(v);
  out[5 * n + i] = fmaxf(v, 1.f);
  out[6 * n + i] = __saturatef(v - 1.f);
  out[7 * n + i] = erff(v);
}

// fp32 -> T -> fp32 through simt's conversions (round to nearest even).
template <class T>
__global__ void convert_kernel(const float* __restrict__ x, T* __restrict__ y, float* __restrict__ back, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = from_float<T>(x[i]);
  back[i] = to_float(y[i]);
}

// ----- Broken kernels: each must end in an EmulationError (or a visibly wrong result). -----

// A 16-byte vector load one float past an aligned address: "misaligned address" on the GPU.
__global__ void misaligned_vec_kernel(float* out) {
  float v[4];
  simt::load_vec<float, 4>(out + 4 * threadIdx.x + 1, v);
  out[threadIdx.x] = v[0];
}

// Lanes 8..15 read lanes 16..23, which are not in the mask.
__global__ void shfl_inactive_lane_kernel(float* out) {
  const int lane = threadIdx.x % kWarp;
  float v = float(threadIdx.x);
  if (lane < 16) v += __shfl_down_sync(0x0000ffffu, v, 8);
  out[threadIdx.x] = v;
}

// A full-mask shuffle reached by only half of the warp; the other half exits.
__global__ void shfl_exited_lane_kernel(float* out) {
  const int lane = threadIdx.x % kWarp;
  float v = float(threadIdx.x);
  if (lane < 16) v = warp_sum(v);
  out[threadIdx.x] = v;
}

// The calling lane is not in its own mask.
__global__ void shfl_mask_excludes_self_kernel(float* out) {
  out[threadIdx.x] = __shfl_sync(0xfffffffeu, float(threadIdx.x), 0);
}

// blockDim.x = 48: the second warp has 16 lanes, but warp_sum uses the full mask.
__global__ void partial_warp_kernel(float* out) { out[threadIdx.x] = warp_sum(1.f); }

// Two different barriers: the first warp waits at one, the rest at another.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// The bounds test `i <= n` writes one element past the end; `offset` moves the write further away.
__global__ void oob_write_kernel(float* y, int64_t n, int64_t offset) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = 1.f;
  if (i == n) y[i + offset] = 1.f;
}

// Reads one element past the end of x.
__global__ void oob_read_kernel(const float* x, float* y, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i] + x[i + 1];
}

// ---------------------------------------------------------------------------------------------
// Tensor-core emulation (common/tensor_core.cuh). One warp computes D = A·B + C (A 16×16 row-major,
// B 16×8 k-major, C/D 16×8) with one mma.m16n8k16. variant 0: A and C gathered from global memory by
// the PTX ISA's fragment formulas, B through shared memory with ldmatrix.x2.trans exactly as the
// attention kernel feeds V; 3: A with ldmatrix.x4 from a row-major tile and B with ldmatrix.x2 from
// Bᵀ (as the attention kernel feeds Q and K). Broken: 1, B rows 8 bytes off alignment (ldmatrix must
// object); 2, lanes 16-31 call ldmatrix while 0-15 call mma (a divergent collective).
template <class T>
__global__ void mma_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ c,
                           float* __restrict__ d, int variant) {
  RAEKERN_DYNAMIC_SHARED(T, sb);  // [16 k][8 n], row stride 16 elements (32 bytes)
  T* sa = sb + 16 * 16;           // [16 m][16 k], row stride 24
  T* sbt = sa + 16 * 24;          // [8 n][16 k], row stride 24
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int e = lane; e < 16 * 8; e += 32) {
    sb[(e / 8) * 16 + e % 8] = b[e];
    sbt[(e % 8) * 24 + e / 8] = b[e];
  }
  for (int e = lane; e < 16 * 16; e += 32) sa[(e / 16) * 24 + e % 16] = a[e];
  __syncwarp();
  auto pair = [&](const T* p) {
    uint32_t r;
    memcpy(&r, p, 4);
    return r;
  };
  uint32_t af[4] = {pair(a + g * 16 + 2 * t), pair(a + (g + 8) * 16 + 2 * t), pair(a + g * 16 + 2 * t + 8),
                    pair(a + (g + 8) * 16 + 2 * t + 8)};
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  uint32_t bf[2];
  if (variant == 2 && lane < 16) {
    tc::Mma<T>::run(acc, af, 0u, 0u);
  } else if (variant == 3) {
    tc::ldmatrix<4, false>(af, sa + (lane & 15) * 24 + (lane >> 4) * 8);
    tc::ldmatrix<2, false>(bf, sbt + (lane & 7) * 24 + ((lane >> 3) & 1) * 8);
    tc::Mma<T>::run(acc, af, bf[0], bf[1]);
  } else {
    tc::ldmatrix<2, true>(bf, sb + (lane & 15) * 16 + (variant == 1 ? 4 : 0));
    tc::Mma<T>::run(acc, af, bf[0], bf[1]);
  }
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// cp.async: each thread copies 16-byte chunk i of x into shared memory in two groups (chunks of
// even threads first), zero-filling chunks >= `valid`, then reads every chunk back through shared
// memory. variant 0: wait_group 0 before the barrier (correct); 1: wait_group 1 only, so the second
// group never lands before the read (and is never retired: the emulation reports it at exit); 2: no
// barrier after the wait (another thread's chunk may not have landed); 3: wait_group 1 then read
// only the first group's chunks, then wait_group 0.
__global__ void cp_async_kernel(const float4* __restrict__ x, float4* __restrict__ y, int valid, int variant) {
  RAEKERN_DYNAMIC_SHARED(float4, s);
  const int i = threadIdx.x, n = blockDim.x;
  const int even = i % 2 == 0;
  if (even) tc::cp_async16(s + i, x + (i < valid ? i : 0), i < valid);
  tc::cp_async_commit();
  if (!even) tc::cp_async16(s + i, x + (i < valid ? i : 0), i < valid);
  tc::cp_async_commit();
  if (variant == 0 || variant == 2) tc::cp_async_wait<0>();
  else tc::cp_async_wait<1>();
  if (variant != 2) __syncthreads();
  const int j = n - 1 - i;  // another thread's chunk
  if (variant == 3) {
    y[j] = j % 2 == 0 ? s[j] : make_float4(-1.f, -1.f, -1.f, -1.f);
    tc::cp_async_wait<0>();
  } else {
    y[j] = s[j];
  }
}

}  // namespace raekern::emu_selftest
