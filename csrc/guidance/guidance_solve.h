// Per-sample scalar solve of the fused guidance step (DESIGN §3.4, reference/guidance.md §7).
//
// Every guidance rule the op supports is, once a handful of per-sample scalars are known, a linear
// combination of the input tensors. This header turns (t, weights, options, Gram matrix) into the
// coefficients of that combination. It is plain C++ usable from host code and from CUDA device code
// (the CUDA path runs it in a one-thread-per-sample kernel), so CPU and GPU share one definition.
//
// Conventions (rectified flow): x_t = (1 - t)·x0 + t·eps, t = 1 is noise, velocity u = eps - x0.
// A value in space S is A_S·x + B_S·u with (A, B) = velocity (0, 1), x0 (1, -t), eps (1, 1 - t).
//
// Stream layout ("rebased basis", shared by the Gram pass, the output pass and this solve):
//   0          x
//   1          P_base                          (the base branch)
//   2 .. K     P_k - P_base for k != base      (in increasing k)  -- differences formed before any
//                                                 product, so ||C - U|| keeps its precision when C ~ U
//   K+1 ..     M_j, j < J, if a momentum buffer is given
//   then       x_prev, u_prev (Heun's second stage only; never part of the Gram matrix)
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(RAEKERN_HOST_EMULATION)
#define RAEKERN_HD __host__ __device__
#else
#define RAEKERN_HD
#endif

namespace raekern::guidance {

enum Space : int { kVelocity = 0, kX0 = 1, kEps = 2 };
enum Solver : int { kNone = 0, kEuler = 1, kHeun2 = 2 };

constexpr int kMaxBranches = 8;
constexpr int kMaxTerms = 8;
constexpr int kMaxStreams = 1 + kMaxBranches + kMaxTerms + 2;  // x, P, M, x_prev, u_prev
constexpr int kMaxOutputs = 2 + kMaxTerms;                      // out, x0, M_new
constexpr double kZeroStarEps = 1e-8;  // CFG-Zero*: <C,U> / (||U||^2 + 1e-8)
constexpr double kProjEps = 1e-12;     // APG projection: F.normalize's eps

// Everything about one call that is the same for every sample.
struct Config {
  int K = 0, J = 0, base = 0, work = kVelocity;
  int param[kMaxBranches] = {};
  int pos[kMaxTerms] = {}, neg[kMaxTerms] = {};
  int stats_space[kMaxTerms] = {};
  int zero_star[kMaxTerms] = {};  // -1: off; otherwise the space in which s*·Y_neg is formed
  double beta[kMaxTerms] = {};    // APG momentum (used only when has_momentum)
  double r[kMaxTerms] = {};       // APG norm threshold, <= 0: off
  double eta[kMaxTerms] = {};     // APG parallel-component weight
  int project[kMaxTerms] = {};    // APG projection on/off
  int has_momentum = 0;
  double phi = 0.0;  // guidance rescale, 0: off
  int rescale_space = kX0, rescale_ref = 0;
  int out_param = kVelocity, solver = kNone;
  int64_t numel = 1;  // elements per sample (the reduction group)

  RAEKERN_HD int gram_size() const { return 1 + K + (has_momentum ? J : 0); }
  RAEKERN_HD int num_streams() const { return gram_size() + (solver == kHeun2 ? 2 : 0); }
  RAEKERN_HD int num_outputs() const { return 2 + (has_momentum ? J : 0); }
  RAEKERN_HD bool needs_gram() const {
    if (phi != 0.0) return true;
    for (int j = 0; j < J; ++j)
      if (zero_star[j] >= 0 || r[j] > 0.0 || project[j]) return true;
    return false;
  }
  // True when a statistic may involve x. With velocity branches and every statistic taken in velocity
  // space (stats spaces, CFG-Zero*'s scaling space, rescale space), every vector the solve measures
  // is a combination of branches and momentum only, and x's Gram entries get zero weight: the
  // statistics pass need not read x. Every branch must be velocity, not just the work space: mixed
  // parameterisations also work in velocity, and an x0 or ε branch converted to velocity carries x.
  RAEKERN_HD bool stats_read_x() const {
    if (work != kVelocity) return true;
    for (int k = 0; k < K; ++k)
      if (param[k] != kVelocity) return true;
    for (int j = 0; j < J; ++j)
      if (stats_space[j] != kVelocity || (zero_star[j] >= 0 && zero_star[j] != kVelocity)) return true;
    return phi != 0.0 && rescale_space != kVelocity;
  }
};

// Index of the (e, f), e <= f, entry of a packed upper-triangular n x n Gram matrix.
RAEKERN_HD inline int gram_index(int e, int f, int n) {
  if (e > f) {
    int s = e;
    e = f;
    f = s;
  }
  return e * n - e * (e - 1) / 2 + (f - e);
}
RAEKERN_HD inline int gram_entries(int n) { return n * (n + 1) / 2; }

// A linear combination of the raw inputs [x, P_0..P_{K-1}, M_0..M_{J-1}, x_prev, u_prev], with room
// for N of them (raw_size(cfg) <= N). N is a template parameter so the CUDA solve, one thread per
// sample in order, runs its vector operations over the call's handful of streams rather than all
// kMaxStreams = 19 (each is a serial fp64 loop in local memory there; the CPU vectorises them).
template <int N> struct LinN {
  double c[N];
  RAEKERN_HD LinN() {
    for (int i = 0; i < N; ++i) c[i] = 0.0;
  }
  RAEKERN_HD LinN& axpy(double a, const LinN& o) {
    for (int i = 0; i < N; ++i) c[i] += a * o.c[i];
    return *this;
  }
  RAEKERN_HD LinN& scale(double a) {
    for (int i = 0; i < N; ++i) c[i] *= a;
    return *this;
  }
};
using Lin = LinN<kMaxStreams>;

struct SpaceAB {
  double A, B;
};
RAEKERN_HD inline SpaceAB space_ab(int s, double t) {
  if (s == kX0) return {1.0, -t};
  if (s == kEps) return {1.0, 1.0 - t};
  return {0.0, 1.0};
}

// B_to / B_from: how a displacement (the A·x parts cancel) changes space. Exactly 1 within one space,
// so a space whose B vanishes at this t (x0 at t = 0, eps at t = 1) never forms 0/0 against itself.
RAEKERN_HD inline double b_ratio(int to, int from, double t) {
  return to == from ? 1.0 : space_ab(to, t).B / space_ab(from, t).B;
}

// Raw-layout stream indices.
RAEKERN_HD inline int raw_x() { return 0; }
RAEKERN_HD inline int raw_p(int k) { return 1 + k; }
RAEKERN_HD inline int raw_m(const Config& c, int j) { return 1 + c.K + j; }
RAEKERN_HD inline int raw_xprev(const Config& c) { return 1 + c.K + c.J; }
RAEKERN_HD inline int raw_uprev(const Config& c) { return 2 + c.K + c.J; }

// Re-express a value given in space `from` in space `to`: Y_to = a·x + b·Y_from (exact identity when
// the spaces agree, so x0 branches with an x0 output never divide by t).
template <int N>
RAEKERN_HD inline LinN<N> convert(const LinN<N>& y, int from, int to, double t) {
  if (from == to) return y;
  SpaceAB f = space_ab(from, t), g = space_ab(to, t);
  double b = g.B / f.B;
  LinN<N> r = y;
  r.scale(b);
  r.c[raw_x()] += g.A - b * f.A;
  return r;
}

// Raw -> rebased layout (see the header comment). Returns the number of rebased streams written.
template <int N>
RAEKERN_HD inline void to_rebased(const Config& cfg, const LinN<N>& y, double* out) {
  int n = cfg.num_streams();
  for (int i = 0; i < n; ++i) out[i] = 0.0;
  out[0] = y.c[raw_x()];
  double sum_p = 0.0;
  int d = 2;
  for (int k = 0; k < cfg.K; ++k) {
    sum_p += y.c[raw_p(k)];
    if (k != cfg.base) out[d++] = y.c[raw_p(k)];
  }
  out[1] = sum_p;
  int m = 1 + cfg.K;
  if (cfg.has_momentum)
    for (int j = 0; j < cfg.J; ++j) out[m++] = y.c[raw_m(cfg, j)];
  if (cfg.solver == kHeun2) {
    out[m++] = y.c[raw_xprev(cfg)];
    out[m++] = y.c[raw_uprev(cfg)];
  }
}

// <a, b> over one sample from the Gram matrix of the rebased basis.
template <int N>
RAEKERN_HD inline double dot(const Config& cfg, const double* gram, const LinN<N>& a, const LinN<N>& b) {
  double ra[N], rb[N];
  to_rebased(cfg, a, ra);
  to_rebased(cfg, b, rb);
  const int n = cfg.gram_size();
  double s = 0.0;
  for (int e = 0; e < n; ++e) {
    if (ra[e] == 0.0) continue;
    for (int f = 0; f < n; ++f)
      if (rb[f] != 0.0) s += ra[e] * rb[f] * gram[gram_index(e, f, n)];
  }
  return s;
}

template <int N>
RAEKERN_HD inline double total(const Config& cfg, const double* sums, const LinN<N>& a) {
  double ra[N];
  to_rebased(cfg, a, ra);
  double s = 0.0;
  for (int e = 0; e < cfg.gram_size(); ++e) s += ra[e] * sums[e];
  return s;
}

// Unbiased standard deviation (torch.std's default) of a combination over one sample.
template <int N>
RAEKERN_HD inline double stddev(const Config& cfg, const double* gram, const double* sums, const LinN<N>& a) {
  const double n = double(cfg.numel);
  const double s = total(cfg, sums, a);
  double var = (dot(cfg, gram, a, a) - s * s / n) / (n > 1.0 ? n - 1.0 : 1.0);
  return var > 0.0 ? sqrt(var) : 0.0;
}

// Per-sample scalars (t, t_next, the [B, J] weights) read where the caller put them, in float64 or
// float32: element (b, j) at ptr + b·sb + j·sj (sb = 0: one value for every sample). On a GPU each
// cast or copy of a [B] tensor would be one more kernel of a step that moves a few dozen MB.
struct ScalarTable {
  const void* ptr = nullptr;
  int64_t sb = 0, sj = 0;
  bool f64 = true;
  RAEKERN_HD double at(int64_t b, int64_t j = 0) const {
    const int64_t k = b * sb + j * sj;
    return f64 ? static_cast<const double*>(ptr)[k] : double(static_cast<const float*>(ptr)[k]);
  }
  // Bytes from ptr that rows [0, B) × columns [0, J) address (the emulation's buffer span).
  int64_t span_bytes(int64_t B, int64_t J = 1) const {
    if (B <= 0 || J <= 0) return 0;
    return ((B - 1) * sb + (J - 1) * sj + 1) * (f64 ? 8 : 4);
  }
};

// Per-sample inputs of the solve.
struct Sample {
  double t = 1.0, t_next = 0.0;
  double w[kMaxTerms] = {};  // weight · mask
  bool zero_init = false;
};

// Coefficients (rebased layout, num_streams() <= N of them) of every output stream: out, x0, then
// M_new_j.
template <int N> struct CoeffsN {
  double c[kMaxOutputs][N];
};
using Coeffs = CoeffsN<kMaxStreams>;

// Raw streams of a call (the LinN size it needs): x, K branches, J momentum slots, x_prev, u_prev.
RAEKERN_HD inline int raw_size(const Config& cfg) { return 3 + cfg.K + cfg.J; }

// The solve, with room for N raw streams (raw_size(cfg) <= N). `gram`/`sums` may be null when
// !cfg.needs_gram().
template <int N>
RAEKERN_HD inline void solve_n(const Config& cfg, const Sample& s, const double* gram, const double* sums,
                               CoeffsN<N>& out) {
  using Lin = LinN<N>;
  const double t = s.t;
  // Each branch as a value in the work space.
  Lin Y[kMaxBranches];
  for (int k = 0; k < cfg.K; ++k) {
    Lin p;
    p.c[raw_p(k)] = 1.0;
    Y[k] = convert(p, cfg.param[k], cfg.work, t);
  }
  Lin G = Y[cfg.base];
  Lin Mnew[kMaxTerms];

  for (int j = 0; j < cfg.J; ++j) {
    // An affine term (no statistic, no momentum) is the same in every space: it is formed in the work
    // space directly, so no conversion through a stats space that is singular at this t (x0 at t = 0,
    // eps at t = 1) can turn it into 0·inf.
    const bool affine = cfg.zero_star[j] < 0 && !(cfg.r[j] > 0.0) && !cfg.project[j] && !cfg.has_momentum;
    if (affine) {
      if (s.w[j] != 0.0) {
        G.axpy(s.w[j], Y[cfg.pos[j]]);
        G.axpy(-s.w[j], Y[cfg.neg[j]]);
      }
      continue;
    }
    const int Z = cfg.stats_space[j];
    Lin yp = convert(Y[cfg.pos[j]], cfg.work, Z, t);
    Lin yn = convert(Y[cfg.neg[j]], cfg.work, Z, t);
    Lin d = yp;
    if (cfg.zero_star[j] >= 0) {
      // s* = <Y_pos, Y_neg> / (||Y_neg||^2 + 1e-8), in the stats space; the scaled negative branch
      // is formed in zero_star[j]'s space and the difference carried back as a displacement.
      double sstar = dot(cfg, gram, yp, yn) / (dot(cfg, gram, yn, yn) + kZeroStarEps);
      const int Q = cfg.zero_star[j];
      Lin dq = convert(Y[cfg.pos[j]], cfg.work, Q, t);
      dq.axpy(-sstar, convert(Y[cfg.neg[j]], cfg.work, Q, t));
      d = dq.scale(b_ratio(Z, Q, t));
    } else {
      d.axpy(-1.0, yn);
    }
    if (cfg.has_momentum) {
      d.c[raw_m(cfg, j)] += cfg.beta[j];
      Mnew[j] = d;
    }
    if (cfg.r[j] > 0.0) {
      double nrm = sqrt(fmax(dot(cfg, gram, d, d), 0.0));
      double rho = nrm > cfg.r[j] ? cfg.r[j] / nrm : 1.0;
      d.scale(rho);
    }
    if (cfg.project[j]) {
      double aa = fmax(sqrt(fmax(dot(cfg, gram, yp, yp), 0.0)), kProjEps);
      double pi = dot(cfg, gram, d, yp) / (aa * aa);
      d.axpy(-(1.0 - cfg.eta[j]) * pi, yp);
    }
    if (s.w[j] != 0.0) G.axpy(s.w[j] * b_ratio(cfg.work, Z, t), d);
  }

  if (cfg.phi != 0.0) {
    const int R = cfg.rescale_space;
    Lin gr = convert(G, cfg.work, R, t);
    Lin ref = convert(Y[cfg.rescale_ref], cfg.work, R, t);
    double sg = stddev(cfg, gram, sums, gr), sr = stddev(cfg, gram, sums, ref);
    // One-element samples have no spread: left unscaled.
    double f = (sg > 0.0 && cfg.numel > 1) ? cfg.phi * sr / sg + (1.0 - cfg.phi) : 1.0;
    G = convert(gr.scale(f), R, cfg.work, t);
  }

  if (s.zero_init) {  // zero velocity, expressed in the work space
    G = Lin();
    G.c[raw_x()] = space_ab(cfg.work, t).A;
  }

  Lin o;
  if (cfg.solver == kNone) {
    o = convert(G, cfg.work, cfg.out_param, t);
  } else {
    Lin u = convert(G, cfg.work, kVelocity, t);
    if (cfg.solver == kEuler) {
      o = u.scale(s.t_next - t);
      o.c[raw_x()] += 1.0;
    } else {  // Heun stage 2: x_prev + (t - t_prev)·(u_prev + u)/2, t_prev passed as t_next
      const double h = 0.5 * (t - s.t_next);
      o = u.scale(h);
      o.c[raw_xprev(cfg)] += 1.0;
      o.c[raw_uprev(cfg)] += h;
    }
  }
  to_rebased(cfg, o, out.c[0]);
  to_rebased(cfg, convert(G, cfg.work, kX0, t), out.c[1]);
  if (cfg.has_momentum)
    for (int j = 0; j < cfg.J; ++j) to_rebased(cfg, Mnew[j], out.c[2 + j]);
}

// The solve for any configuration (room for every stream).
RAEKERN_HD inline void solve(const Config& cfg, const Sample& s, const double* gram, const double* sums,
                             Coeffs& out) {
  solve_n<kMaxStreams>(cfg, s, gram, sums, out);
}

}  // namespace raekern::guidance
