// sm80 tensor-core and async-copy primitives for device code: mma.sync m16n8k16 (bf16/fp16 in,
// fp32 accumulate), ldmatrix, cp.async. Under nvcc they are single PTX instructions; under the host
// emulation (RAEKERN_HOST_EMULATION) they are warp collectives computed from every lane's fragments
// with the register layouts of the PTX ISA ("Matrix fragments for mma.m16n8k16", "ldmatrix"), and
// queued copies that land at the retiring cp.async.wait_group. A kernel written against these runs
// unchanged in the emulated tests.
#pragma once
#include "common/simt.cuh"

#include <cstdint>
#include <cstring>
#include <type_traits>
#ifdef RAEKERN_HOST_EMULATION
#include <source_location>
#include <string>
#endif

namespace raekern::tc {

#ifdef RAEKERN_HOST_EMULATION
namespace emu_impl {

template <class T> inline float half_bits_to_float(uint32_t bits) {
  T h;
  const unsigned short b = static_cast<unsigned short>(bits);
  std::memcpy(&h, &b, 2);
  return simt::to_float(h);
}

struct MmaOperands {
  uint32_t a[4], b[2];
  float c[4];
};

// D = A·B + C for one lane. Lane l holds (g = l/4, t = l%4):
//   A 16×16 row-major: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B 16×8 (k × n):    b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C/D 16×8:          c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// (the lower 16 bits of a register hold the element with the smaller column / k index).
// The products of 16-bit inputs are exact; the sum is formed in fp64 and rounded once, a tighter
// result than the hardware's (tests compare with tolerances).
template <class T> void mma16816_lane(int lane, const void* const* ins, void* out, std::string* error) {
  for (int k = 0; k < 32; ++k)
    if (!ins[k]) {
      *error = "needs all 32 lanes of the warp (lane " + std::to_string(k) + " is missing)";
      return;
    }
  auto lane_ops = [&](int l) { return static_cast<const MmaOperands*>(ins[l]); };
  auto A = [&](int r, int k) {
    const uint32_t w = lane_ops((r % 8) * 4 + (k % 8) / 2)->a[r / 8 + 2 * (k / 8)];
    return double(half_bits_to_float<T>(k % 2 ? w >> 16 : w));
  };
  auto B = [&](int k, int n) {
    const uint32_t w = lane_ops(n * 4 + (k % 8) / 2)->b[k / 8];
    return double(half_bits_to_float<T>(k % 2 ? w >> 16 : w));
  };
  const int g = lane / 4, t = lane % 4;
  float* d = static_cast<float*>(out);
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    double s = lane_ops(lane)->c[i];
    for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
    d[i] = float(s);
  }
}

// ldmatrix .m8n8 .x{Num} [.trans] .b16: lanes 8j..8j+7 address the rows of matrix j (16 bytes each).
// Register j of lane l: M_j[l/4][2(l%4) .. +1], or with .trans M_j[2(l%4) .. +1][l/4].
template <int Num, bool Trans> void ldmatrix_lane(int lane, const void* const* ins, void* out, std::string* error) {
  auto row = [&](int i) -> const unsigned char* {
    if (!ins[i]) {
      *error = "lane " + std::to_string(i) + " provides a row address but is not in the mask";
      return nullptr;
    }
    const auto* p = *static_cast<const unsigned char* const*>(ins[i]);
    if (reinterpret_cast<uintptr_t>(p) % 16) *error = "lane " + std::to_string(i) + "'s row address is not 16-byte aligned";
    else if (!::raekern::emu::detail::in_dynamic_shared(p, 16))
      *error = "lane " + std::to_string(i) + "'s row address is outside the block's dynamic shared memory";
    return error->empty() ? p : nullptr;
  };
  auto elem = [&](int j, int r, int c) -> uint32_t {
    const unsigned char* p = row(8 * j + r);
    if (!p) return 0;
    unsigned short v;
    std::memcpy(&v, p + 2 * c, 2);
    return v;
  };
  const int g = lane / 4, t = lane % 4;
  uint32_t* regs = static_cast<uint32_t*>(out);
  for (int j = 0; j < Num; ++j) {
    const uint32_t lo = Trans ? elem(j, 2 * t, g) : elem(j, g, 2 * t);
    const uint32_t hi = Trans ? elem(j, 2 * t + 1, g) : elem(j, g, 2 * t + 1);
    regs[j] = lo | hi << 16;
  }
}

}  // namespace emu_impl
#endif

// d += A·B on the tensor cores: m16n8k16, A row-major, B column-major, fp32 accumulators; T is
// __nv_bfloat16 or __half.
template <class T> struct Mma {
  static constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "mma.m16n8k16 takes bf16 or fp16 inputs");
#ifdef RAEKERN_HOST_EMULATION
  static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                  std::source_location loc = std::source_location::current()) {
    const emu_impl::MmaOperands in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
    const ::raekern::emu::detail::Collective c{kBf16 ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16",
                                               &emu_impl::mma16816_lane<T>, &in, d};
    ::raekern::emu::detail::warp_collective(simt::kFullMask, c, loc);
  }
#else
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (kBf16)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
  // Two fp32 values as one register of the A/B fragments (lo in the lower half).
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    uint32_t r;
    if constexpr (kBf16) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
      memcpy(&r, &v, 4);
    } else {
      const __half2 v = __floats2half2_rn(lo, hi);
      memcpy(&r, &v, 4);
    }
    return r;
  }
};

// Num (1, 2, 4) 8×8 b16 matrices from shared memory: lanes 8j..8j+7 give the 16-byte aligned row
// addresses of matrix j, and register j of each lane receives its fragment of matrix j (Trans:
// of the transposed matrix). Non-transposed rows of A or of a [n][k] B operand, transposed rows of a
// [k][n] B operand, give exactly the register fragments Mma::run takes.
#ifdef RAEKERN_HOST_EMULATION
template <int Num, bool Trans>
inline void ldmatrix(uint32_t (&r)[Num], const void* row, std::source_location loc = std::source_location::current()) {
  static_assert(Num == 1 || Num == 2 || Num == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const ::raekern::emu::detail::Collective c{Trans ? "ldmatrix.m8n8.trans.b16" : "ldmatrix.m8n8.b16",
                                             &emu_impl::ldmatrix_lane<Num, Trans>, &row, r};
  ::raekern::emu::detail::warp_collective(simt::kFullMask, c, loc);
}
#else
template <int Num, bool Trans> __device__ __forceinline__ void ldmatrix(uint32_t (&r)[Num], const void* row) {
  static_assert(Num == 1 || Num == 2 || Num == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (Num == 1 && Trans) asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a) : "memory");
  if constexpr (Num == 1 && !Trans) asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a) : "memory");
  if constexpr (Num == 2 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
  if constexpr (Num == 2 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
  if constexpr (Num == 4 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
  if constexpr (Num == 4 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}
#endif

// 16 bytes global -> shared without passing through registers; valid = false zero-fills (rows past
// the end of a sequence). Visible after cp_async_wait retires its group and a barrier.
#ifdef RAEKERN_HOST_EMULATION
inline void cp_async16(void* smem, const void* gmem, bool valid,
                       std::source_location loc = std::source_location::current()) {
  ::raekern::emu::detail::cp_async(smem, gmem, 16, valid ? 16 : 0, loc);
}
inline void cp_async_commit() { ::raekern::emu::detail::cp_async_commit(); }
template <int N> inline void cp_async_wait(std::source_location loc = std::source_location::current()) {
  ::raekern::emu::detail::cp_async_wait(N, loc);
}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
#endif

// ---------------------------------------------------------------------------------------------
// Tile helpers built from the primitives above (the attention forward and backward share them).

// rows × D elements (D % 8 == 0, row stride sn, every row 16-byte aligned) into shared memory (row
// stride ld) by 16-byte cp.async chunks spread over the block's Threads threads; rows >= rows_valid
// are zero-filled. One commit/wait by the caller covers them.
template <int Threads, class T>
__device__ __forceinline__ void cp_async_rows(T* __restrict__ dst, int ld, const T* __restrict__ src, int64_t sn,
                                              int rows, int rows_valid, int D) {
  const int chunks = D / 8;
  for (int c = threadIdx.x; c < rows * chunks; c += Threads) {
    const int r = c / chunks, col = (c % chunks) * 8;
    const bool ok = r < rows_valid;
    cp_async16(dst + r * ld + col, src + (ok ? int64_t(r) * sn + col : 0), ok);
  }
}

// Rows of one or two key tiles (keys n0.., row stride ld, D columns; `b` may be null) whose key is
// masked out (mask[key·mask_sn] false) are set to zero: masked keys then leave the attention sums
// rather than enter them with weight 0, which is NaN for padding that holds garbage (torch.empty).
// Keys past Nk are left as they are (cp_async_rows zero-fills them). One pass for both tiles: the
// Dh-128 backward runs this beside 128 live accumulator registers (two passes made it spill). The
// caller synchronises before the tiles are read.
template <int Threads, class T>
__device__ __forceinline__ void zero_masked_rows(T* a, T* b, int ld, int rows, int D, int n0, int Nk,
                                                 const bool* mask, int64_t mask_sn) {
  for (int e = threadIdx.x; e < rows * D; e += Threads) {
    const int r = e / D, key = n0 + r;
    if (key < Nk && !mask[int64_t(key) * mask_sn]) {
      a[r * ld + e % D] = simt::from_float<T>(0.f);
      if (b) b[r * ld + e % D] = simt::from_float<T>(0.f);
    }
  }
}

// acc[m][n] (+)= A·B over KSteps 16-wide k-steps for one warp's MT 16-row m-tiles: A from `a_rows`
// stored [row][k] (m-tile m at row 16·m; ldmatrix.x4: matrices rows 0-7 | 8-15 × k 0-7 | 8-15), B
// from `b_rows` stored [n][k] (one ldmatrix.x4 per pair of n-tiles: matrices n 0-7 | 8-15 of the pair
// × k 0-7 | 8-15). Each B fragment feeds MT products: with MT = 2 a warp reads half the shared-memory
// bytes per MMA of MT = 1, the bound of the mma.sync mainloops at Hopper/Ampere tensor rates.
template <int KSteps, int NTiles, int MT, class T>
__device__ __forceinline__ void mma_rows_nk_tiles(float (&acc)[MT][NTiles][4], const T* a_rows, int lda,
                                                  const T* b_rows, int ldb, int lane) {
  static_assert(NTiles % 2 == 0, "B fragments come in pairs of n-tiles");
  const T* ar = a_rows + (lane & 15) * lda + (lane >> 4) * 8;
  const T* br = b_rows + ((lane & 7) + (lane >> 4) * 8) * ldb + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int ks = 0; ks < KSteps; ++ks) {
    uint32_t af[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) ldmatrix<4, false>(af[m], ar + m * 16 * lda + ks * 16);
#pragma unroll
    for (int n = 0; n < NTiles; n += 2) {
      uint32_t bf[4];
      ldmatrix<4, false>(bf, br + n * 8 * ldb + ks * 16);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        Mma<T>::run(acc[m][n], af[m], bf[0], bf[1]);
        Mma<T>::run(acc[m][n + 1], af[m], bf[2], bf[3]);
      }
    }
  }
}

// The one-m-tile form (16 rows per warp).
template <int KSteps, int NTiles, class T>
__device__ __forceinline__ void mma_rows_nk(float (&acc)[NTiles][4], const T* a_rows, int lda, const T* b_rows,
                                            int ldb, int lane) {
  mma_rows_nk_tiles<KSteps, NTiles, 1, T>(*reinterpret_cast<float(*)[1][NTiles][4]>(&acc), a_rows, lda, b_rows,
                                          ldb, lane);
}

// acc[m][n] += A·B for one 16-wide k-step and MT m-tiles, A given as fragments (one per m-tile), B
// stored [k][n] from row b_k0: ldmatrix.x4.trans per pair of n-tiles (matrices k 0-7 | 8-15 × tile
// n | n+1), .x2.trans for an odd last tile; each B fragment feeds MT products.
template <int NTiles, int MT, class T>
__device__ __forceinline__ void mma_frag_kn_tiles(float (&acc)[MT][NTiles][4], const uint32_t (&af)[MT][4],
                                                  const T* b_k0, int ldb, int lane) {
  const T* br = b_k0 + (lane & 15) * ldb + (lane >> 4) * 8;
#pragma unroll
  for (int n = 0; n + 1 < NTiles; n += 2) {
    uint32_t bf[4];
    ldmatrix<4, true>(bf, br + n * 8);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      Mma<T>::run(acc[m][n], af[m], bf[0], bf[1]);
      Mma<T>::run(acc[m][n + 1], af[m], bf[2], bf[3]);
    }
  }
  if constexpr (NTiles % 2) {
    constexpr int n = NTiles - 1;
    uint32_t bf[2];
    ldmatrix<2, true>(bf, b_k0 + (lane & 15) * ldb + n * 8);
#pragma unroll
    for (int m = 0; m < MT; ++m) Mma<T>::run(acc[m][n], af[m], bf[0], bf[1]);
  }
}

// The one-m-tile form.
template <int NTiles, class T>
__device__ __forceinline__ void mma_frag_kn(float (&acc)[NTiles][4], const uint32_t (&af)[4], const T* b_k0, int ldb,
                                            int lane) {
  mma_frag_kn_tiles<NTiles, 1, T>(*reinterpret_cast<float(*)[1][NTiles][4]>(&acc),
                                  *reinterpret_cast<const uint32_t(*)[1][4]>(&af), b_k0, ldb, lane);
}

}  // namespace raekern::tc
