// bf16 dot-product backward (AMX tiles, or AVX512-BF16 vectors without AMX: cpu_amx.h) for bf16 inputs. One task per (batch, head), the
// queries taken in chunks of kQc rows so that scratch stays O(N·Dh + kQc·N):
//   for each 32-key block: S = Q̂·K̂ᵀ and dP = dO·Vᵀ per 32-query tile (2×2 tiles, reduction over
//   Dh); P = exp2(S·scale·log2e − lse·log2e) and dS = P∘(dP − Δ) in AVX-512; P and dS rounded to bf16
//   (as a bf16 reference's matmuls round them) and stored transposed for the block, dS also row-major
//   for the chunk; then dV += Pᵀ·dO and dK += dSᵀ·Q̂ with the whole chunk as the reduction;
//   after the key blocks, dQ = dS·K̂ with all keys as the reduction.
// Every product therefore runs long accumulation chains in the tiles instead of reloading its
// accumulators from memory per 32×32 block. Q̂ and K̂ are the normed and rotated rows (unscaled); the
// norm / RoPE backward (prologue_row_backward) maps dQ̂, dK̂ back as in the portable kernel.
#pragma once
#include "attention/cpu_amx.h"
#ifdef RAEKERN_ATTENTION_AMX
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "attention/cpu_exp2.h"
#include "attention/cpu_problem.h"
#include "common/aligned_buffer.h"
#include "common/cpu_convert.h"

namespace raekern::attention::cpu::amx {

constexpr int64_t kQc = 256;  // query rows per chunk (multiple of 32)

// P and dS of one 32×32 (query × key) block from its S and dP tiles (row stride 32): dS row-major
// into ds (row stride ldds), Pᵀ and dSᵀ into pt / dst (row stride ldt, at query column q0).
// Keys >= kvalid get P = dS = 0; padded queries have l2 = +inf (P = 0) and delta = 0.
inline void softmax_grad_block(const float* s, const float* dp, const float* l2, const float* delta, float qmul,
                               int64_t kvalid, uint16_t* ds, int64_t ldds, uint16_t* pt, uint16_t* dst,
                               int64_t ldt, int64_t q0) {
  alignas(64) float pbuf[32 * 32], dbuf[32 * 32];
  const __m512 vq = _mm512_set1_ps(qmul);
  const __mmask16 k0 = tail_mask(kvalid), k1 = tail_mask(kvalid - 16);
  for (int64_t r = 0; r < 32; ++r) {
    const __m512 l = _mm512_set1_ps(l2[r]), dl = _mm512_set1_ps(delta[r]);
    for (int64_t h = 0; h < 2; ++h) {
      // P <= 1 exactly: lse >= every score, but fp32 rounding of lse at huge scores can put a
      // score's exponent above 0, and an exponent of hundreds would overflow.
      const __m512 x = _mm512_sub_ps(mul_rounded(_mm512_load_ps(s + r * 32 + 16 * h), vq), l);
      const __m512 p = _mm512_maskz_mov_ps(h ? k1 : k0, exp2_ps_bf16(_mm512_min_ps(_mm512_setzero_ps(), x)));
      const __m512 d = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_load_ps(dp + r * 32 + 16 * h), dl));
      _mm512_store_ps(pbuf + r * 32 + 16 * h, p);
      _mm512_store_ps(dbuf + r * 32 + 16 * h, d);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds + r * ldds + 16 * h), (__m256i)_mm512_cvtneps_pbh(d));
    }
  }
  // 16×16 register transposes: row j of a transposed block is key j's 16 query values.
  for (int64_t qi = 0; qi < 32; qi += 16)
    for (int64_t ki = 0; ki < 32; ki += 16) {
      __m512 a[16], b[16];
      for (int i = 0; i < 16; ++i) {
        a[i] = _mm512_load_ps(pbuf + (qi + i) * 32 + ki);
        b[i] = _mm512_load_ps(dbuf + (qi + i) * 32 + ki);
      }
      raekern::cpu::transpose16(a);
      raekern::cpu::transpose16(b);
      for (int j = 0; j < 16; ++j) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pt + (ki + j) * ldt + q0 + qi), (__m256i)_mm512_cvtneps_pbh(a[j]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (ki + j) * ldt + q0 + qi), (__m256i)_mm512_cvtneps_pbh(b[j]));
      }
    }
}

// Returns false when AMX is unavailable (the caller runs the portable kernel).
inline bool backward(const Problem<c10::BFloat16, float>& P, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                     const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                     std::vector<float>& dw_parts, int64_t layout) {
  if (!available()) return false;
  using T = c10::BFloat16;
  using raekern::cpu::AlignedBuffer;
  const Dims d = P.d;
  const int64_t D = d.D, DQ = (D + 31) / 32 * 32, DV = round16(D), nd16 = DV / 16, Nq = d.Nq;
  const int64_t nk_alloc = (d.Nk + 31) / 32 * 32, qc_alloc = std::min<int64_t>(kQc, (Nq + 31) / 32 * 32);
  const Strides4 sdo = strides_bnhd(dout, layout), so = strides_bnhd(out, layout);
  const Strides4 sdq = strides_bnhd(dq, layout), sdk = strides_bnhd(dk, layout), sdv = strides_bnhd(dv, layout);
  const T *dop = dout.data_ptr<T>(), *op = out.data_ptr<T>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  const bool lse64 = lse.scalar_type() == at::kDouble, dlse64 = dlse && dlse->scalar_type() == at::kDouble;
  const void* lp = lse.data_ptr();
  const void* dlp = dlse ? dlse->data_ptr() : nullptr;
  // qmul rounded once from the double product, as the forward rounds it.
  const float qmul = float(P.scale / std::log(2.0)), scale = float(P.scale);
  const int64_t kstride = (nk_alloc / 2) * 32, qstride = (qc_alloc / 2) * 32;  // VNNI-over-rows block strides

  TaskQueue queue(d.B * d.H);
  at::parallel_for(0, queue.threads(), 1, [&](int64_t, int64_t) {
    configure_tiles();
    std::vector<int64_t> kidx;
    // Row-major bf16 rows (A operands and packing sources), their VNNI packings (B operands), the
    // chunk's dS rows and the key block's Pᵀ / dSᵀ, fp32 accumulators of dK / dV / dQ.
    AlignedBuffer<uint16_t> kr(nk_alloc * DQ), vr(nk_alloc * DQ), kvd(nk_alloc * DQ), vvd(nk_alloc * DQ),
        kvk(nk_alloc * DV), qa(qc_alloc * DQ), da(qc_alloc * DQ), qvq(qc_alloc * DV), dvq(qc_alloc * DV),
        dsb(qc_alloc * nk_alloc), pt(32 * qc_alloc), dst(32 * qc_alloc);
    AlignedBuffer<float> dka(nk_alloc * DV), dva(nk_alloc * DV), dqa(32 * DV), s(2 * 32 * 32), dpt(2 * 32 * 32),
        row(std::max(DQ, DV)), xbuf(std::max(DQ, DV)), l2(qc_alloc), delta(qc_alloc);
    for (int64_t bh = queue.claim(); bh >= 0; bh = queue.claim()) {
      const int64_t b = bh / d.H, h = bh % d.H;
      float* dwq = &dw_parts[bh * 2 * D];
      float* dwk = dwq + D;
      P.kept_keys(b, kidx);
      const int64_t nk = int64_t(kidx.size()), nk32 = (nk + 31) / 32 * 32;
      if (nk == 0) {  // every key masked: the output was 0, so every gradient is 0
        for (int64_t n = 0; n < Nq; ++n) std::memset(dqp + b * sdq.b + n * sdq.n + h * sdq.h, 0, D * sizeof(T));
        continue;
      }
      // Keys and values: rows (padded with zero rows to 32), K̂ and V over Dh, K̂ over keys.
      std::memset(kr.data(), 0, nk32 * DQ * 2);
      std::memset(vr.data(), 0, nk32 * DQ * 2);
      for (int64_t j = 0; j < std::min(nk, kPrefetchRows); ++j) P.prefetch_kv(b, kidx[j], h);
      for (int64_t j = 0; j < nk; ++j) {
        if (j + kPrefetchRows < nk) P.prefetch_kv(b, kidx[j + kPrefetchRows], h);
        prologue_bf16(P.k_row(b, kidx[j], h), D, P.kwp(), P.eps, P.rope, kidx[j], row.data(), &kr[j * DQ]);
        std::memcpy(&vr[j * DQ], P.v_row(b, kidx[j], h), D * 2);
      }
      for (int64_t j0 = 0; j0 < nk32; j0 += 16) {
        pack_k_block(&kr[j0 * DQ], DQ, reinterpret_cast<uint32_t*>(kvd.data()) + (j0 / 16) * (DQ / 2) * 16);
        pack_k_block(&vr[j0 * DQ], DQ, reinterpret_cast<uint32_t*>(vvd.data()) + (j0 / 16) * (DQ / 2) * 16);
      }
      pack_row_pairs(kr.data(), DQ, nk32, DV, reinterpret_cast<uint32_t*>(kvk.data()), kstride / 2);
      std::memset(dka.data(), 0, nk32 * DV * sizeof(float));
      std::memset(dva.data(), 0, nk32 * DV * sizeof(float));

      for (int64_t c0 = 0; c0 < Nq; c0 += kQc) {
        const int64_t nq = std::min(kQc, Nq - c0), nq32 = (nq + 31) / 32 * 32;
        // The chunk's queries and output gradients: rows, packings over rows, Δ and lse in log2 units.
        std::memset(qa.data(), 0, nq32 * DQ * 2);
        std::memset(da.data(), 0, nq32 * DQ * 2);
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t n = c0 + r;
          if (r + kPrefetchRows < nq) {
            const int64_t a = n + kPrefetchRows;
            P.prefetch_q(b, a, h);
            prefetch_row(dop + b * sdo.b + a * sdo.n + h * sdo.h, D * sizeof(T));
            prefetch_row(op + b * so.b + a * so.n + h * so.h, D * sizeof(T));
          }
          prologue_bf16(P.q_row(b, n, h), D, P.qwp(), P.eps, P.rope, n, row.data(), &qa[r * DQ]);
          const T* gr = dop + b * sdo.b + n * sdo.n + h * sdo.h;
          const T* orow = op + b * so.b + n * so.n + h * so.h;
          std::memcpy(&da[r * DQ], gr, D * 2);
          __m512 acc = _mm512_setzero_ps();
          for (int64_t i = 0; i < D; i += 16) {
            const __mmask16 mk = tail_mask(D - i);
            acc = _mm512_fmadd_ps(raekern::cpu::load16(gr + i, mk), raekern::cpu::load16(orow + i, mk), acc);
          }
          const int64_t li = (b * d.H + h) * Nq + n;
          float dl = raekern::cpu::hsum16(acc);
          // dL/dlse_i adds P·dlse_i to dS, which is the same as subtracting it from Δ_i.
          if (dlp) dl -= dlse64 ? float(static_cast<const double*>(dlp)[li]) : static_cast<const float*>(dlp)[li];
          delta[r] = dl;
          l2[r] = float((lse64 ? static_cast<const double*>(lp)[li] : double(static_cast<const float*>(lp)[li])) / std::log(2.0));
        }
        for (int64_t r = nq; r < nq32; ++r) {
          delta[r] = 0.f;
          l2[r] = INFINITY;  // padded query: P = 0
        }
        pack_row_pairs(qa.data(), DQ, nq32, DV, reinterpret_cast<uint32_t*>(qvq.data()), qstride / 2);
        pack_row_pairs(da.data(), DQ, nq32, DV, reinterpret_cast<uint32_t*>(dvq.data()), qstride / 2);

        for (int64_t j0 = 0; j0 < nk32; j0 += 32) {
          const uint16_t* kb0 = &kvd[(j0 / 16) * (DQ / 2) * 32];
          const uint16_t* vb0 = &vvd[(j0 / 16) * (DQ / 2) * 32];
          // The next query tile's S and dP are issued before this tile's softmax gradient (two
          // buffers each), so the tile unit works while the vector units do.
          const auto products = [&](int64_t q0) {
            const int64_t slot = ((q0 / 32) & 1) * 32 * 32;
            s_block(&qa[q0 * DQ], DQ, DQ / 32, (D + 1) / 2, kb0, kb0 + (DQ / 2) * 32, s.data() + slot, 32);
            s_block(&da[q0 * DQ], DQ, DQ / 32, (D + 1) / 2, vb0, vb0 + (DQ / 2) * 32, dpt.data() + slot, 32);
          };
          products(0);
          for (int64_t q0 = 0; q0 < nq32; q0 += 32) {
            if (q0 + 32 < nq32) products(q0 + 32);
            const int64_t slot = ((q0 / 32) & 1) * 32 * 32;
            softmax_grad_block(s.data() + slot, dpt.data() + slot, &l2[q0], &delta[q0], qmul, nk - j0,
                               &dsb[q0 * nk_alloc + j0], nk_alloc, pt.data(), dst.data(), qc_alloc, q0);
          }
          // dV += Pᵀ·dO and dK += dSᵀ·Q̂ over the chunk's queries.
          pv_all<false>(pt.data(), qc_alloc, nq32 / 32, dvq.data(), qstride, 0, nd16, &dva[j0 * DV], DV);
          pv_all<false>(dst.data(), qc_alloc, nq32 / 32, qvq.data(), qstride, 0, nd16, &dka[j0 * DV], DV);
        }
        // dQ̂ = dS·K̂ over all keys, then through the norm / RoPE backward.
        for (int64_t q0 = 0; q0 < nq32; q0 += 32) {
          pv_all<true>(&dsb[q0 * nk_alloc], nk_alloc, nk32 / 32, kvk.data(), kstride, 0, nd16, dqa.data(), DV);
          for (int64_t r = 0; r < std::min<int64_t>(32, nq - q0); ++r) {
            const int64_t n = c0 + q0 + r;
            if (r + kPrefetchRows < 32 && n + kPrefetchRows < Nq)
              prefetch_row<true>(dqp + b * sdq.b + (n + kPrefetchRows) * sdq.n + h * sdq.h, D * sizeof(T));
            prologue_row_backward<T, float>(P.q_row(b, n, h), D, P.qwp(), P.eps, P.rope, n, scale, &dqa[r * DV],
                                            xbuf.data(), dwq, dqp + b * sdq.b + n * sdq.n + h * sdq.h);
          }
        }
      }
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t n = kidx[j];
        if (j + kPrefetchRows < nk) {
          const int64_t a = kidx[j + kPrefetchRows];
          prefetch_row<true>(dkp + b * sdk.b + a * sdk.n + h * sdk.h, D * sizeof(T));
          prefetch_row<true>(dvp + b * sdv.b + a * sdv.n + h * sdv.h, D * sizeof(T));
        }
        prologue_row_backward<T, float>(P.k_row(b, n, h), D, P.kwp(), P.eps, P.rope, n, scale, &dka[j * DV],
                                        xbuf.data(), dwk, dkp + b * sdk.b + n * sdk.n + h * sdk.h);
        raekern::cpu::narrow_row(&dva[j * DV], D, dvp + b * sdv.b + n * sdv.n + h * sdv.h);
      }
    }
    release_tiles();
  });
  return true;
}

}  // namespace raekern::attention::cpu::amx
#endif
