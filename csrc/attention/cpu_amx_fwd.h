// AMX (bf16 tile) forward for bf16 inputs on CPUs with AMX-BF16 (Sapphire Rapids and newer).
// Same flash structure as the portable kernel: per (batch, head) the kept keys are normed, rotated,
// rounded to bf16 and packed in the VNNI layout the tile unit wants (K as [16 keys][d pairs],
// V as [16 dims][key pairs]); each 32-row query tile then streams over 64-key blocks:
// S (32×32 sub-blocks, 4 accumulator tiles) = Q·Kᵀ, online softmax in AVX-512 (log2 units, lazy
// running max, bf16-precision exp2), P rounded to bf16 like the reference's bf16 matmul,
// O (fp32, in memory, rescaled by AVX-512 when the max moves) += P·V with the accumulator tiles
// loaded from and stored back to O (zeroed instead on the first key block). Every buffer a tile
// reads or writes is 64-byte aligned: a tile row across two cache lines costs two accesses.
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
#include <vector>

#include "attention/cpu_exp2.h"
#include "attention/cpu_problem.h"
#include "common/aligned_buffer.h"
#include "common/cpu_convert.h"
#include "common/cpu_vec_math.h"

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

// O (+)= P·V for every 16-dim block of V, two at a time.
template <bool kFirst>
inline void pv_all(const uint16_t* pb, int64_t nchunks, const uint16_t* vv, int64_t vstride, int64_t vkey,
                   int64_t nd16, float* o, int64_t DV) {
  int64_t db = 0;
  for (; db + 2 <= nd16; db += 2) {
    const uint16_t* vb0 = vv + db * vstride + vkey;
    pv_block<true, kFirst>(pb, kKeys, nchunks, vb0, vb0 + vstride, o + db * 16, DV);
  }
  if (db < nd16) pv_block<false, kFirst>(pb, kKeys, nchunks, vv + db * vstride + vkey, nullptr, o + db * 16, DV);
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
      _mm256_mask_storeu_epi16(dst + 16 * v, lanes_left(D - 16 * v), (__m256i)_mm512_cvtneps_pbh(x[v]));
    return;
  }
  prologue_row<c10::BFloat16, float>(src, D, w, eps, rope, token, 1.f, row);
  to_bf16_row(row, D, dst);
}

inline void forward(const Problem<c10::BFloat16, float>& P, at::Tensor& out, at::Tensor& lse, int64_t layout) {
  using T = c10::BFloat16;
  using raekern::cpu::AlignedBuffer;
  const Dims d = P.d;
  const int64_t D = d.D, DQ = (D + 31) / 32 * 32, DV = round16(D), nd16 = DV / 16;
  const Strides4 so = strides_bnhd(out, layout);
  T* optr = out.data_ptr<T>();
  float* lptr = lse.data_ptr<float>();
  const int64_t ntiles = (d.Nq + kRows - 1) / kRows;
  const int64_t want = 4 * int64_t(at::get_num_threads());
  const int64_t chunks = std::min(ntiles, std::max<int64_t>(1, (want + d.B * d.H - 1) / (d.B * d.H)));
  const int64_t tiles_per_chunk = (ntiles + chunks - 1) / chunks;
  // Scores in log2 units; the scale is applied in the softmax (one FMA), so q enters the tile
  // product as the input's own bf16 values rather than rounded again after scaling.
  const float qmul = float(P.scale / std::log(2.0));
  const int64_t nk_alloc = (d.Nk + kKeys - 1) / kKeys * kKeys;
  const int64_t vstride = (nk_alloc / 2) * 32;  // elements per 16-dim block of the V panel
  constexpr int64_t kLdS = kKeys + 16;

  TaskQueue queue(d.B * d.H * chunks);
  at::parallel_for(0, queue.threads(), 1, [&](int64_t, int64_t) {
    configure_tiles();
    std::vector<int64_t> kidx;
    AlignedBuffer<uint16_t> kv(nk_alloc * DQ), vv(nk_alloc * DV), qb(kRows * DQ), pb(kRows * kKeys), kr(16 * DQ);
    AlignedBuffer<float> s(kRows * kLdS), o(kRows * DV), row(DQ), lv(kRows * 16);
    std::vector<float> m(kRows), alpha(kRows);
    int64_t packed_bh = -1, nk = 0;
    for (int64_t task = queue.claim(), next; task >= 0; task = next) {
      next = queue.claim();
      const int64_t bh = task / chunks, chunk = task % chunks, b = bh / d.H, h = bh % d.H;
      if (bh != packed_bh) {
        P.kept_keys(b, kidx);
        nk = int64_t(kidx.size());
        const int64_t nk32 = (nk + 31) / 32 * 32;  // the S blocks read keys in 32s: pad with zeros
        uint32_t* v32 = reinterpret_cast<uint32_t*>(vv.data());
        for (int64_t j = 0; j < std::min(nk, kPrefetchRows); ++j) P.prefetch_kv(b, kidx[j], h);
        // 16 keys at a time: K rows -> VNNI panel, then the same keys' V rows while still in L1.
        for (int64_t j0 = 0; j0 < nk32; j0 += 16) {
          for (int64_t jj = 0; jj < 16; ++jj) {
            const int64_t j = j0 + jj;
            uint16_t* kd = kr.data() + jj * DQ;
            if (j >= nk) {
              std::memset(kd, 0, DQ * 2);
              continue;
            }
            if (j + kPrefetchRows < nk) P.prefetch_kv(b, kidx[j + kPrefetchRows], h);
            prologue_bf16(P.k_row(b, kidx[j], h), D, P.kwp(), P.eps, P.rope, kidx[j], row.data(), kd);
          }
          pack_k_block(kr.data(), DQ, reinterpret_cast<uint32_t*>(kv.data()) + (j0 / 16) * (DQ / 2) * 16);
          // V in VNNI: keys (2i, 2i+1) of dim d form one 32-bit word at [d/16][i][d%16]; padded keys
          // are zero (a zero probability times garbage could still be NaN).
          for (int64_t j = j0; j < j0 + 16; j += 2) {
            const uint16_t* a = j < nk ? reinterpret_cast<const uint16_t*>(P.v_row(b, kidx[j], h)) : nullptr;
            const uint16_t* c = j + 1 < nk ? reinterpret_cast<const uint16_t*>(P.v_row(b, kidx[j + 1], h)) : nullptr;
            for (int64_t i = 0; i < DV; i += 16) {
              const __mmask16 mk = D - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - i)) - 1u);
              __m512i w = a ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, a + i)) : _mm512_setzero_si512();
              if (c) w = _mm512_or_si512(w, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, c + i)), 16));
              _mm512_store_si512(v32 + (i / 16) * (vstride / 2) + (j / 2) * 16, w);
            }
          }
        }
        packed_bh = bh;
      }
      const int64_t t0 = chunk * tiles_per_chunk, t1 = std::min(ntiles, t0 + tiles_per_chunk);
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t i0 = tile * kRows, bq = std::min(kRows, d.Nq - i0);
        for (int64_t r = 0; r < bq; ++r) {
          if (r + kPrefetchRows < bq) P.prefetch_q(b, i0 + r + kPrefetchRows, h);
          prologue_bf16(P.q_row(b, i0 + r, h), D, P.qwp(), P.eps, P.rope, i0 + r, row.data(), &qb[r * DQ]);
        }
        if (bq < kRows) std::memset(&qb[bq * DQ], 0, (kRows - bq) * DQ * 2);
        const Lookahead<T, float> prefetch_ahead(P, optr, so, task, next, chunks, tiles_per_chunk, kRows, tile, t0, t1);
        std::fill(m.begin(), m.end(), -INFINITY);
        std::memset(lv.data(), 0, kRows * 16 * sizeof(float));
        for (int64_t j0 = 0; j0 < nk; j0 += kKeys) {
          const int64_t bk = std::min(kKeys, nk - j0), bk32 = (bk + 31) / 32 * 32;
          for (int64_t c = 0; c < bk32; c += 32) {
            const uint16_t* kb0 = &kv[((j0 + c) / 16) * (DQ / 2) * 32];
            s_block(qb.data(), DQ, DQ / 32, kb0, kb0 + (DQ / 2) * 32, &s[c], kLdS);
          }
          for (int64_t r0 = 0; r0 < kRows; r0 += 16) {
            if (!lazy_max_update16(&s[r0 * kLdS], kLdS, bk, qmul, &m[r0], &alpha[r0])) continue;
            for (int64_t r = r0; r < r0 + 16; ++r) {
              if (alpha[r] == 1.f) continue;
              const __m512 a = _mm512_set1_ps(alpha[r]);
              _mm512_store_ps(&lv[r * 16], _mm512_mul_ps(_mm512_load_ps(&lv[r * 16]), a));
              float* orow = &o[r * DV];
              if (j0 > 0)
                for (int64_t i = 0; i < DV; i += 16) _mm512_store_ps(orow + i, _mm512_mul_ps(_mm512_load_ps(orow + i), a));
            }
          }
          for (int64_t r = 0; r < kRows; ++r) {
            if (j0 == 0) prefetch_ahead(r);
            exp2_shift_acc_bf16(&s[r * kLdS], bk, bk32, qmul, m[r], &pb[r * kKeys], &lv[r * 16]);
          }
          if (j0 == 0)
            pv_all<true>(pb.data(), bk32 / 32, vv.data(), vstride, 0, nd16, o.data(), DV);
          else
            pv_all<false>(pb.data(), bk32 / 32, vv.data(), vstride, (j0 / 2) * 32, nd16, o.data(), DV);
        }
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t n = i0 + r;
          T* dst = optr + b * so.b + n * so.n + h * so.h;
          float* orow = &o[r * DV];
          const float l = raekern::cpu::hsum16(_mm512_load_ps(&lv[r * 16]));
          const __m512 inv = _mm512_set1_ps(nk > 0 ? 1.f / l : 0.f);
          if (nk == 0) std::memset(orow, 0, DV * sizeof(float));  // no key: O was never written
          for (int64_t i = 0; i < DV; i += 16) _mm512_store_ps(orow + i, _mm512_mul_ps(_mm512_load_ps(orow + i), inv));
          raekern::cpu::narrow_row(orow, D, dst);
          lptr[(b * d.H + h) * d.Nq + n] = nk > 0 ? (m[r] + std::log2(l)) * float(M_LN2) : -INFINITY;
        }
      }
    }
    _tile_release();
  });
}

}  // namespace raekern::attention::cpu::amx
#endif
