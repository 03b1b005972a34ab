// CPU kernel of raekern::guidance_step: (pass 1, only when a rule needs statistics) per-sample Gram
// matrix and sums of the rebased input streams, the shared scalar solve, then one pass writing every
// output as a per-sample linear combination of the inputs.
#include <torch/library.h>

#include <vector>

#include "common/cpu_utils.h"
#include "common/dispatch.h"
#include "guidance/guidance_step.h"

namespace raekern::guidance {
namespace {

using cpu::acc_t;
using cpu::widen;

// Elements per task: each stream's chunk (fp32) stays in L1/L2 while every output is formed.
constexpr int64_t kChunk = 1024;

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
void run(Prepared& p) {
  using A = acc_t<T>;
  const Config& cfg = p.cfg;
  const int64_t B = p.B, N = p.N;
  const int ns = cfg.num_streams(), ng = cfg.gram_size(), nout = cfg.num_outputs();
  const int first_m = 1 + cfg.K, last_m = first_m + (cfg.has_momentum ? cfg.J : 0);
  Loader<T> loader{p, cfg.K, first_m, last_m};
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  const int64_t tasks = B * nchunks;
  const int64_t row_bytes = int64_t(ns) * kChunk * int64_t(sizeof(T));

  // Pass 1: Gram matrix and sums per sample, accumulated per chunk in A and across chunks in fp64
  // (chunk partials are combined in a fixed order, so the result is deterministic).
  const int nacc = gram_entries(ng) + ng;
  std::vector<double> stats;
  if (cfg.needs_gram() && N > 0) {
    std::vector<double> partial(size_t(tasks) * nacc);
    cpu::parallel_rows(tasks, row_bytes, [&](int64_t begin, int64_t end) {
      std::vector<A> buf(size_t(ng) * kChunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nchunks, i0 = (task % nchunks) * kChunk;
        const int64_t n = std::min(kChunk, N - i0);
        for (int e = 0; e < ng; ++e) loader(e, b, i0, n, buf.data() + e * kChunk, buf.data() + kChunk);
        double* out = partial.data() + task * nacc;
        for (int e = 0; e < ng; ++e) {
          const A* __restrict u = buf.data() + e * kChunk;
          for (int f = e; f < ng; ++f)
            out[gram_index(e, f, ng)] = double(dot_chunk(u, buf.data() + f * kChunk, n));
          out[gram_entries(ng) + e] = double(sum_chunk(u, n));
        }
      }
    });
    stats.assign(size_t(B) * nacc, 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < nchunks; ++c)
        for (int a = 0; a < nacc; ++a) stats[b * nacc + a] += partial[(b * nchunks + c) * nacc + a];
  }

  // Per-sample solve.
  double* coeffs = p.coeffs.data_ptr<double>();
  const double* tt = p.t.const_data_ptr<double>();
  const double* tn = p.t_next.const_data_ptr<double>();
  const double* w = p.weights.const_data_ptr<double>();
  const uint8_t* zi = p.zero_init.const_data_ptr<uint8_t>();
  for (int64_t b = 0; b < B; ++b) {
    Sample s;
    s.t = tt[b];
    s.t_next = tn[b];
    for (int j = 0; j < cfg.J; ++j) s.w[j] = w[b * cfg.J + j];
    s.zero_init = zi[b] != 0;
    Coeffs c;
    const double* g = stats.empty() ? nullptr : stats.data() + b * nacc;
    solve(cfg, s, g, g ? g + gram_entries(ng) : nullptr, c);
    for (int o = 0; o < nout; ++o)
      for (int e = 0; e < ns; ++e) coeffs[(b * nout + o) * ns + e] = c.c[o][e];
  }
  if (N == 0) return;

  // Pass 2: every output as a combination of the streams. Streams whose coefficients are all zero
  // for a sample are not read (e.g. x for a pure velocity combination), which also keeps a NaN in an
  // unused input from reaching the output, as in the reference formulas.
  T* out = p.out.data_ptr<T>();
  T* x0 = p.return_x0 ? p.x0.data_ptr<T>() : nullptr;
  A* mom = cfg.has_momentum ? p.momentum_out.data_ptr<A>() : nullptr;
  cpu::parallel_rows(tasks, row_bytes, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(size_t(ns + 1) * kChunk);
    A* acc = buf.data() + size_t(ns) * kChunk;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunks, i0 = (task % nchunks) * kChunk;
      const int64_t n = std::min(kChunk, N - i0);
      const double* cb = coeffs + b * nout * ns;
      bool used[kMaxStreams] = {};
      for (int o = 0; o < nout; ++o) {
        if (o == 1 && !x0) continue;
        for (int e = 0; e < ns; ++e) used[e] = used[e] || cb[o * ns + e] != 0.0;
      }
      // Difference streams need the base branch in buffer 1.
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
  });
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
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  cpu::parallel_rows(B * nchunks, n_in * kChunk * int64_t(sizeof(T)), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunks, i0 = (task % nchunks) * kChunk;
      const int64_t n = std::min(kChunk, N - i0);
      for (int64_t i = 0; i < n; ++i) acc[i] = 0;
      for (int64_t e = 0; e < n_in; ++e) {
        const double ce = cp[b * n_in + e];
        if (ce == 0.0) continue;
        const A a = static_cast<A>(ce);
        const T* __restrict v = static_cast<const T*>(rows[e].ptr) + b * rows[e].stride + i0;
        A* __restrict ap = acc.data();
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ap[i] += a * widen(v[i]);
      }
      cpu::store_row<T>(acc.data(), n, o + b * N + i0);
    }
  });
}

// Σ_e coeffs[b, e] · inputs_e[b]: the transpose of guidance_step's output pass, used by its backward.
at::Tensor guidance_combine_cpu(at::TensorList inputs, const at::Tensor& coeffs) {
  constexpr const char* op = "guidance_combine";
  RAEKERN_CHECK(!inputs.empty(), op, "inputs", "must not be empty");
  const at::Tensor& ref = inputs[0];
  check_floating(ref, op, "inputs");
  const int64_t B = ref.dim() > 0 ? ref.size(0) : 1;
  const int64_t n_in = int64_t(inputs.size());
  RAEKERN_CHECK(coeffs.dim() == 2 && coeffs.size(0) == B && coeffs.size(1) == n_in, op, "coeffs",
                "must have shape [B, len(inputs)] = [", B, ", ", n_in, "], got ", coeffs.sizes());
  std::vector<Rows> rows;
  for (const auto& in : inputs) {
    RAEKERN_CHECK(in.sizes() == ref.sizes(), op, "inputs", "must all have shape ", ref.sizes(), ", got ",
                  in.sizes());
    check_same_dtype(in, ref, op, "inputs");
    rows.push_back(rows_of(in));
  }
  at::Tensor c = coeffs.to(at::kDouble).contiguous();
  at::Tensor out = at::empty(ref.sizes(), ref.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t N = B > 0 ? ref.numel() / B : 0;
  RAEKERN_DISPATCH_FLOATING(ref.scalar_type(), "guidance_combine_cpu",
                            [&] { combine_rows<scalar_t>(rows, c, out, B, N); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CPU, m) {
  m.impl("guidance_step", &guidance_step_cpu);
  m.impl("guidance_combine", &guidance_combine_cpu);
}

}  // namespace raekern::guidance
