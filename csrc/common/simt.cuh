// Device helpers shared by every SIMT kernel: fp32 conversions, 16-byte vector access, warp and
// block reductions. Compiles under nvcc and, with RAEKERN_HOST_EMULATION, under the host compiler
// against common/host_emulation.h, so the same kernel source is tested on the CPU in CI.
#pragma once
#ifdef RAEKERN_HOST_EMULATION
#include "common/host_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <cstdint>

// Dynamic shared memory: kernels write `RAEKERN_DYNAMIC_SHARED(float, smem);` instead of
// `extern __shared__ float smem[];`, so the host emulation can hand each block its own buffer.
#ifdef RAEKERN_HOST_EMULATION
#define RAEKERN_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::raekern::emu::dynamic_shared())
#else
#define RAEKERN_DYNAMIC_SHARED(T, name)                                     \
  extern __shared__ __align__(16) unsigned char raekern_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(raekern_dynamic_smem_)
#endif

namespace raekern::simt {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Warp-per-row kernels hold a row as vectors of V elements interleaved across the lanes: the first
// element of a lane's vector k (rows of at most a few thousand elements: int).
template <int V>
__device__ __forceinline__ int lane_column(int lane, int k) {
  return (lane + k * kWarp) * V;
}

template <class T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <class T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T moved as one 16-byte (or smaller) transaction.
template <class T, int N> struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
template <class T> constexpr int kVec16 = 16 / sizeof(T);

// A vector access must be aligned to its size: the GPU raises "misaligned address" (a sticky error
// that ends the CUDA context), while x86 performs it silently. The host emulation checks it, so the
// host-side alignment tests that choose a vector path are exercised on the CPU too.
#ifdef RAEKERN_HOST_EMULATION
inline void check_aligned(const void* p, size_t bytes, std::source_location loc = std::source_location::current()) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    ::raekern::emu::detail::kernel_fail("misaligned " + std::to_string(bytes) + "-byte vector access", loc);
}
#else
__device__ __forceinline__ void check_aligned(const void*, size_t) {}
#endif

// 32 bits (two 16-bit values, a packed mma fragment) stored as one access.
__device__ __forceinline__ void store_u32(void* p, uint32_t v) {
  check_aligned(p, 4);
  *reinterpret_cast<uint32_t*>(p) = v;
}

template <class T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[N]) {
  check_aligned(p, sizeof(Vec<T, N>));
  Vec<T, N> r = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(r.v[i]);
}

template <class T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[N]) {
  Vec<T, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = from_float<T>(in[i]);
  check_aligned(p, sizeof(Vec<T, N>));
  *reinterpret_cast<Vec<T, N>*>(p) = r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over the whole block; every thread gets the result. `smem` holds >= 32 floats.
// blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : 0.f;
  return warp_sum(v);
}

// Two sums at once (e.g. mean and mean of squares) with one pair of barriers.
__device__ __forceinline__ void block_sum2(float& a, float& b, float* smem /* >= 64 floats */) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
  if (lane == 0) {
    smem[warp] = a;
    smem[kWarp + warp] = b;
  }
  __syncthreads();
  a = warp_sum(lane < nwarps ? smem[lane] : 0.f);
  b = warp_sum(lane < nwarps ? smem[kWarp + lane] : 0.f);
}

}  // namespace raekern::simt
