// Register-blocked "C (+)= A·B" used for all five products of flash attention on the CPU
// (fp32: AVX-512 or AVX2 + FMA register tiles; otherwise, and for fp64, a portable loop).
// A is read by scalar broadcast through two strides, so Aᵀ costs nothing (dV += Pᵀ·dO,
// dK += dSᵀ·Q); B and C are row-major with their columns contiguous, so they are read with
// full-width vector loads. The fp32 AVX-512 path requires N % 16 == 0, or N % 16 == 8 for a row-major B
// (callers pad panels); the AVX2 path N % 8 == 0.
// B may also be packed as consecutive 64-column panels (`bpanel` elements apart, row stride ldb):
// a transposed K panel then streams through L1 contiguously instead of at a power-of-two stride.
// Row-major B passes bpanel = 64.
#pragma once
#include <algorithm>
#include <cstdint>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace raekern::attention::cpu {

// Portable version (fp64 reference precision, and fp32 on CPUs without AVX-512 or AVX2).
template <class F>
inline void gemm(int64_t M, int64_t N, int64_t K, const F* __restrict A, int64_t sam, int64_t sak,
                 const F* __restrict B, int64_t ldb, int64_t bpanel, F* __restrict C, int64_t ldc,
                 bool accumulate) {
  if (bpanel != 64) {
    for (int64_t n = 0; n < N; n += 64)
      gemm<F>(M, std::min<int64_t>(64, N - n), K, A, sam, sak, B + (n / 64) * bpanel, ldb, 64, C + n, ldc,
              accumulate);
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    F* __restrict c = C + m * ldc;
    if (!accumulate) {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) c[n] = F(0);
    }
    for (int64_t k = 0; k < K; ++k) {
      const F a = A[m * sam + k * sak];
      const F* __restrict b = B + k * ldb;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

#if defined(__AVX512F__)
// MR rows × (NV vectors of 16 columns, plus 8 more in a ymm when H8) held in registers across the whole
// K loop. The half vector serves head dims ≡ 8 (mod 16) (72, 88, …) without padding their products to
// the next 16: on Zen 4 a ymm FMA costs half a zmm one (Dh 72's backward took as long as Dh 80's).
template <int MR, int NV, bool H8>
inline void micro_f32(int64_t K, const float* __restrict A, int64_t sam, int64_t sak,
                      const float* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc,
                      bool accumulate) {
  constexpr int NA = NV > 0 ? NV : 1;  // no zero-length arrays
  __m512 c[MR][NA];
  __m256 h[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      c[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
    if constexpr (H8) h[r] = accumulate ? _mm256_loadu_ps(C + r * ldc + 16 * NV) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    __m512 bv[NA];
    // The empty asm pins each B vector in a register: GCC otherwise folds the load into every FMA
    // that uses it (MR loads per vector instead of one), which made the kernel load-bound on Zen 4
    // (one 512-bit load per cycle, as many as its FMAs).
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_loadu_ps(b + 16 * v);
      __asm__("" : "+v"(bv[v]));
    }
    __m256 bh;
    if constexpr (H8) {
      bh = _mm256_loadu_ps(b + 16 * NV);
      __asm__("" : "+v"(bh));
    }
    const float* a = A + k * sak;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * sam]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(ar, bv[v], c[r][v]);
      if constexpr (H8) h[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(ar), bh, h[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
    if constexpr (H8) _mm256_storeu_ps(C + r * ldc + 16 * NV, h[r]);
  }
}

// 24 accumulators (of 32 zmm) leave room for the B vectors and the broadcast; `W` counts the half
// vector as a whole register.
template <int W> constexpr int kRows = W >= 5 ? 4 : W == 4 ? 6 : 8;

template <int NV, bool H8, int R>
inline void tail_rows(int rem, int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                      int64_t ldb, float* C, int64_t ldc, bool acc) {
  if constexpr (R >= 1) {
    if (rem == R) return micro_f32<R, NV, H8>(K, A, sam, sak, B, ldb, C, ldc, acc);
    tail_rows<NV, H8, R - 1>(rem, K, A, sam, sak, B, ldb, C, ldc, acc);
  }
}

// Never inlined: inside the forward's large task loop GCC spilled an accumulator of the inlined
// kernel to the stack on every k step (Dh 128's P·V product).
template <int NV, bool H8 = false>
__attribute__((noinline)) void panel_f32(int64_t M, int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                      int64_t ldb, float* C, int64_t ldc, bool acc) {
  constexpr int MR = kRows<NV + (H8 ? 1 : 0)>;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) micro_f32<MR, NV, H8>(K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, acc);
  if (m < M) tail_rows<NV, H8, MR - 1>(int(M - m), K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, acc);
}

// The last panel of a row-major B: NV (≤ 5) full vectors and an optional half one.
template <bool H8>
inline void last_panel_f32(int64_t nv, int64_t M, int64_t K, const float* A, int64_t sam, int64_t sak,
                           const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  switch (nv) {
    case 5: if constexpr (!H8) return panel_f32<5, H8>(M, K, A, sam, sak, B, ldb, C, ldc, acc); break;
    case 4: return panel_f32<4, H8>(M, K, A, sam, sak, B, ldb, C, ldc, acc);
    case 3: return panel_f32<3, H8>(M, K, A, sam, sak, B, ldb, C, ldc, acc);
    case 2: return panel_f32<2, H8>(M, K, A, sam, sak, B, ldb, C, ldc, acc);
    case 1: return panel_f32<1, H8>(M, K, A, sam, sak, B, ldb, C, ldc, acc);
    case 0: if constexpr (H8) return panel_f32<0, H8>(M, K, A, sam, sak, B, ldb, C, ldc, acc); break;
  }
}

// N % 16 == 0, or N % 16 == 8 with a row-major B (bpanel == 64).
template <>
inline void gemm<float>(int64_t M, int64_t N, int64_t K, const float* __restrict A, int64_t sam,
                        int64_t sak, const float* __restrict B, int64_t ldb, int64_t bpanel,
                        float* __restrict C, int64_t ldc, bool accumulate) {
  int64_t nv = N / 16, n = 0;
  const bool h8 = N % 16 == 8 && bpanel == 64;
  if (bpanel == 64) {
    // Row-major B: up to five registers of columns in one panel, so A's broadcasts serve them all.
    for (; nv + (h8 ? 1 : 0) > 5; nv -= 4, n += 64)
      panel_f32<4>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, accumulate);
    if (h8) return last_panel_f32<true>(nv, M, K, A, sam, sak, B + n, ldb, C + n, ldc, accumulate);
    return last_panel_f32<false>(nv, M, K, A, sam, sak, B + n, ldb, C + n, ldc, accumulate);
  }
  for (; nv >= 4; nv -= 4, n += 64)
    panel_f32<4>(M, K, A, sam, sak, B + (n / 64) * bpanel, ldb, C + n, ldc, accumulate);
  last_panel_f32<false>(nv, M, K, A, sam, sak, B + (n / 64) * bpanel, ldb, C + n, ldc, accumulate);
}
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 (16 ymm registers, Zen 3 / Haswell-class CPUs): MR rows × NV vectors of 8 columns held in
// registers across the whole K loop; the portable loop instead loads and stores C on every k step
// (0.37x SDPA on a Zen 3, measured 2026-12-01). 6 × 16 leaves 3 registers for B and the broadcast.
template <int MR, int NV>
inline void micro_f32x8(int64_t K, const float* __restrict A, int64_t sam, int64_t sak, const float* __restrict B,
                        int64_t ldb, float* __restrict C, int64_t ldc, bool accumulate) {
  __m256 c[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    __m256 bv[NV];
    // Pinned in registers: folded into each FMA, B would be loaded MR times per k step.
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm256_loadu_ps(b + 8 * v);
      __asm__("" : "+x"(bv[v]));
    }
    const float* a = A + k * sak;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * sam);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(ar, bv[v], c[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
}

template <int NV> constexpr int kRowsX8 = NV == 2 ? 6 : 12;

template <int NV, int R>
inline void tail_rows_x8(int rem, int64_t K, const float* A, int64_t sam, int64_t sak, const float* B, int64_t ldb,
                         float* C, int64_t ldc, bool acc) {
  if constexpr (R >= 1) {
    if (rem == R) return micro_f32x8<R, NV>(K, A, sam, sak, B, ldb, C, ldc, acc);
    tail_rows_x8<NV, R - 1>(rem, K, A, sam, sak, B, ldb, C, ldc, acc);
  }
}

// All M rows against one strip of 8·NV columns; the strip of B (K × 16 floats) stays in L1 while A
// streams past it once.
template <int NV>
__attribute__((noinline)) void strip_f32x8(int64_t M, int64_t K, const float* A, int64_t sam, int64_t sak,
                                           const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  constexpr int MR = kRowsX8<NV>;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) micro_f32x8<MR, NV>(K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, acc);
  if (m < M) tail_rows_x8<NV, MR - 1>(int(M - m), K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, acc);
}

// N % 8 == 0. Column n of B lies at B + (n / 64)·bpanel + n % 64 in both layouts (row-major B has
// bpanel == 64), and a 16-column strip never crosses a 64-column panel.
template <>
inline void gemm<float>(int64_t M, int64_t N, int64_t K, const float* __restrict A, int64_t sam,
                        int64_t sak, const float* __restrict B, int64_t ldb, int64_t bpanel,
                        float* __restrict C, int64_t ldc, bool accumulate) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16)
    strip_f32x8<2>(M, K, A, sam, sak, B + (n / 64) * bpanel + n % 64, ldb, C + n, ldc, accumulate);
  if (n < N) strip_f32x8<1>(M, K, A, sam, sak, B + (n / 64) * bpanel + n % 64, ldb, C + n, ldc, accumulate);
}
#endif

}  // namespace raekern::attention::cpu
