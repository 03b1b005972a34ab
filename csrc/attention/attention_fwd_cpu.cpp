// Flash attention forward on the CPU: for each (batch, head, chunk of query tiles) the kept keys
// are packed once (QK-norm + RoPE applied while packing, K transposed for the score product),
// then each query tile streams over key blocks with an online softmax in log2 units, so extra
// memory is O(N·Dh) per thread and the score tile never leaves L1/L2.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <cmath>
#include <optional>
#include <vector>

#include "attention/attention_args.h"
#include "attention/attention_schema.h"
#include "attention/cpu_amx_fwd.h"
#include "attention/cpu_exp2.h"
#include "attention/cpu_gemm.h"
#include "attention/cpu_problem.h"
#include "common/aligned_buffer.h"
#include "common/cpu_convert.h"
#include "common/dispatch.h"
#include "common/output_alloc.h"

namespace raekern::attention::cpu {

constexpr int64_t kTileQ = 48;   // query rows per tile (a multiple of the 6-row micro-tile)
constexpr int64_t kTileK = 128;  // keys per online-softmax step (a multiple of 64)
constexpr int64_t kLdS = kTileK + 16;  // score-tile row stride, off the power of two

template <class T>
void forward_kernel(const Problem<T, raekern::cpu::acc_t<T>>& P, at::Tensor& out, at::Tensor& lse,
                    int64_t layout) {
  using C = raekern::cpu::acc_t<T>;
  const Dims d = P.d;
  const int64_t D = d.D, Dp = P.Dp, Dn = P.Dn, LD = P.ld;
  const Strides4 so = strides_bnhd(out, layout);
  T* optr = out.data_ptr<T>();
  const int64_t lse_bytes = lse.element_size();
  void* lptr = lse.data_ptr();
  const int64_t ntiles = (d.Nq + kTileQ - 1) / kTileQ;
  // Enough tasks for every thread; a chunk re-packs K/V, so split queries only when needed.
  const int64_t want = 4 * int64_t(at::get_num_threads());
  const int64_t chunks = std::min(ntiles, std::max<int64_t>(1, (want + d.B * d.H - 1) / (d.B * d.H)));
  const int64_t tiles_per_chunk = (ntiles + chunks - 1) / chunks;
  const C qmul = C(P.scale / std::log(2.0));  // scores in log2 units: softmax uses exp2

  TaskSource<T, C> source(P, chunks, /*stage=*/true);
  at::parallel_for(0, source.threads(), 1, [&](int64_t, int64_t) {
    std::vector<int64_t> kidx;
    raekern::cpu::AlignedBuffer<C> kt(D * round64(d.Nk)), kr(d.Nk * LD), vp(d.Nk * LD), qs(kTileQ * D),
        s(kTileQ * kLdS), o(kTileQ * LD);
    constexpr int kL = kSumLanes<C>;
    raekern::cpu::AlignedBuffer<C> l(kTileQ * kL);
    std::vector<C> m(kTileQ + 16), alpha(kTileQ + 16);  // + 16: the 16-row max groups may pass bq
    int64_t packed_bh = -1;
    int64_t nk = 0;
    source.run_thread(P, [&](const Problem<T, C>& R, int64_t task, int64_t next, bool inputs) {
      const int64_t bh = task / chunks, chunk = task % chunks, b = bh / d.H, h = bh % d.H;
      if (bh != packed_bh) {
        P.kept_keys(b, kidx);
        nk = int64_t(kidx.size());
        for (int64_t j = 0; j < std::min(nk, kPrefetchRows); ++j) R.prefetch_kv(b, kidx[j], h);
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t n = kidx[j];
          if (j + kPrefetchRows < nk) R.prefetch_kv(b, kidx[j + kPrefetchRows], h);
          prologue_row<T, C>(R.k_row(b, n, h), D, P.kwp(), P.eps, P.rope, n, C(1), &kr[j * LD]);
          C* vr = &vp[j * LD];
          const T* vs = R.v_row(b, n, h);
          for (int64_t i = 0; i < D; ++i) vr[i] = C(raekern::cpu::widen(vs[i]));
          for (int64_t i = D; i < Dp; ++i) vr[i] = C(0);
        }
        transpose_to_panels(kr.data(), LD, nk, D, kt.data());
        packed_bh = bh;
      }
      const int64_t t0 = chunk * tiles_per_chunk, t1 = std::min(ntiles, t0 + tiles_per_chunk);
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t i0 = tile * kTileQ, bq = std::min(kTileQ, d.Nq - i0);
        for (int64_t r = 0; r < bq; ++r) {
          if (r + kPrefetchRows < bq) R.prefetch_q(b, i0 + r + kPrefetchRows, h);
          prologue_row<T, C>(R.q_row(b, i0 + r, h), D, P.qwp(), P.eps, P.rope, i0 + r, qmul, &qs[r * D]);
        }
        const Lookahead<T, C> prefetch_ahead(R, optr, so, task, next, chunks, tiles_per_chunk, kTileQ, tile, t0, t1, inputs);
        std::fill(m.begin(), m.end(), C(-INFINITY));
        std::fill(l.data(), l.data() + kTileQ * kL, C(0));
        for (int64_t j0 = 0; j0 < nk; j0 += kTileK) {
          const int64_t bk = std::min(kTileK, nk - j0);
          gemm<C>(bq, round16(bk), D, qs.data(), D, 1, &kt[(j0 / 64) * D * 64], 64, D * 64, s.data(), kLdS,
                  false);
          // Running maxima first (for fp32, 16 rows per register transpose), then the exponentials.
          auto rescale = [&](int64_t r, C a) {
            for (int i = 0; i < kL; ++i) l[r * kL + i] *= a;
            if (j0 == 0) return;
            C* orow = &o[r * LD];
#pragma omp simd
            for (int64_t i = 0; i < Dn; ++i) orow[i] *= a;
          };
#if defined(__AVX512F__)
          if constexpr (std::is_same_v<C, float>) {
            for (int64_t r0 = 0; r0 < bq; r0 += 16)
              if (lazy_max_update16(&s[r0 * kLdS], kLdS, bk, 1.f, &m[r0], &alpha[r0]))
                for (int64_t r = r0; r < std::min(bq, r0 + 16); ++r)
                  if (alpha[r] != 1.f) rescale(r, alpha[r]);
          } else
#endif
          {
            for (int64_t r = 0; r < bq; ++r)
              if (const C a = lazy_max_update(m[r], row_max(&s[r * kLdS], bk)); a != C(1)) rescale(r, a);
          }
          for (int64_t r = 0; r < bq; ++r) {
            if (j0 == 0) prefetch_ahead(r);
            exp2_shift_acc(&s[r * kLdS], bk, m[r], &l[r * kL]);
          }
          if (j0 == 0)
            for (int64_t r = bq; r < kTileQ; ++r) prefetch_ahead(r);
          // P·V in 64-key steps: a 64-row V slice (≤ 24 KiB) stays in L1 across the query rows,
          // where the whole 128-row block would stream from L2 once per micro-tile row group.
          for (int64_t kk = 0; kk < bk; kk += 64)
            gemm<C>(bq, Dn, std::min<int64_t>(64, bk - kk), &s[kk], kLdS, 1, &vp[(j0 + kk) * LD], LD, 64, o.data(), LD,
                    j0 + kk > 0);
        }
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t n = i0 + r;
          T* dst = optr + b * so.b + n * so.n + h * so.h;
          const C lr = lanes_sum(&l[r * kL]);
          const C inv = nk > 0 ? C(1) / lr : C(0);
          C* orow = &o[r * LD];
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) orow[i] = nk > 0 ? orow[i] * inv : C(0);
          raekern::cpu::narrow_row(orow, D, dst);
          // In the accumulator type: a double log2 per row showed up in small problems' profiles.
          const C lv = nk > 0 ? (m[r] + std::log2(lr)) * C(M_LN2) : C(-INFINITY);
          const int64_t li = (b * d.H + h) * d.Nq + n;
          if (lse_bytes == 8)
            static_cast<double*>(lptr)[li] = double(lv);
          else
            static_cast<float*>(lptr)[li] = float(lv);
        }
      }
    });
  });
}

// bf16 goes to the bf16 dot-product kernel (AMX tiles, or AVX512-BF16 vectors on CPUs without AMX)
// when the build and the CPU offer it; everything else, and bf16 elsewhere, to the portable AVX-512 /
// scalar kernel above. RAEKERN_ATTENTION_AMX=0 disables the bf16 kernel.
template <class Prob> inline bool try_amx(const Prob&, at::Tensor&, at::Tensor&, int64_t) { return false; }
#ifdef RAEKERN_ATTENTION_AMX
inline bool try_amx(const Problem<c10::BFloat16, float>& P, at::Tensor& out, at::Tensor& lse, int64_t layout) {
  if (!amx::available()) return false;
  amx::forward(P, out, lse, layout);
  return true;
}
#endif

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                 const at::Tensor& v_,
                                                 const std::optional<at::Tensor>& qw,
                                                 const std::optional<at::Tensor>& kw,
                                                 const std::optional<at::Tensor>& mask, double scale,
                                                 double eps, int64_t rope_h, int64_t rope_w,
                                                 double theta, int64_t layout) {
  check_args(q_, k_, v_, qw, kw, mask, rope_h, rope_w, layout);
  const at::Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  const Dims d = dims_of(q, k, layout);
  at::Tensor out = empty_in_layout(d, d.Nq, layout, q.options());
  at::Tensor lse = ::raekern::empty_output({d.B, d.H, d.Nq},
                             q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  RAEKERN_DISPATCH_FLOATING(q.scalar_type(), "raekern.attention", [&] {
    using C = raekern::cpu::acc_t<scalar_t>;
    const Problem<scalar_t, C> P(q, k, v, qw, kw, mask, scale, eps, rope_h, rope_w, theta, layout);
    if (!try_amx(P, out, lse, layout)) forward_kernel<scalar_t>(P, out, lse, layout);
  });
  return {out, lse};
}

}  // namespace raekern::attention::cpu

std::string raekern::attention::cpu_backends() {
#if defined(__AVX512F__)
  const std::string fp32 = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  const std::string fp32 = "avx2";
#else
  const std::string fp32 = "portable";
#endif
#ifdef RAEKERN_ATTENTION_AMX
  const std::string bf16 = cpu::amx::available() ? cpu::amx::unit_name() : fp32;
#else
  const std::string bf16 = fp32;
#endif
  return "bf16_forward=" + bf16 + ";bf16_backward=" + bf16 + ";fp32=" + fp32;
}

TORCH_LIBRARY_IMPL(raekern, CPU, m) { m.impl("attention", &raekern::attention::cpu::attention_cpu); }
