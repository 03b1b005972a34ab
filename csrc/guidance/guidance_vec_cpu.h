// Fixed-width register blocks for the guidance CPU kernels: one register of accumulator values
// (AVX-512: 64 bytes, 16 fp32 / 8 fp64 lanes; otherwise 32 bytes, 8 / 4 lanes) loaded from and stored
// to any storage dtype. GCC vector extensions lower each block op to one instruction, so a kernel
// written over these blocks keeps every stream of a few-stream combination in registers instead of
// round-tripping through buffers. The block is one register wide on purpose: 64-byte blocks on an
// AVX2 CPU (Zen 3) became pairs of ymm that GCC shuffled through the stack (the APG statistics
// pass spilled on every element; 0.47x torch.compile, measured 2026-12-01).
// bf16 rounding matches c10 (round to nearest even, NaN -> 0x7fc0, denormals kept).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_utils.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
// GCC 12 reports its own AVX-512 intrinsics as "maybe uninitialized" once inlined (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace raekern::guidance::vec {

#if defined(__AVX512F__)
constexpr int kBlockBytes = 64;
#else
constexpr int kBlockBytes = 32;
#endif
template <class A> struct Block {
  typedef A type __attribute__((vector_size(kBlockBytes)));
  static constexpr int lanes = kBlockBytes / int(sizeof(A));
};
template <class A> using block_t = typename Block<A>::type;
template <class A> constexpr int lanes = Block<A>::lanes;

// bf16 bits of one fp32 block, and the fp32 block's bits.
typedef uint16_t u16_block __attribute__((vector_size(kBlockBytes / 2)));
typedef uint32_t u32_block __attribute__((vector_size(kBlockBytes)));

template <class T>
inline block_t<cpu::acc_t<T>> load(const T* p) {
  block_t<cpu::acc_t<T>> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <>
inline block_t<float> load<c10::BFloat16>(const c10::BFloat16* p) {
#if defined(__AVX512F__)
  // One zero-extending load and a shift: GCC lowers the generic conversion below to five
  // instructions (two half-width extensions and a lane insert), a third of a bf16 kernel's loop.
  const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return (block_t<float>)_mm512_castsi512_ps(w);
#elif defined(__AVX2__)
  const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return (block_t<float>)_mm256_castsi256_ps(w);
#else
  u16_block h;
  std::memcpy(&h, p, sizeof(h));
  u32_block w = __builtin_convertvector(h, u32_block) << 16;
  block_t<float> v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
#endif
}
template <>
inline block_t<float> load<c10::Half>(const c10::Half* p) {
  float tmp[lanes<float>];
  for (int l = 0; l < lanes<float>; ++l) tmp[l] = static_cast<float>(p[l]);
  block_t<float> v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}

template <class T>
inline void store(T* p, block_t<cpu::acc_t<T>> v) {
  std::memcpy(p, &v, sizeof(v));
}
// fp32 -> bf16 bits, c10's rounding (nearest even, NaN -> 0x7fc0, denormals rounded, not flushed).
inline u16_block to_bf16_bits(block_t<float> v) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  // vcvtneps2bf16 rounds to nearest even in one instruction but flushes denormal inputs and keeps a
  // NaN's payload; a block holding either (never in practice) takes the exact integer path instead.
  const __m512 f = (__m512)v;
  if (__builtin_expect(_mm512_fpclass_ps_mask(f, 0xA1) == 0, 1))  // QNaN | denormal | SNaN
    return (u16_block)_mm512_cvtneps_pbh(f);
#endif
  u32_block u;
  std::memcpy(&u, &v, sizeof(u));
  u32_block r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = ((u & 0x7fffffffu) > 0x7f800000u) ? u32_block{} + 0x7fc0u : r;
  return __builtin_convertvector(r, u16_block);
}

template <>
inline void store<c10::BFloat16>(c10::BFloat16* p, block_t<float> v) {
  const u16_block h = to_bf16_bits(v);
  std::memcpy(p, &h, sizeof(h));
}
template <>
inline void store<c10::Half>(c10::Half* p, block_t<float> v) {
  float tmp[lanes<float>];
  std::memcpy(tmp, &v, sizeof(v));
  for (int l = 0; l < lanes<float>; ++l) p[l] = static_cast<c10::Half>(tmp[l]);
}

// Non-temporal store of one block to a 64-byte aligned address: large outputs are written without
// first reading their cache lines (a quarter to a fifth of the traffic of a few-stream combination)
// and without evicting the inputs. Callers fence (stream_fence) before the data is handed on.
template <class T>
inline void store_nt(T* p, block_t<cpu::acc_t<T>> v) {
  store(p, v);
}
#if defined(__AVX512F__)
template <>
inline void store_nt<float>(float* p, block_t<float> v) {
  _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
}
template <>
inline void store_nt<double>(double* p, block_t<double> v) {
  _mm512_stream_pd(p, reinterpret_cast<__m512d&>(v));
}
template <>
inline void store_nt<c10::BFloat16>(c10::BFloat16* p, block_t<float> v) {
  u16_block h = to_bf16_bits(v);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i&>(h));
}
inline void stream_fence() { _mm_sfence(); }
constexpr bool kHaveStreamStores = true;
#elif defined(__AVX2__)
template <>
inline void store_nt<float>(float* p, block_t<float> v) {
  _mm256_stream_ps(p, reinterpret_cast<__m256&>(v));
}
template <>
inline void store_nt<double>(double* p, block_t<double> v) {
  _mm256_stream_pd(p, reinterpret_cast<__m256d&>(v));
}
template <>
inline void store_nt<c10::BFloat16>(c10::BFloat16* p, block_t<float> v) {
  u16_block h = to_bf16_bits(v);
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i&>(h));
}
inline void stream_fence() { _mm_sfence(); }
constexpr bool kHaveStreamStores = true;
#else
inline void stream_fence() {}
constexpr bool kHaveStreamStores = false;
#endif

// a·b + c with one rounding per lane. The kernels spell every multiply-add out: left to the
// compiler's contraction, c0·v0 + c1·v1 may fuse either product, so the same combination could round
// differently from one instantiation to the next (identical branches must give exactly the
// one-branch result, whatever the stream count).
template <class A>
inline block_t<A> fma(block_t<A> a, block_t<A> b, block_t<A> c) {
  block_t<A> r;
  for (int l = 0; l < lanes<A>; ++l) r[l] = std::fma(a[l], b[l], c[l]);
  return r;
}
#if defined(__AVX512F__)
template <>
inline block_t<float> fma<float>(block_t<float> a, block_t<float> b, block_t<float> c) {
  return (block_t<float>)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
template <>
inline block_t<double> fma<double>(block_t<double> a, block_t<double> b, block_t<double> c) {
  return (block_t<double>)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
}
#elif defined(__AVX2__) && defined(__FMA__)
template <>
inline block_t<float> fma<float>(block_t<float> a, block_t<float> b, block_t<float> c) {
  return (block_t<float>)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
template <>
inline block_t<double> fma<double>(block_t<double> a, block_t<double> b, block_t<double> c) {
  return (block_t<double>)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
}
#endif

// Lane sum in a fixed order (deterministic, independent of thread count).
template <class A>
inline A hsum(block_t<A> v) {
  A s = 0;
  for (int l = 0; l < lanes<A>; ++l) s += v[l];
  return s;
}

}  // namespace raekern::guidance::vec

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
