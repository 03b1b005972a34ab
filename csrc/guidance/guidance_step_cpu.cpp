// CPU kernel of raekern::guidance_step: (pass 1, only when a rule needs statistics) per-sample Gram
// matrix and sums of the rebased input streams, the shared scalar solve, then one pass writing every
// output as a per-sample linear combination of the rebased streams (base branch, branch differences
// formed per element in registers, x, ...): register-blocked kernels of guidance_blocks_cpu.h
// specialised on the stream counts, a buffered generic path for the rest.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_utils.h"
#include "common/dispatch.h"
#include "guidance/guidance_blocks_cpu.h"
#include "guidance/guidance_step.h"

namespace raekern::guidance {
namespace {

using cpu::acc_t;
using cpu::widen;

// Elements per chunk of the statistics pass (and of the buffered fallback): partial sums per chunk
// in fp32, combined across chunks in fp64.
constexpr int64_t kChunk = 1024;
// Elements per task of the register-blocked output pass: large enough to amortise the task set-up,
// small enough that a batch of a few samples still spreads across threads.
constexpr int64_t kOutChunk = 16384;
// Outputs at least this large are written with non-temporal stores: they cannot stay in cache for the
// next consumer anyway, and skipping the read-for-ownership saves a quarter to a fifth of the memory
// traffic of a few-stream combination.
constexpr int64_t kStreamBytes = int64_t(4) << 20;
// Bytes of statistics-pass input one core keeps in L2 (2 MiB on the Sapphire Rapids target) for the
// output pass's second read in the sample-split schedule, leaving room for the output pass's own
// streams (x when the statistics skip it) and the prefetchers' run-ahead.
constexpr int64_t kL2Budget = int64_t(1280) << 10;

// Loads stream e of sample b, elements [i0, i0+n), into `dst` as accumulator type; differences with
// the base branch are formed here, before any product.
template <class T>
struct Loader {
  const Prepared& p;
  int K;
  int first_momentum, last_momentum;  // [first, last) are momentum streams (accumulator dtype)

  template <class S, class A>
  static void load(const S* __restrict src, int64_t n, A* __restrict dst) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(widen(src[i]));
  }

  void operator()(int e, int64_t b, int64_t i0, int64_t n, acc_t<T>* __restrict dst,
                  const acc_t<T>* __restrict base_buf) const {
    using A = acc_t<T>;
    const Rows& r = p.streams[e];
    if (e >= first_momentum && e < last_momentum) {
      load(static_cast<const A*>(r.ptr) + b * r.stride + i0, n, dst);
      return;
    }
    load(static_cast<const T*>(r.ptr) + b * r.stride + i0, n, dst);
    if (e >= 2 && e <= K) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] -= base_buf[i];
    }
  }
};

// Reductions with explicit independent lanes: GCC vectorises these without reassociation flags, and
// 16 partial sums also shorten the fp32 rounding chains.
constexpr int kLanes = 16;
template <class A>
inline A dot_chunk(const A* __restrict u, const A* __restrict v, int64_t n) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += u[i + l] * v[i + l];
  A s = 0;
  for (; i < n; ++i) s += u[i] * v[i];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}
template <class A>
inline A sum_chunk(const A* __restrict u, int64_t n) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += u[i + l];
  A s = 0;
  for (; i < n; ++i) s += u[i];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <class T>
struct Runner {
  using A = acc_t<T>;
  Prepared& p;
  const Config& cfg;
  int64_t B, N, nchunks;
  int ns, ng, nout, nacc, jm;
  Loader<T> loader;
  T* out;
  T* x0;
  A* mom;
  blocks::GramFn<T> gram_fn;
  std::vector<blocks::CombinePlan<T>> plans;
  bool stream_outputs;

  explicit Runner(Prepared& pp)
      : p(pp), cfg(pp.cfg), B(pp.B), N(pp.N), nchunks((pp.N + kChunk - 1) / kChunk),
        ns(cfg.num_streams()), ng(cfg.gram_size()), nout(cfg.num_outputs()),
        nacc(gram_entries(ng) + ng), jm(cfg.has_momentum ? cfg.J : 0),
        loader{pp, cfg.K, 1 + cfg.K, 1 + cfg.K + jm},
        out(pp.out.data_ptr<T>()), x0(pp.return_x0 ? pp.x0.data_ptr<T>() : nullptr),
        mom(cfg.has_momentum ? pp.momentum_out.data_ptr<A>() : nullptr),
        gram_fn(blocks::pick_gram<T>(1 + cfg.K, jm, cfg.stats_read_x())), plans(size_t(pp.B)),
        stream_outputs(pp.B * pp.N * int64_t(sizeof(T)) >= cpu::stream_threshold(kStreamBytes)) {}

  template <class S>
  const S* row(int e, int64_t b) const {
    return static_cast<const S*>(p.streams[e].ptr) + b * p.streams[e].stride;
  }

  // Gram matrix and sums of chunk c of sample b into dst[nacc].
  void gram_chunk(int64_t b, int64_t c, double* dst, std::vector<A>& buf) const {
    const int64_t i0 = c * kChunk, n = std::min(kChunk, N - i0);
    if (gram_fn) {
      const T* in[1 + kMaxBranches];
      const A* min[kMaxTerms];
      for (int e = 0; e <= cfg.K; ++e) in[e] = row<T>(e, b) + i0;
      for (int j = 0; j < jm; ++j) min[j] = row<A>(1 + cfg.K + j, b) + i0;
      gram_fn(in, min, n, dst);
      return;
    }
    buf.resize(size_t(ng) * kChunk);
    for (int e = 0; e < ng; ++e) loader(e, b, i0, n, buf.data() + e * kChunk, buf.data() + kChunk);
    for (int e = 0; e < ng; ++e) {
      const A* __restrict u = buf.data() + e * kChunk;
      for (int f = e; f < ng; ++f) dst[gram_index(e, f, ng)] = double(dot_chunk(u, buf.data() + f * kChunk, n));
      dst[gram_entries(ng) + e] = double(sum_chunk(u, n));
    }
  }

  // Scalar solve of sample b (stats: its nacc sums, or nullptr) and the plan of its output pass.
  void solve_sample(int64_t b, const double* stats) {
    double* coeffs = p.coeffs.data_ptr<double>() + b * nout * ns;
    Sample s;
    s.t = p.t_tab.at(b);
    s.t_next = p.t_next_tab.at(b);
    for (int j = 0; j < cfg.J; ++j) s.w[j] = p.w_tab.at(b, j);
    s.zero_init = p.zero_init.defined() && static_cast<const uint8_t*>(p.zero_init.const_data_ptr())[b] != 0;
    Coeffs c;
    solve(cfg, s, stats, stats ? stats + gram_entries(ng) : nullptr, c);
    for (int o = 0; o < nout; ++o)
      for (int e = 0; e < ns; ++e) coeffs[o * ns + e] = c.c[o][e];
    plan_sample(b, coeffs);
  }

  // The register-blocked plan of sample b: the used streams (a stream whose coefficients are all zero
  // is not read, e.g. x for a pure velocity combination, which also keeps a NaN in an unused input
  // from reaching the output, as in the reference formulas), ordered base branch first, then the
  // branches of the difference streams, then the rest; the coefficients stay the rebased ones.
  void plan_sample(int64_t b, const double* cb) {
    blocks::CombinePlan<T>& pl = plans[b];
    pl.fn = nullptr;
    if (jm > 1) return;
    bool used[kMaxStreams] = {};
    int outs[kMaxOutputs], no = 0, nmo = 0;
    outs[no++] = 0;
    if (x0) outs[no++] = 1;
    for (int j = 0; j < jm; ++j) outs[no + nmo++] = 2 + j;
    for (int q = 0; q < no + nmo; ++q)
      for (int e = 0; e < ns; ++e) used[e] = used[e] || cb[outs[q] * ns + e] != 0.0;
    int idx[kMaxStreams], nsu = 0, nd = 0, nmi = 0, midx = -1;
    for (int e = 2; e <= cfg.K; ++e) nd += used[e];
    if (nd > 0) used[1] = true;
    // base, differences, then x / x_prev / u_prev
    if (used[1]) idx[nsu++] = 1;
    for (int e = 2; e <= cfg.K; ++e)
      if (used[e]) idx[nsu++] = e;
    for (int e = 0; e < ns; ++e) {
      if (!used[e] || (e >= 1 && e <= cfg.K)) continue;
      if (e > cfg.K && e <= cfg.K + jm) {
        midx = e;
        nmi = 1;
      } else {
        if (nsu == blocks::kMaxFixedInputs) return;
        idx[nsu++] = e;
      }
    }
    if (nsu == 0 || nsu > blocks::kMaxFixedInputs) return;
    pl.fn = blocks::pick_combine<T>(nsu, nd, nmi, no, nmo);
    if (!pl.fn) return;
    for (int s = 0; s < nsu; ++s) pl.in[s] = row<T>(idx[s], b);
    if (nmi) pl.min[0] = row<A>(midx, b);
    pl.out[0] = out + b * N;
    if (x0) pl.out[1] = x0 + b * N;
    if (nmo) pl.mout[0] = mom + b * N;
    auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 64 == 0; };
    pl.stream = stream_outputs && aligned(pl.out[0]) && (!x0 || aligned(pl.out[1])) && (!nmo || aligned(pl.mout[0]));
    for (int q = 0; q < no + nmo; ++q) {
      const double* c = cb + outs[q] * ns;
      for (int s = 0; s < nsu; ++s) pl.coef[q][s] = static_cast<A>(c[idx[s]]);
      if (nmi) pl.coef[q][nsu] = static_cast<A>(c[midx]);
    }
  }

  // Output pass over elements [i0, i0 + n) of sample b.
  void combine(int64_t b, int64_t i0, int64_t n, std::vector<A>& buf) const {
    if (plans[b].fn) {
      plans[b].fn(plans[b], i0, n);
      return;
    }
    for (int64_t c0 = i0; c0 < i0 + n; c0 += kChunk) combine_generic(b, c0, std::min(kChunk, i0 + n - c0), buf);
  }

  // Buffered fallback for configurations without a register-blocked instance (K > 4, several
  // momentum buffers, more than six storage-typed streams).
  void combine_generic(int64_t b, int64_t i0, int64_t n, std::vector<A>& buf) const {
    buf.resize(size_t(ns + 1) * kChunk);
    A* acc = buf.data() + size_t(ns) * kChunk;
    const double* cb = p.coeffs.const_data_ptr<double>() + b * nout * ns;
    bool used[kMaxStreams] = {};
    for (int o = 0; o < nout; ++o) {
      if (o == 1 && !x0) continue;
      for (int e = 0; e < ns; ++e) used[e] = used[e] || cb[o * ns + e] != 0.0;
    }
    for (int e = 2; e <= cfg.K; ++e) used[1] = used[1] || used[e];
    for (int e = 0; e < ns; ++e)
      if (used[e]) loader(e, b, i0, n, buf.data() + e * kChunk, buf.data() + kChunk);
    for (int o = 0; o < nout; ++o) {
      if (o == 1 && !x0) continue;
      const double* c = cb + o * ns;
      for (int64_t i = 0; i < n; ++i) acc[i] = 0;
      for (int e = 0; e < ns; ++e) {
        if (c[e] == 0.0) continue;
        const A ce = static_cast<A>(c[e]);
        const A* __restrict v = buf.data() + e * kChunk;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) acc[i] += ce * v[i];
      }
      if (o == 0) {
        cpu::store_row<T>(acc, n, out + b * N + i0);
      } else if (o == 1) {
        cpu::store_row<T>(acc, n, x0 + b * N + i0);
      } else {
        A* dst = mom + ((o - 2) * B + b) * N + i0;
        for (int64_t i = 0; i < n; ++i) dst[i] = acc[i];
      }
    }
  }

  // Statistics of sample b: chunk partials accumulated in a fixed order (deterministic, and the same
  // in the per-sample and the split schedule).
  void reduce_sample(const double* partial, double* stats) const {
    for (int a = 0; a < nacc; ++a) stats[a] = 0.0;
    for (int64_t c = 0; c < nchunks; ++c)
      for (int a = 0; a < nacc; ++a) stats[a] += partial[c * nacc + a];
  }

  void go() {
    const int threads = at::get_num_threads();
    const int64_t per = (N + kOutChunk - 1) / kOutChunk;
    // Bytes one output task moves: small calls (a few KiB, e.g. the digits model's latents) stay on
    // the calling thread instead of paying for a parallel region.
    const int64_t task_bytes = int64_t(ns + nout) * int64_t(sizeof(T)) * std::min(kOutChunk, N);
    if (!cfg.needs_gram() || N == 0) {
      // Empty samples: every statistic is a sum over nothing.
      const std::vector<double> none(cfg.needs_gram() ? nacc : 0, 0.0);
      for (int64_t b = 0; b < B; ++b) solve_sample(b, none.empty() ? nullptr : none.data());
      if (N == 0) return;
      // One pass. Tasks of kOutChunk elements, so both halves of a small batch and the tail of a
      // large one still spread across threads.
      cpu::parallel_rows(B * per, task_bytes, [&](int64_t begin, int64_t end) {
        std::vector<A> buf;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / per, i0 = (task % per) * kOutChunk;
          combine(b, i0, std::min(kOutChunk, N - i0), buf);
        }
      });
      return;
    }
    // Bytes of one sample the statistics pass reads; the output pass re-reads them, from L2 when
    // they are still there.
    const int64_t sample_bytes =
        (int64_t(cfg.K + (cfg.stats_read_x() ? 1 : 0)) * int64_t(sizeof(T)) + jm * int64_t(sizeof(A))) * N;
    // Whenever the batch shares out evenly, even for samples over the L2 budget: a sample-split
    // schedule costs two parallel regions per group of samples, and measured slower than the
    // per-sample one's partial L2 reuse (backward re-read) on RAE/RAEv2 latents.
    if (B >= threads && (B % threads == 0 || B >= 4 * threads)) {
      // Per-sample schedule: statistics, solve and output pass of one sample back to back, so the
      // second read of its inputs comes from cache rather than memory.
      cpu::parallel_rows(B, 2 * int64_t(ns) * int64_t(sizeof(T)) * N, [&](int64_t begin, int64_t end) {
        std::vector<A> buf;
        std::vector<double> partial(size_t(nchunks) * nacc), stats(nacc);
        for (int64_t b = begin; b < end; ++b) {
          for (int64_t c = 0; c < nchunks; ++c) gram_chunk(b, c, partial.data() + c * nacc, buf);
          reduce_sample(partial.data(), stats.data());
          solve_sample(b, stats.data());
          // Backwards: the most recently read elements are the ones still in cache (a forward
          // re-read of a sample larger than L2 would miss on every line, LRU evicting ahead of it).
          for (int64_t i0 = (N - 1) / kOutChunk * kOutChunk; i0 >= 0; i0 -= kOutChunk)
            combine(b, i0, std::min(kOutChunk, N - i0), buf);
        }
      });
      return;
    }
    // Too few samples to share out: groups of samples, each split over chunks between the threads,
    // as many samples per group as the threads' L2 hold. Both passes of a group divide the same
    // chunk range the same way, so a thread's output pass re-reads from its own L2 what its
    // statistics pass just read.
    const int64_t G = std::clamp<int64_t>(kL2Budget * threads / std::max<int64_t>(sample_bytes, 1), 1, B);
    const int64_t grain_bytes = int64_t(ns) * int64_t(sizeof(T)) * kChunk;
    std::vector<double> partial(size_t(G * nchunks) * nacc), stats(nacc);
    for (int64_t b0 = 0; b0 < B; b0 += G) {
      const int64_t tasks = std::min(G, B - b0) * nchunks;
      cpu::parallel_rows(tasks, grain_bytes, [&](int64_t begin, int64_t end) {
        std::vector<A> buf;
        for (int64_t task = begin; task < end; ++task)
          gram_chunk(b0 + task / nchunks, task % nchunks, partial.data() + task * nacc, buf);
      });
      for (int64_t b = b0; b < std::min(B, b0 + G); ++b) {
        reduce_sample(partial.data() + (b - b0) * nchunks * nacc, stats.data());
        solve_sample(b, stats.data());
      }
      // Backwards for the same reason as in the per-sample schedule.
      cpu::parallel_rows(tasks, grain_bytes, [&](int64_t begin, int64_t end) {
        std::vector<A> buf;
        for (int64_t task = end - 1; task >= begin; --task) {
          const int64_t b = b0 + task / nchunks, i0 = (task % nchunks) * kChunk;
          combine(b, i0, std::min(kChunk, N - i0), buf);
        }
      });
    }
  }
};

template <class T>
void run(Prepared& p) {
  Runner<T>(p).go();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> guidance_step_cpu(
    const at::Tensor& x, at::TensorList branches, const at::Tensor& t,
    const std::optional<at::Tensor>& t_next, const at::Tensor& weights,
    const std::optional<at::Tensor>& zero_init, const std::optional<at::Tensor>& momentum,
    const std::optional<at::Tensor>& x_prev, const std::optional<at::Tensor>& u_prev,
    at::IntArrayRef param, int64_t base, at::IntArrayRef term_pos, at::IntArrayRef term_neg,
    at::IntArrayRef stats_space, at::IntArrayRef zero_star, at::ArrayRef<double> apg_beta,
    at::ArrayRef<double> apg_r, at::ArrayRef<double> apg_eta, double rescale_phi,
    int64_t rescale_space, int64_t rescale_ref, int64_t out_param, int64_t solver, bool return_x0) {
  Prepared p = prepare(x, branches, t, t_next, weights, zero_init, momentum, x_prev, u_prev, param, base,
                       term_pos, term_neg, stats_space, zero_star, apg_beta, apg_r, apg_eta, rescale_phi,
                       rescale_space, rescale_ref, out_param, solver, return_x0);
  RAEKERN_DISPATCH_FLOATING(x.scalar_type(), "guidance_step_cpu", [&] { run<scalar_t>(p); });
  return {p.out, p.x0, p.momentum_out, p.coeffs};
}

template <class T>
void combine_rows(const std::vector<Rows>& rows, const at::Tensor& c, at::Tensor& out, int64_t B, int64_t N) {
  using A = acc_t<T>;
  const int64_t n_in = int64_t(rows.size());
  const double* cp = c.const_data_ptr<double>();
  T* o = out.data_ptr<T>();
  // Per sample, the register-blocked combination of its inputs with a non-zero coefficient (the
  // output pass's kernel, no differences): one read of each and one write, no accumulator buffer.
  // An input with a zero coefficient is not read, so a NaN in it stays out of the result.
  std::vector<blocks::CombinePlan<T>> plans(static_cast<size_t>(B));
  std::vector<int> used(static_cast<size_t>(B));
  const bool stream = B * N * int64_t(sizeof(T)) >= cpu::stream_threshold(kStreamBytes);
  for (int64_t b = 0; b < B; ++b) {
    blocks::CombinePlan<T>& pl = plans[b];
    int nu = 0;
    for (int64_t e = 0; e < n_in; ++e) nu += cp[b * n_in + e] != 0.0;
    used[b] = nu;
    if (nu == 0 || nu > blocks::kMaxFixedInputs) continue;
    nu = 0;
    for (int64_t e = 0; e < n_in; ++e) {
      const double ce = cp[b * n_in + e];
      if (ce == 0.0) continue;
      pl.in[nu] = static_cast<const T*>(rows[e].ptr) + b * rows[e].stride;
      pl.coef[0][nu++] = static_cast<A>(ce);
    }
    pl.out[0] = o + b * N;
    pl.stream = stream && reinterpret_cast<uintptr_t>(pl.out[0]) % 64 == 0;
    pl.fn = blocks::pick_combine<T>(nu, 0, 0, 1, 0);
  }
  const int64_t per = (N + kOutChunk - 1) / kOutChunk;
  cpu::parallel_rows(B * per, (n_in + 1) * std::min(kOutChunk, N) * int64_t(sizeof(T)), [&](int64_t begin, int64_t end) {
    std::vector<A> acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per, i0 = (task % per) * kOutChunk, n = std::min(kOutChunk, N - i0);
      if (plans[b].fn) {
        plans[b].fn(plans[b], i0, n);
        continue;
      }
      if (used[b] == 0) {
        std::fill(o + b * N + i0, o + b * N + i0 + n, T(0));
        continue;
      }
      // More inputs than the fixed kernels take: accumulate through a buffer.
      acc.resize(kChunk);
      for (int64_t c0 = i0; c0 < i0 + n; c0 += kChunk) {
        const int64_t m = std::min(kChunk, i0 + n - c0);
        for (int64_t i = 0; i < m; ++i) acc[i] = 0;
        for (int64_t e = 0; e < n_in; ++e) {
          const double ce = cp[b * n_in + e];
          if (ce == 0.0) continue;
          const A a = static_cast<A>(ce);
          const T* __restrict v = static_cast<const T*>(rows[e].ptr) + b * rows[e].stride + c0;
          A* __restrict ap = acc.data();
#pragma omp simd
          for (int64_t i = 0; i < m; ++i) ap[i] += a * widen(v[i]);
        }
        cpu::store_row<T>(acc.data(), m, o + b * N + c0);
      }
    }
  });
}

// Σ_e coeffs[b, e] · inputs_e[b]: the transpose of guidance_step's output pass, used by its backward.
at::Tensor guidance_combine_cpu(at::TensorList inputs, const at::Tensor& coeffs) {
  PreparedCombine c = prepare_combine(inputs, coeffs);
  RAEKERN_DISPATCH_FLOATING(c.out.scalar_type(), "guidance_combine_cpu",
                            [&] { combine_rows<scalar_t>(c.rows, c.coeffs, c.out, c.B, c.N); });
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CPU, m) {
  m.impl("guidance_step", &guidance_step_cpu);
  m.impl("guidance_combine", &guidance_combine_cpu);
}

}  // namespace raekern::guidance
