// Flash attention backward on the CPU (FlashAttention-2 order): one task per (batch, head), key
// blocks outer and query tiles inner, so dK/dV of a key block stay hot while dQ accumulates in a
// per-task fp32 panel. Scores are recomputed from the packed (normed, rotated) q/k and the saved
// log-sum-exp. The QK-norm weight gradients are reduced over tasks in a fixed order, so the result
// is deterministic whatever the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/attention_args.h"
#include "attention/cpu_amx_bwd.h"
#include "attention/cpu_exp2.h"
#include "attention/cpu_gemm.h"
#include "attention/cpu_problem.h"
#include "common/aligned_buffer.h"
#include "common/dispatch.h"

namespace raekern::attention::cpu {

constexpr int64_t kBwdTileQ = 48;
constexpr int64_t kBwdTileK = 64;  // one transposed 64-key panel
constexpr int64_t kBwdLdS = kBwdTileK + 16;

template <class T>
void backward_kernel(const Problem<T, raekern::cpu::acc_t<T>>& P, const at::Tensor& dout,
                     const std::optional<at::Tensor>& dlse,
                     const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                     at::Tensor& dv, std::vector<raekern::cpu::acc_t<T>>& dw_parts, int64_t layout) {
  using C = raekern::cpu::acc_t<T>;
  const Dims d = P.d;
  const int64_t D = d.D, Dp = P.Dp, Dn = P.Dn, LD = P.ld, Nq = d.Nq;
  const Strides4 sdo = strides_bnhd(dout, layout), so = strides_bnhd(out, layout);
  const Strides4 sdq = strides_bnhd(dq, layout), sdk = strides_bnhd(dk, layout),
                 sdv = strides_bnhd(dv, layout);
  const T *dop = dout.data_ptr<T>(), *op = out.data_ptr<T>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  const bool lse64 = lse.scalar_type() == at::kDouble;
  const void* lp = lse.data_ptr();
  const bool dlse64 = dlse && dlse->scalar_type() == at::kDouble;
  const void* dlp = dlse ? dlse->data_ptr() : nullptr;
  const C log2e = C(1.0 / std::log(2.0));
  // Rounded once from the double product, exactly as the forward's: a one-ulp different multiplier
  // moves every recomputed exponent by |s|·2^-24 against the forward's lse.
  const C qmul = C(P.scale / std::log(2.0));

  TaskQueue queue(d.B * d.H);
  at::parallel_for(0, queue.threads(), 1, [&](int64_t, int64_t) {
    std::vector<int64_t> kidx;
    const int64_t nkp_max = round64(d.Nk);
    // 64-byte aligned: the micro-kernels' row loads would otherwise straddle cache lines.
    raekern::cpu::AlignedBuffer<C> qp(Nq * LD), dop_(Nq * LD), kp(d.Nk * LD), kt(D * nkp_max), vt(D * nkp_max),
        dqa(Nq * LD), dka(d.Nk * LD), dva(d.Nk * LD), s(kBwdTileQ * kBwdLdS), dp(kBwdTileQ * kBwdLdS), row(Dp),
        xbuf(Dp), vrow(d.Nk * LD);
    std::vector<C> delta(Nq), l2(Nq);
    for (int64_t bh = queue.claim(); bh >= 0; bh = queue.claim()) {
      const int64_t b = bh / d.H, h = bh % d.H;
      C* dwq = &dw_parts[bh * 2 * D];
      C* dwk = dwq + D;
      P.kept_keys(b, kidx);
      const int64_t nk = int64_t(kidx.size());
      if (nk == 0) {  // every key masked: the output was 0, so every gradient is 0
        for (int64_t n = 0; n < Nq; ++n) {
          T* dst = dqp + b * sdq.b + n * sdq.n + h * sdq.h;
          for (int64_t i = 0; i < D; ++i) dst[i] = T(0);
        }
        continue;
      }
      // Pack q (scaled into log2 units), dO, k (row-major and transposed) and vᵀ.
      std::fill(qp.data(), qp.data() + Nq * LD, C(0));
      std::fill(dop_.data(), dop_.data() + Nq * LD, C(0));
      for (int64_t n = 0; n < Nq; ++n) {
        if (n + kPrefetchRows < Nq) {
          const int64_t a = n + kPrefetchRows;
          P.prefetch_q(b, a, h);
          prefetch_row(dop + b * sdo.b + a * sdo.n + h * sdo.h, D * sizeof(T));
          prefetch_row(op + b * so.b + a * so.n + h * so.h, D * sizeof(T));
        }
        prologue_row<T, C>(P.q_row(b, n, h), D, P.qwp(), P.eps, P.rope, n, qmul, &qp[n * LD]);
        const T* g = dop + b * sdo.b + n * sdo.n + h * sdo.h;
        const T* o = op + b * so.b + n * so.n + h * so.h;
        C acc = 0;
        C* gr = &dop_[n * LD];
        for (int64_t i = 0; i < D; ++i) {
          gr[i] = C(raekern::cpu::widen(g[i]));
          acc += gr[i] * C(raekern::cpu::widen(o[i]));
        }
        const int64_t li = (b * d.H + h) * Nq + n;
        // dL/dlse_i adds P·dlse_i to dS, which is the same as subtracting it from Δ_i.
        if (dlp) acc -= C(dlse64 ? static_cast<const double*>(dlp)[li] : double(static_cast<const float*>(dlp)[li]));
        delta[n] = acc;
        l2[n] = C((lse64 ? static_cast<const double*>(lp)[li] : double(static_cast<const float*>(lp)[li])) /
                  std::log(2.0));
      }
      for (int64_t j = 0; j < std::min(nk, kPrefetchRows); ++j) P.prefetch_kv(b, kidx[j], h);
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t n = kidx[j];
        if (j + kPrefetchRows < nk) P.prefetch_kv(b, kidx[j + kPrefetchRows], h);
        C* kr = &kp[j * LD];
        prologue_row<T, C>(P.k_row(b, n, h), D, P.kwp(), P.eps, P.rope, n, C(1), kr);
        for (int64_t i = D; i < Dp; ++i) kr[i] = C(0);
        widen_row<T, C>(P.v_row(b, n, h), D, &vrow[j * LD]);
      }
      transpose_to_panels(kp.data(), LD, nk, D, kt.data());
      transpose_to_panels(vrow.data(), LD, nk, D, vt.data());
      std::fill(dqa.data(), dqa.data() + Nq * LD, C(0));
      for (int64_t j0 = 0; j0 < nk; j0 += kBwdTileK) {
        const int64_t bk = std::min(kBwdTileK, nk - j0), bkp = round16(bk);
        C* dkb = &dka[j0 * LD];
        C* dvb = &dva[j0 * LD];
        for (int64_t i0 = 0; i0 < Nq; i0 += kBwdTileQ) {
          const int64_t bq = std::min(kBwdTileQ, Nq - i0);
          gemm<C>(bq, bkp, D, &qp[i0 * LD], LD, 1, &kt[j0 * D], 64, D * 64, s.data(), kBwdLdS, false);
          gemm<C>(bq, bkp, D, &dop_[i0 * LD], LD, 1, &vt[j0 * D], 64, D * 64, dp.data(), kBwdLdS, false);
          for (int64_t r = 0; r < bq; ++r) {
            C* sr = &s[r * kBwdLdS];
            C* dr = &dp[r * kBwdLdS];
            exp2_shift_sum(sr, bk, l2[i0 + r]);
            const C dl = delta[i0 + r];
            // P ≤ 1 exactly (lse ≥ every score); the recomputed exponent can exceed it by the
            // rounding of an lse stored in fp32 (|s| in the millions: ulps of 0.1 log2 units).
            // A conditional, not std::min: GCC left the loop scalar with the reference std::min returns.
#pragma omp simd
            for (int64_t c = 0; c < bk; ++c) {
              const C p = C(1) < sr[c] ? C(1) : sr[c];  // NaN stays NaN, as with std::min
              sr[c] = p;
              dr[c] = p * (dr[c] - dl);
            }
          }
          const bool first = i0 == 0;
          gemm<C>(bk, Dn, bq, s.data(), 1, kBwdLdS, &dop_[i0 * LD], LD, 64, dvb, LD, !first);
          gemm<C>(bk, Dn, bq, dp.data(), 1, kBwdLdS, &qp[i0 * LD], LD, 64, dkb, LD, !first);
          gemm<C>(bq, Dn, bk, dp.data(), kBwdLdS, 1, &kp[j0 * LD], LD, 64, &dqa[i0 * LD], LD, true);
        }
      }
      // Undo the prologues: dq_rot = scale·dS·k_rot, dk_rot = dSᵀ·(scale·log2e·q_rot) / log2e.
      for (int64_t n = 0; n < Nq; ++n) {
        if (n + kPrefetchRows < Nq) {
          const int64_t a = n + kPrefetchRows;
          prefetch_row<true>(dqp + b * sdq.b + a * sdq.n + h * sdq.h, D * sizeof(T));
          if (P.qwp()) P.prefetch_q(b, a, h);
        }
        std::copy(&dqa[n * LD], &dqa[n * LD] + D, row.data());
        prologue_row_backward<T, C>(P.q_row(b, n, h), D, P.qwp(), P.eps, P.rope, n, C(P.scale),
                                    row.data(), xbuf.data(), dwq, dqp + b * sdq.b + n * sdq.n + h * sdq.h);
      }
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t n = kidx[j];
        if (j + kPrefetchRows < nk) {
          const int64_t a = kidx[j + kPrefetchRows];
          prefetch_row<true>(dkp + b * sdk.b + a * sdk.n + h * sdk.h, D * sizeof(T));
          prefetch_row<true>(dvp + b * sdv.b + a * sdv.n + h * sdv.h, D * sizeof(T));
          if (P.kwp()) prefetch_row(P.k_row(b, a, h), D * sizeof(T));
        }
        std::copy(&dka[j * LD], &dka[j * LD] + D, row.data());
        prologue_row_backward<T, C>(P.k_row(b, n, h), D, P.kwp(), P.eps, P.rope, n, C(1) / log2e,
                                    row.data(), xbuf.data(), dwk, dkp + b * sdk.b + n * sdk.n + h * sdk.h);
        T* dst = dvp + b * sdv.b + n * sdv.n + h * sdv.h;
        for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(dva[j * LD + i]);
      }
    }
  });
}

// bf16 goes to the bf16 dot-product backward (AMX tiles, or AVX512-BF16 vectors without AMX) when the
// build and the CPU offer it (RAEKERN_ATTENTION_AMX=0 disables it); everything else to the portable
// AVX-512 / scalar kernel above.
template <class Prob, class C>
inline bool try_amx_backward(const Prob&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                             const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, std::vector<C>&, int64_t) {
  return false;
}
#ifdef RAEKERN_ATTENTION_AMX
inline bool try_amx_backward(const Problem<c10::BFloat16, float>& P, const at::Tensor& dout,
                             const std::optional<at::Tensor>& dlse, const at::Tensor& out, const at::Tensor& lse,
                             at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, std::vector<float>& parts, int64_t layout) {
  return amx::backward(P, dout, dlse, out, lse, dq, dk, dv, parts, layout);
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout_, const std::optional<at::Tensor>& dlse, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse, const std::optional<at::Tensor>& qw,
    const std::optional<at::Tensor>& kw, const std::optional<at::Tensor>& mask, double scale,
    double eps, int64_t rope_h, int64_t rope_w, double theta, int64_t layout, bool deterministic) {
  (void)deterministic;  // the CPU backward is always deterministic
  check_args(q_, k_, v_, qw, kw, mask, rope_h, rope_w, layout);
  check_backward_args(dout_, out_, lse, dlse, q_, dims_of(q_, k_, layout));
  const at::Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_), dout = unit_last(dout_),
                   out = unit_last(out_);
  const Dims d = dims_of(q, k, layout);
  const at::Tensor lsec = lse.contiguous();
  std::optional<at::Tensor> dlsec;
  if (dlse) dlsec = dlse->to(lse.scalar_type()).contiguous();
  at::Tensor dq = empty_in_layout(d, d.Nq, layout, q.options());
  // Masked keys get no gradient; the kernel writes only kept rows.
  at::Tensor dk = mask ? at::zeros(k.sizes(), q.options()) : empty_in_layout(d, d.Nk, layout, q.options());
  at::Tensor dv = mask ? at::zeros(k.sizes(), q.options()) : empty_in_layout(d, d.Nk, layout, q.options());
  at::Tensor dqw, dkw;
  RAEKERN_DISPATCH_FLOATING(q.scalar_type(), "raekern.attention_backward", [&] {
    using C = raekern::cpu::acc_t<scalar_t>;
    const Problem<scalar_t, C> P(q, k, v, qw, kw, mask, scale, eps, rope_h, rope_w, theta, layout);
    std::vector<C> parts(d.B * d.H * 2 * d.D, C(0));
    if (!try_amx_backward(P, dout, dlsec, out, lsec, dq, dk, dv, parts, layout))
      backward_kernel<scalar_t>(P, dout, dlsec, out, lsec, dq, dk, dv, parts, layout);
    // Fixed-order reduction over (batch, head): deterministic norm-weight gradients.
    std::vector<double> sq(d.D, 0.0), sk(d.D, 0.0);
    for (int64_t t = 0; t < d.B * d.H; ++t)
      for (int64_t i = 0; i < d.D; ++i) {
        sq[i] += double(parts[t * 2 * d.D + i]);
        sk[i] += double(parts[t * 2 * d.D + d.D + i]);
      }
    auto finish = [&](const std::optional<at::Tensor>& w, const std::vector<double>& s) {
      if (!w) return at::zeros({0}, q.options());
      at::Tensor g = at::empty({d.D}, w->options().dtype(at::kDouble));
      std::copy(s.begin(), s.end(), g.data_ptr<double>());
      return g.to(w->scalar_type());
    };
    dqw = finish(qw, sq);
    dkw = finish(kw, sk);
  });
  return {dq, dk, dv, dqw, dkw};
}

}  // namespace raekern::attention::cpu

TORCH_LIBRARY_IMPL(raekern, CPU, m) {
  m.impl("attention_backward", &raekern::attention::cpu::attention_backward_cpu);
}
