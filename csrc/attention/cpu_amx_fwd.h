// bf16 dot-product forward for bf16 inputs: AMX tiles on CPUs with AMX-BF16 (Sapphire Rapids and
// newer), the same products as AVX512-BF16 vector instructions elsewhere (cpu_amx.h).
// Same flash structure as the portable kernel: per (batch, head) the kept keys are normed, rotated,
// rounded to bf16 and packed in the VNNI layout the tile unit wants (K as [16 keys][d pairs],
// V as [16 dims][key pairs]); each 32-row query tile then streams over blocks of kKeys keys:
// S (32×32 sub-blocks, 4 accumulator tiles) = Q·Kᵀ, online softmax in AVX-512 (log2 units, lazy
// running max, bf16-precision exp2), P rounded to bf16 like the reference's bf16 matmul,
// O (fp32, in memory, rescaled by AVX-512 when the max moves) += P·V with the accumulator tiles
// loaded from and stored back to O (zeroed instead on the first key block). Building blocks: cpu_amx.h.
#pragma once
#include "attention/cpu_amx.h"
#ifdef RAEKERN_ATTENTION_AMX
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/cpu_exp2.h"
#include "attention/cpu_problem.h"
#include "common/aligned_buffer.h"
#include "common/cpu_convert.h"

namespace raekern::attention::cpu::amx {

constexpr int64_t kRows = 32;    // query rows per tile
// Keys per online-softmax step. With AMX tiles 256: each step loads and stores the O accumulator tiles
// and sets up its score blocks, and the tile unit shares the vector ports with the softmax rather than
// overlapping it, so fewer, longer steps pay (2026-12-02, 2-core AMX Xeon: -10 % at N = 256, -7 % at
// N = 1024 against 128; 512 was slower). The vector unit keeps 128 (S tile 32×144 fp32 in L1).
#ifdef RAEKERN_ATTENTION_AMX_TILES
constexpr int64_t kKeys = 256;
#else
constexpr int64_t kKeys = 128;
#endif

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

  TaskSource<T, float> source(P, chunks, /*stage=*/false);
  at::parallel_for(0, source.threads(), 1, [&](int64_t, int64_t) {
    configure_tiles();
    std::vector<int64_t> kidx;
    AlignedBuffer<uint16_t> kv(nk_alloc * DQ), vv(nk_alloc * DV), qb(kRows * DQ), pb(kRows * kKeys), kr(16 * DQ);
    AlignedBuffer<float> s(2 * kRows * kLdS), o(kRows * DV), row(DQ), lv(kRows * 16);
    std::vector<float> m(kRows), alpha(kRows);
    int64_t packed_bh = -1, nk = 0;
    source.run_thread(P, [&](const Problem<T, float>& R, int64_t task, int64_t next, bool inputs) {
      const int64_t bh = task / chunks, chunk = task % chunks, b = bh / d.H, h = bh % d.H;
      if (bh != packed_bh) {
        P.kept_keys(b, kidx);
        nk = int64_t(kidx.size());
        const int64_t nk32 = (nk + 31) / 32 * 32;  // the S blocks read keys in 32s: pad with zeros
        uint32_t* v32 = reinterpret_cast<uint32_t*>(vv.data());
        for (int64_t j = 0; j < std::min(nk, kPrefetchRows); ++j) R.prefetch_kv(b, kidx[j], h);
        // 16 keys at a time: K rows -> VNNI panel, then the same keys' V rows while still in L1.
        const bool raw_k = !P.kwp() && !P.rope.rotates(0);  // no key is normed or rotated
        for (int64_t j0 = 0; j0 < nk32; j0 += 16) {
          const uint16_t* rows[16];
          for (int64_t jj = 0; jj < 16; ++jj) {
            const int64_t j = j0 + jj;
            if (j + kPrefetchRows < nk) R.prefetch_kv(b, kidx[j + kPrefetchRows], h);
            rows[jj] = j < nk ? reinterpret_cast<const uint16_t*>(R.k_row(b, kidx[j], h)) : nullptr;
            if (raw_k) continue;
            uint16_t* kd = kr.data() + jj * DQ;
            if (j >= nk)
              std::memset(kd, 0, DQ * 2);
            else
              prologue_bf16(R.k_row(b, kidx[j], h), D, P.kwp(), P.eps, P.rope, kidx[j], row.data(), kd);
          }
          uint32_t* kdst = reinterpret_cast<uint32_t*>(kv.data()) + (j0 / 16) * (DQ / 2) * 16;
          if (raw_k)
            pack_k_rows(rows, D, DQ, kdst);
          else
            pack_k_block(kr.data(), DQ, kdst);
          // V in VNNI: keys (2i, 2i+1) of dim d form one 32-bit word at [d/16][i][d%16]; padded keys
          // are zero (a zero probability times garbage could still be NaN).
          for (int64_t j = j0; j < j0 + 16; j += 2) {
            const uint16_t* a = j < nk ? reinterpret_cast<const uint16_t*>(R.v_row(b, kidx[j], h)) : nullptr;
            const uint16_t* c = j + 1 < nk ? reinterpret_cast<const uint16_t*>(R.v_row(b, kidx[j + 1], h)) : nullptr;
            pack_pair_row(a, c, D, DV, v32 + (j / 2) * 16, vstride / 2);
          }
        }
        packed_bh = bh;
      }
      const int64_t t0 = chunk * tiles_per_chunk, t1 = std::min(ntiles, t0 + tiles_per_chunk);
      // The queries of a tile, normed, rotated and rounded into qb (zero rows past the end).
      const auto load_q = [&](int64_t tile) {
        const int64_t i0 = tile * kRows, bq = std::min(kRows, d.Nq - i0);
        for (int64_t r = 0; r < bq; ++r) {
          if (r + kPrefetchRows < bq) R.prefetch_q(b, i0 + r + kPrefetchRows, h);
          prologue_bf16(R.q_row(b, i0 + r, h), D, P.qwp(), P.eps, P.rope, i0 + r, row.data(), &qb[r * DQ]);
        }
        if (bq < kRows) std::memset(&qb[bq * DQ], 0, (kRows - bq) * DQ * 2);
      };
      if (t0 < t1) load_q(t0);
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t i0 = tile * kRows, bq = std::min(kRows, d.Nq - i0);
        const Lookahead<T, float> prefetch_ahead(R, optr, so, task, next, chunks, tiles_per_chunk, kRows, tile, t0, t1, inputs);
        std::fill(m.begin(), m.end(), -INFINITY);
        std::memset(lv.data(), 0, kRows * 16 * sizeof(float));
        // S of the next key block is issued before the softmax of this one (two S buffers), so the
        // tile unit computes it while the vector units run the exponentials.
        const auto scores = [&](int64_t j0, float* sb) {
          const int64_t bk32 = (std::min(kKeys, nk - j0) + 31) / 32 * 32;
          for (int64_t c = 0; c < bk32; c += 32) {
            const uint16_t* kb0 = &kv[((j0 + c) / 16) * (DQ / 2) * 32];
            s_block(qb.data(), DQ, DQ / 32, (D + 1) / 2, kb0, kb0 + (DQ / 2) * 32, sb + c, kLdS);
          }
        };
        if (nk > 0) scores(0, s.data());
        for (int64_t j0 = 0; j0 < nk; j0 += kKeys) {
          const int64_t bk = std::min(kKeys, nk - j0), bk32 = (bk + 31) / 32 * 32;
          float* sc = s.data() + ((j0 / kKeys) & 1) * kRows * kLdS;
          if (j0 + kKeys < nk) scores(j0 + kKeys, s.data() + (((j0 / kKeys) + 1) & 1) * kRows * kLdS);
          for (int64_t r0 = 0; r0 < kRows; r0 += 16) {
            if (!lazy_max_update16(&sc[r0 * kLdS], kLdS, bk, qmul, &m[r0], &alpha[r0])) continue;
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
            exp2_shift_acc_bf16(&sc[r * kLdS], bk, bk32, qmul, m[r], &pb[r * kKeys], &lv[r * 16]);
          }
          if (j0 == 0)
            pv_all<true>(pb.data(), kKeys, bk32 / 32, vv.data(), vstride, 0, nd16, o.data(), DV);
          else
            pv_all<false>(pb.data(), kKeys, bk32 / 32, vv.data(), vstride, (j0 / 2) * 32, nd16, o.data(), DV);
        }
        // The next tile's queries go in while the tile unit finishes this tile's last P·V (qb's last
        // reads, the score products, completed before the softmax read their results).
        if (tile + 1 < t1) load_q(tile + 1);
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t n = i0 + r;
          T* dst = optr + b * so.b + n * so.n + h * so.h;
          float* orow = &o[r * DV];
          const float l = raekern::cpu::hsum16(_mm512_load_ps(&lv[r * 16]));
          const __m512 inv = _mm512_set1_ps(nk > 0 ? 1.f / l : 0.f);
          if (nk == 0) std::memset(orow, 0, DV * sizeof(float));  // no key: O was never written
          // Normalise and round in one pass: O goes from the tile store straight to the output row.
          uint16_t* du = reinterpret_cast<uint16_t*>(dst);
          for (int64_t i = 0; i < D; i += 16) {
            const __m512 x = _mm512_mul_ps(_mm512_load_ps(orow + i), inv);
            raekern::cpu::store16_bits(du + i, (__m256i)_mm512_cvtneps_pbh(x), tail_mask(D - i));
          }
          lptr[(b * d.H + h) * d.Nq + n] = nk > 0 ? (m[r] + std::log2(l)) * float(M_LN2) : -INFINITY;
        }
      }
    });
    release_tiles();
  });
}

}  // namespace raekern::attention::cpu::amx
#endif
