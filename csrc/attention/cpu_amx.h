// The bf16 dot-product building blocks the CPU attention forward and backward share: tile state and
// configuration, the VNNI packings, the 2×2-tile score block and the accumulating P·V-style product.
// Two units run them: AMX tiles (Sapphire Rapids and newer; the OS grants the tile state) or, on CPUs
// with AVX512-BF16 but no AMX (Zen 4/5; on Intel only when forced, see vector_unit_pays), the same
// products as vdpbf16ps on zmm registers over the same packed layouts, so one forward and one
// backward serve both.
// Every buffer a tile reads or writes is 64-byte aligned: a tile row across two cache lines costs two
// accesses. Tile use: 0-3 accumulators, 4-5 A (two 16-row halves), 6-7 B (two 16-column halves).
#pragma once
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define RAEKERN_ATTENTION_AMX 1  // the bf16 dot-product path (AMX tiles or AVX512-BF16 vectors)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define RAEKERN_ATTENTION_AMX_TILES 1
#endif
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "attention/cpu_prologue.h"
#include "common/cpu_vec_math.h"

namespace raekern::attention::cpu::amx {

// vdpbf16ps pays where it is at least as fast as two fp32 FMAs: on Zen 4/5. On Intel cores it is
// not (Emerald Rapids with AMX hidden by its VM, measured 2026-12-02: one zmm vdpbf16ps per ~2.4
// cycles, 27 bf16 flop/cycle, against 64 fp32 flop/cycle from two FMA ports), so there the fp32
// kernels, which widen bf16 while packing, are faster: forward 11.6 -> 8.7 ms at B=4 H=16 N=256 Dh=72.
inline bool vector_unit_pays() {
  static const bool pays = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    __cpuid(0, a, b, c, d);
    return !(b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu);  // "GenuineIntel"
  }();
  return pays;
}

// Whether the bf16 path runs (read at each call, so tests can compare both in one process):
// RAEKERN_ATTENTION_AMX=0 turns it off (the portable fp32 kernels then take bf16 too), =1 runs the
// vector unit even where it does not pay (Intel without AMX). With AMX tiles, Linux hands out the tile
// state only on request (once per process); without it the fp32 kernels run.
inline bool available() {
  const char* e = std::getenv("RAEKERN_ATTENTION_AMX");
  if (e && e[0] == '0') return false;
#ifdef RAEKERN_ATTENTION_AMX_TILES
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return granted;
#else
  return (e && e[0] == '1') || vector_unit_pays();
#endif
}

// The unit's name, as attention_info() reports it.
inline const char* unit_name() {
#ifdef RAEKERN_ATTENTION_AMX_TILES
  return "amx";
#else
  return "avx512bf16";
#endif
}

#ifdef RAEKERN_ATTENTION_AMX_TILES
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile is 16 rows × 64 bytes: A = 16×32 bf16, B = 16 pair-rows × 16 columns, C = 16×16 fp32.
inline void configure_tiles() {
  TileConfig c;
  for (int i = 0; i < 8; ++i) {
    c.rows[i] = 16;
    c.colsb[i] = 64;
  }
  _tile_loadconfig(&c);
}
inline void release_tiles() { _tile_release(); }
#else
inline void configure_tiles() {}
inline void release_tiles() {}
#endif

// fp32 -> bf16 (round to nearest even), 16 lanes at a time.
inline void to_bf16_row(const float* src, int64_t n, uint16_t* dst) {
  raekern::cpu::for16(n, [&](int64_t i, __mmask16 mk) {
    raekern::cpu::store16_bits(dst + i, (__m256i)_mm512_cvtneps_pbh(raekern::cpu::load16(src + i, mk)), mk);
  });
}

constexpr int64_t kChunk = 512;  // elements of one VNNI B tile (16 pair-rows × 32)

#ifdef RAEKERN_ATTENTION_AMX_TILES
// S[32][32] = Q[32][DQ] · K(16-key blocks kb0, kb1)ᵀ. (`pairs`, the d pairs that are not zero padding,
// matters only to the vector unit below: a tile product always spans its whole chunk.)
inline void s_block(const uint16_t* q, int64_t ldq, int64_t nchunks, int64_t /*pairs*/, const uint16_t* kb0,
                    const uint16_t* kb1, float* s, int64_t lds) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < nchunks; ++c) {
    _tile_loadd(4, q + c * 32, ldq * 2);
    _tile_loadd(5, q + 16 * ldq + c * 32, ldq * 2);
    _tile_loadd(6, kb0 + c * kChunk, 64);
    _tile_loadd(7, kb1 + c * kChunk, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, s, lds * 4);
  _tile_stored(1, s + 16, lds * 4);
  _tile_stored(2, s + 16 * lds, lds * 4);
  _tile_stored(3, s + 16 * lds + 16, lds * 4);
}

// O[32][16 or 32 columns] += P[32][32·nchunks] · V(d-blocks vb0[, vb1]).
// kFirst: the first key block, O starts at zero instead of being loaded.
template <bool kTwo, bool kFirst>
inline void pv_block(const uint16_t* p, int64_t ldp, int64_t nchunks, const uint16_t* vb0, const uint16_t* vb1,
                     float* o, int64_t ldo) {
  if constexpr (kFirst) {
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (kTwo) {
      _tile_zero(1);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, o, ldo * 4);
    _tile_loadd(2, o + 16 * ldo, ldo * 4);
    if constexpr (kTwo) {
      _tile_loadd(1, o + 16, ldo * 4);
      _tile_loadd(3, o + 16 * ldo + 16, ldo * 4);
    }
  }
  for (int64_t c = 0; c < nchunks; ++c) {
    _tile_loadd(4, p + c * 32, ldp * 2);
    _tile_loadd(5, p + 16 * ldp + c * 32, ldp * 2);
    _tile_loadd(6, vb0 + c * kChunk, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (kTwo) {
      _tile_loadd(7, vb1 + c * kChunk, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, o, ldo * 4);
  _tile_stored(2, o + 16 * ldo, ldo * 4);
  if constexpr (kTwo) {
    _tile_stored(1, o + 16, ldo * 4);
    _tile_stored(3, o + 16 * ldo + 16, ldo * 4);
  }
}

#else
// The tile products on zmm registers: C[32][16 or 32] (+)= A[32][32·nchunks] · B, B in the tiles' VNNI
// layout (chunk c of a 16-column half: 16 pair-rows of 16 32-bit words). Eight rows at a time keep
// 16 accumulators, the two B rows of a pair-row and the broadcast A pair in the 32 zmm registers;
// one vdpbf16ps is 32 multiply-adds (an fp32 FMA 16), the rounding is the tiles' (bf16 products
// exact, fp32 sums).
// `pairs`: the reduction pairs that are not zero padding (≤ 16·nchunks); the rest are skipped (Dh = 72
// pads its 36 pairs to 48).
template <bool kTwo>
inline void dot_block(const uint16_t* a, int64_t lda, int64_t nchunks, int64_t pairs, const uint16_t* b0,
                      const uint16_t* b1, float* c, int64_t ldc, bool accumulate) {
  constexpr int kR = 8;
  for (int r0 = 0; r0 < 32; r0 += kR) {
    __m512 acc0[kR], acc1[kR];
    for (int r = 0; r < kR; ++r) {
      const float* crow = c + (r0 + r) * ldc;
      acc0[r] = accumulate ? _mm512_loadu_ps(crow) : _mm512_setzero_ps();
      if constexpr (kTwo) acc1[r] = accumulate ? _mm512_loadu_ps(crow + 16) : _mm512_setzero_ps();
    }
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const uint16_t* bc0 = b0 + ch * kChunk;
      const uint16_t* bc1 = kTwo ? b1 + ch * kChunk : nullptr;
      const uint16_t* ac = a + r0 * lda + ch * 32;
      const auto step = [&](int k) {
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(bc0 + k * 32);
        __m512bh v1;
        if constexpr (kTwo) v1 = (__m512bh)_mm512_loadu_si512(bc1 + k * 32);
        for (int r = 0; r < kR; ++r) {
          int32_t pair;
          std::memcpy(&pair, ac + r * lda + 2 * k, 4);
          const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
          acc0[r] = _mm512_dpbf16_ps(acc0[r], x, v0);
          if constexpr (kTwo) acc1[r] = _mm512_dpbf16_ps(acc1[r], x, v1);
        }
      };
      const int64_t left = pairs - 16 * ch;
      if (left >= 16) {  // a whole chunk: a constant trip count the compiler unrolls
        for (int k = 0; k < 16; ++k) step(k);
      } else {
        for (int k = 0; k < int(left); ++k) step(k);
      }
    }
    for (int r = 0; r < kR; ++r) {
      float* crow = c + (r0 + r) * ldc;
      _mm512_storeu_ps(crow, acc0[r]);
      if constexpr (kTwo) _mm512_storeu_ps(crow + 16, acc1[r]);
    }
  }
}

// S[32][32] = Q[32][DQ] · K(16-key blocks kb0, kb1)ᵀ over the first `pairs` d pairs.
inline void s_block(const uint16_t* q, int64_t ldq, int64_t nchunks, int64_t pairs, const uint16_t* kb0,
                    const uint16_t* kb1, float* s, int64_t lds) {
  dot_block<true>(q, ldq, nchunks, pairs, kb0, kb1, s, lds, false);
}

// O[32][16 or 32 columns] += P[32][32·nchunks] · V(d-blocks vb0[, vb1]).
// kFirst: the first key block, O starts at zero instead of being loaded.
template <bool kTwo, bool kFirst>
inline void pv_block(const uint16_t* p, int64_t ldp, int64_t nchunks, const uint16_t* vb0, const uint16_t* vb1,
                     float* o, int64_t ldo) {
  dot_block<kTwo>(p, ldp, nchunks, 16 * nchunks, vb0, vb1, o, ldo, !kFirst);
}
#endif  // RAEKERN_ATTENTION_AMX_TILES

// Keys [j0, j0 + 16) of the K panel in VNNI order: the (d, d+1) pair of key j is the 32-bit word
// at [pair][j % 16]. `rows` holds the 16 keys as bf16 rows of DQ (zero-padded) elements; each
// 16-pair group is one 16×16 transpose of 32-bit words, stored as whole lines.
inline void pack_k_block(const uint16_t* rows, int64_t DQ, uint32_t* dst) {
  for (int64_t g = 0; g < DQ / 2; g += 16) {
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = _mm512_load_ps(reinterpret_cast<const float*>(rows + j * DQ + 2 * g));
    raekern::cpu::transpose16(r);
    for (int p = 0; p < 16; ++p) _mm512_store_ps(reinterpret_cast<float*>(dst + (g + p) * 16), r[p]);
  }
}

// The same panel straight from 16 bf16 input rows (D elements each; null: a zero key), for keys
// that need neither norm nor RoPE: the staging copy pack_k_block reads from is skipped.
inline void pack_k_rows(const uint16_t* const* rows, int64_t D, int64_t DQ, uint32_t* dst) {
  for (int64_t g = 0; g < DQ / 2; g += 16) {
    const int64_t left = D - 2 * g;  // elements of this 32-element group that lie in the row
    const __mmask32 mk = left >= 32 ? __mmask32(~0u) : __mmask32((1u << left) - 1u);
    __m512 r[16];
    for (int j = 0; j < 16; ++j)
      r[j] = rows[j] ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mk, rows[j] + 2 * g)) : _mm512_setzero_ps();
    raekern::cpu::transpose16(r);
    for (int p = 0; p < 16; ++p) _mm512_store_ps(reinterpret_cast<float*>(dst + (g + p) * 16), r[p]);
  }
}

// Rows a and c (D bf16 elements; null: zeros) as the pair-row of a VNNI panel over rows: dim d's
// word (a[d], c[d]) goes to dst[(d/16)·stride_words + d % 16], for d < DV = round16(D). One word
// permute makes 16 words from the two rows' 32-element loads.
inline void pack_pair_row(const uint16_t* a, const uint16_t* c, int64_t D, int64_t DV, uint32_t* dst,
                          int64_t stride_words) {
  static const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                             6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  static const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t i = 0; i < DV; i += 32) {
    const int64_t left = D - i;
    const __mmask32 mk = left >= 32 ? __mmask32(~0u) : __mmask32((1u << left) - 1u);
    const __m512i x = a ? _mm512_maskz_loadu_epi16(mk, a + i) : _mm512_setzero_si512();
    const __m512i y = c ? _mm512_maskz_loadu_epi16(mk, c + i) : _mm512_setzero_si512();
    _mm512_store_si512(dst + (i / 16) * stride_words, _mm512_permutex2var_epi16(x, lo, y));
    if (i + 16 < DV) _mm512_store_si512(dst + (i / 16 + 1) * stride_words, _mm512_permutex2var_epi16(x, hi, y));
  }
}

// Rows [0, nrows) (nrows even, row stride ld, zero-padded to DV) packed over rows for the B side of
// a product that reduces over them: rows (2i, 2i+1) of dim d form the 32-bit word at
// [d/16 (stride_words apart)][i][d % 16].
inline void pack_row_pairs(const uint16_t* rows, int64_t ld, int64_t nrows, int64_t DV, uint32_t* dst,
                           int64_t stride_words) {
  for (int64_t j = 0; j < nrows; j += 2) pack_pair_row(rows + j * ld, rows + (j + 1) * ld, DV, DV, dst + (j / 2) * 16, stride_words);
}

// O[32][16·nd16] (+)= P[32][32·nchunks] (row stride ldp) · V, V packed over its rows as
// [16-dim block (vstride elements apart)][row pair][16 dims] starting at row pair vkey/32·16.
template <bool kFirst>
inline void pv_all(const uint16_t* pb, int64_t ldp, int64_t nchunks, const uint16_t* vv, int64_t vstride,
                   int64_t vkey, int64_t nd16, float* o, int64_t DV) {
  int64_t db = 0;
  for (; db + 2 <= nd16; db += 2) {
    const uint16_t* vb0 = vv + db * vstride + vkey;
    pv_block<true, kFirst>(pb, ldp, nchunks, vb0, vb0 + vstride, o + db * 16, DV);
  }
  if (db < nd16) pv_block<false, kFirst>(pb, ldp, nchunks, vv + db * vstride + vkey, nullptr, o + db * 16, DV);
}

// One q or k row as bf16 (the pad [D, DQ) of dst is left as it is): the input bits themselves when
// the row has no QK-norm and no RoPE, else norm and RoPE in fp32, rounded once.
inline void prologue_bf16(const c10::BFloat16* src, int64_t D, const float* w, float eps, const RopeTable<float>& rope,
                          int64_t token, float* row, uint16_t* dst) {
  if (!w && !rope.rotates(token)) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < D; i += 32) {
      const __mmask32 mk = D - i >= 32 ? __mmask32(~0u) : __mmask32((1u << (D - i)) - 1u);
      _mm512_mask_storeu_epi16(dst + i, mk, _mm512_maskz_loadu_epi16(mk, u + i));
    }
    return;
  }
  if (D <= kVecMaxD) {
    __m512 x[kVecMaxD / 16];
    const int64_t nv = prologue_vec(src, D, w, eps, rope, token, 1.f, x);
    for (int64_t v = 0; v < nv; ++v)
      raekern::cpu::store16_bits(dst + 16 * v, (__m256i)_mm512_cvtneps_pbh(x[v]), tail_mask(D - 16 * v));
    return;
  }
  prologue_row<c10::BFloat16, float>(src, D, w, eps, rope, token, 1.f, row);
  to_bf16_row(row, D, dst);
}

}  // namespace raekern::attention::cpu::amx
#endif
