// AMX (bf16 tile) forward for bf16 inputs on CPUs with AMX-BF16 (Sapphire Rapids and newer).
// Same flash structure as the portable kernel: per (batch, head) the kept keys are normed, rotated,
// rounded to bf16 and packed in the VNNI layout the tile unit wants (K as [16 keys][d pairs],
// V as [16 dims][key pairs]); each 32-row query tile then streams over 64-key blocks:
// S (32×32 sub-blocks, 4 accumulator tiles) = Q·Kᵀ, online softmax in AVX-512 (log2 units),
// P rounded to bf16 like the reference's bf16 matmul, O (fp32, in memory, rescaled by AVX-512)
// += P·V with the accumulator tiles loaded from and stored back to O.
// Tile use: 0-3 accumulators, 4-5 A (two 16-row halves), 6-7 B (two 16-column halves).
#pragma once
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define RAEKERN_ATTENTION_AMX 1
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "attention/cpu_exp2.h"
#include "attention/cpu_problem.h"

namespace raekern::attention::cpu::amx {

// Linux hands out AMX tile state only on request (once per process).
inline bool available() {
  static const bool ok = [] {
    if (const char* e = std::getenv("RAEKERN_ATTENTION_AMX"); e && e[0] == '0') return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

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

inline uint16_t bf16_bits(float f) {
  const c10::BFloat16 b(f);
  return b.x;
}

// fp32 -> bf16 (round to nearest even), 16 lanes at a time.
inline void to_bf16_row(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    _mm256_mask_storeu_epi16(dst + i, mk, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, src + i)));
  }
}

constexpr int64_t kRows = 32;    // query rows per tile
constexpr int64_t kKeys = 128;   // keys per online-softmax step (S tile 32×144 fp32 stays in L1)
constexpr int64_t kChunk = 512;  // elements of one VNNI B tile (16 pair-rows × 32)

// S[32][32] = Q[32][DQ] · K(16-key blocks kb0, kb1)ᵀ.
inline void s_block(const uint16_t* q, int64_t ldq, int64_t nchunks, const uint16_t* kb0, const uint16_t* kb1,
                    float* s, int64_t lds) {
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
template <bool kTwo>
inline void pv_block(const uint16_t* p, int64_t ldp, int64_t nchunks, const uint16_t* vb0, const uint16_t* vb1,
                     float* o, int64_t ldo) {
  _tile_loadd(0, o, ldo * 4);
  _tile_loadd(2, o + 16 * ldo, ldo * 4);
  if constexpr (kTwo) {
    _tile_loadd(1, o + 16, ldo * 4);
    _tile_loadd(3, o + 16 * ldo + 16, ldo * 4);
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

inline void forward(const Problem<c10::BFloat16, float>& P, at::Tensor& out, at::Tensor& lse, int64_t layout) {
  using T = c10::BFloat16;
  const Dims d = P.d;
  const int64_t D = d.D, DQ = (D + 31) / 32 * 32, DV = round16(D), nd16 = DV / 16;
  const Strides4 so = strides_bnhd(out, layout);
  T* optr = out.data_ptr<T>();
  float* lptr = lse.data_ptr<float>();
  const int64_t ntiles = (d.Nq + kRows - 1) / kRows;
  const int64_t want = 4 * int64_t(at::get_num_threads());
  const int64_t chunks = std::min(ntiles, std::max<int64_t>(1, (want + d.B * d.H - 1) / (d.B * d.H)));
  const int64_t tiles_per_chunk = (ntiles + chunks - 1) / chunks;
  const float qmul = float(P.scale / std::log(2.0));
  const int64_t nk_alloc = (d.Nk + kKeys - 1) / kKeys * kKeys;
  constexpr int64_t kLdS = kKeys + 16;

  at::parallel_for(0, d.B * d.H * chunks, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    std::vector<int64_t> kidx;
    std::vector<uint16_t> kv(nk_alloc * DQ), vv(nk_alloc * DV), qb(kRows * DQ), pb(kRows * kKeys);
    std::vector<float> s(kRows * kLdS), o(kRows * DV), row(DQ), m(kRows), l(kRows);
    std::vector<uint16_t> rowb(DQ + 32);
    std::optional<HeadStage<T, float>> stage;
    if (HeadStage<T, float>::wanted(P)) stage.emplace(P);
    int64_t packed_bh = -1, nk = 0;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, chunk = task % chunks, b = bh / d.H, h = bh % d.H;
      const int64_t last_bh = (end - 1) / chunks;
      const auto& R = stage ? stage->get(P, b, h, last_bh / d.H == b ? last_bh % d.H : d.H - 1) : P;
      if (bh != packed_bh) {
        P.kept_keys(b, kidx);
        nk = int64_t(kidx.size());
        std::fill(kv.begin(), kv.end(), uint16_t(0));
        std::fill(vv.begin(), vv.end(), uint16_t(0));
        for (int64_t j = 0; j < std::min(nk, kPrefetchRows); ++j) R.prefetch_kv(b, kidx[j], h);
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t n = kidx[j];
          if (j + kPrefetchRows < nk) R.prefetch_kv(b, kidx[j + kPrefetchRows], h);
          prologue_row<T, float>(R.k_row(b, n, h), D, P.kwp(), P.eps, P.rope, n, 1.f, row.data());
          to_bf16_row(row.data(), D, rowb.data());
          // K in VNNI: the (d, d+1) pair of key j is one 32-bit word at [j/16][d/2][j%16].
          uint32_t* kb = reinterpret_cast<uint32_t*>(kv.data()) + (j / 16) * (DQ / 2) * 16 + (j % 16);
          const uint32_t* pairs = reinterpret_cast<const uint32_t*>(rowb.data());
          for (int64_t p = 0; p < D / 2; ++p) kb[p * 16] = pairs[p];
          if (D % 2) kb[(D / 2) * 16] = rowb[D - 1];
        }
        // V in VNNI: keys (2i, 2i+1) of dim d form one 32-bit word at [d/16][i][d%16].
        uint32_t* v32 = reinterpret_cast<uint32_t*>(vv.data());
        for (int64_t j = 0; j < nk; j += 2) {
          const uint16_t* a = reinterpret_cast<const uint16_t*>(R.v_row(b, kidx[j], h));
          const uint16_t* c = j + 1 < nk ? reinterpret_cast<const uint16_t*>(R.v_row(b, kidx[j + 1], h)) : nullptr;
          for (int64_t i = 0; i < D; i += 16) {
            const __mmask16 mk = D - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - i)) - 1u);
            __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, a + i));
            if (c) w = _mm512_or_si512(w, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, c + i)), 16));
            _mm512_mask_storeu_epi32(v32 + (i / 16) * (nk_alloc / 2) * 16 + (j / 2) * 16, mk, w);
          }
        }
        packed_bh = bh;
      }
      const int64_t t0 = chunk * tiles_per_chunk, t1 = std::min(ntiles, t0 + tiles_per_chunk);
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t i0 = tile * kRows, bq = std::min(kRows, d.Nq - i0);
        std::fill(qb.begin(), qb.end(), uint16_t(0));
        for (int64_t r = 0; r < bq; ++r) {
          if (r + kPrefetchRows < bq) R.prefetch_q(b, i0 + r + kPrefetchRows, h);
          prologue_row<T, float>(R.q_row(b, i0 + r, h), D, P.qwp(), P.eps, P.rope, i0 + r, qmul, row.data());
          to_bf16_row(row.data(), D, &qb[r * DQ]);
        }
        const Lookahead<T, float> prefetch_ahead(R, optr, so, task, end, chunks, tiles_per_chunk, kRows, tile, t0, t1, !stage);
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.f);
        std::fill(o.begin(), o.end(), 0.f);
        for (int64_t j0 = 0; j0 < nk; j0 += kKeys) {
          const int64_t bk = std::min(kKeys, nk - j0), bk32 = (bk + 31) / 32 * 32;
          for (int64_t c = 0; c < bk32; c += 32) {
            const uint16_t* kb0 = &kv[((j0 + c) / 16) * (DQ / 2) * 32];
            s_block(qb.data(), DQ, DQ / 32, kb0, kb0 + (DQ / 2) * 32, &s[c], kLdS);
          }
          for (int64_t r = 0; r < kRows; ++r) {
            if (j0 == 0) prefetch_ahead(r);
            float* sr = &s[r * kLdS];
            const float mnew = std::max(m[r], row_max(sr, bk));
            const float alpha = std::exp2(m[r] - mnew);
            l[r] = l[r] * alpha + exp2_shift_sum_bf16(sr, bk, bk32, mnew, &pb[r * kKeys]);
            m[r] = mnew;
            if (alpha != 1.f) {
              float* orow = &o[r * DV];
              for (int64_t i = 0; i < DV; i += 16)
                _mm512_storeu_ps(orow + i, _mm512_mul_ps(_mm512_loadu_ps(orow + i), _mm512_set1_ps(alpha)));
            }
          }
          const int64_t vkey = (j0 / 2) * 32;
          int64_t db = 0;
          for (; db + 2 <= nd16; db += 2) {
            const uint16_t* vb0 = &vv[db * (nk_alloc / 2) * 32 + vkey];
            pv_block<true>(pb.data(), kKeys, bk32 / 32, vb0, vb0 + (nk_alloc / 2) * 32, &o[db * 16], DV);
          }
          if (db < nd16)
            pv_block<false>(pb.data(), kKeys, bk32 / 32, &vv[db * (nk_alloc / 2) * 32 + vkey], nullptr, &o[db * 16], DV);
        }
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t n = i0 + r;
          T* dst = optr + b * so.b + n * so.n + h * so.h;
          const float inv = nk > 0 ? 1.f / l[r] : 0.f;
          for (int64_t i = 0; i < D; ++i) dst[i] = T(o[r * DV + i] * inv);
          lptr[(b * d.H + h) * d.Nq + n] =
              nk > 0 ? float((double(m[r]) + std::log2(double(l[r]))) * std::log(2.0)) : -INFINITY;
        }
      }
    }
    _tile_release();
  });
}

}  // namespace raekern::attention::cpu::amx
#endif
