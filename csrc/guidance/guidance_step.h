// Host-side argument handling of raekern::guidance_step, shared by the CPU kernel and the CUDA
// launcher: validation, the per-call Config of the scalar solve, and the input streams as row views.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "guidance/guidance_solve.h"
#include "common/output_alloc.h"

namespace raekern::guidance {

constexpr const char* kOp = "guidance_step";

// One input stream viewed as B rows of N contiguous elements; row stride may be 0 (expanded input).
struct Rows {
  at::Tensor keep;
  const void* ptr = nullptr;
  int64_t stride = 0;
};

// True when every dimension after the first is laid out contiguously (any stride for dim 0).
inline bool inner_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) == 1) continue;
    if (t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

inline Rows rows_of(at::Tensor t, int64_t row_offset = 0) {
  if (!inner_contiguous(t)) t = t.contiguous();
  Rows r;
  r.stride = t.dim() > 0 ? t.stride(0) : 0;
  r.ptr = static_cast<const char*>(t.const_data_ptr()) + row_offset * r.stride * int64_t(t.element_size());
  r.keep = t;
  return r;
}

// t, t_next or the weights as the scalar tables read them: float64 and float32 tensors as they are
// (no cast, no copy), any other dtype converted to float64.
inline at::Tensor scalar_table_tensor(const at::Tensor& v) {
  const at::ScalarType st = v.scalar_type();
  return st == at::kDouble || st == at::kFloat ? v : v.to(at::kDouble);
}

// A [B] or one-element tensor (see scalar_table_tensor) as a per-sample table.
inline ScalarTable per_sample_table(const at::Tensor& v) {
  return ScalarTable{v.const_data_ptr(), v.numel() == 1 ? 0 : v.stride(0), 0, v.scalar_type() == at::kDouble};
}

struct Prepared {
  Config cfg;
  int64_t B = 0, N = 0;
  std::vector<Rows> streams;  // rebased layout (see guidance_solve.h)
  at::Tensor t, t_next, weights;  // float64 or float32, read in place (the tables below address them)
  ScalarTable t_tab, t_next_tab, w_tab;
  at::Tensor zero_init;  // bool or uint8 [B], or undefined
  at::Tensor out, x0, momentum_out, coeffs;
  bool return_x0 = false;
};

inline int check_space(int64_t s, const char* arg) {
  RAEKERN_CHECK(s >= 0 && s <= 2, kOp, arg, "must be 0 (velocity), 1 (x0) or 2 (eps), got ", s);
  return int(s);
}

inline Prepared prepare(const at::Tensor& x, at::TensorList branches, const at::Tensor& t,
                        const std::optional<at::Tensor>& t_next, const at::Tensor& weights,
                        const std::optional<at::Tensor>& zero_init,
                        const std::optional<at::Tensor>& momentum,
                        const std::optional<at::Tensor>& x_prev,
                        const std::optional<at::Tensor>& u_prev, at::IntArrayRef param, int64_t base,
                        at::IntArrayRef term_pos, at::IntArrayRef term_neg,
                        at::IntArrayRef stats_space, at::IntArrayRef zero_star,
                        at::ArrayRef<double> apg_beta, at::ArrayRef<double> apg_r,
                        at::ArrayRef<double> apg_eta, double rescale_phi, int64_t rescale_space,
                        int64_t rescale_ref, int64_t out_param, int64_t solver, bool return_x0) {
  Prepared p;
  Config& c = p.cfg;
  check_floating(x, kOp, "x");
  check_min_dim(x, 1, kOp, "x");
  const int64_t B = x.size(0);
  const int64_t N = B > 0 ? x.numel() / B : 0;
  p.B = B;
  p.N = N;
  const int64_t K = int64_t(param.size());
  RAEKERN_CHECK(K >= 1 && K <= kMaxBranches, kOp, "param", "must name 1..", kMaxBranches,
                " branch parameterizations, got ", K);
  const int64_t J = int64_t(term_pos.size());
  RAEKERN_CHECK(J <= kMaxTerms, kOp, "terms", "must hold at most ", kMaxTerms, " terms, got ", J);
  RAEKERN_CHECK(int64_t(term_neg.size()) == J && int64_t(stats_space.size()) == J &&
                    int64_t(zero_star.size()) == J && int64_t(apg_beta.size()) == J &&
                    int64_t(apg_r.size()) == J && int64_t(apg_eta.size()) == J,
                kOp, "terms", "per-term option lists must all have ", J, " entries");
  c.K = int(K);
  c.J = int(J);
  RAEKERN_CHECK(base >= 0 && base < K, kOp, "base", "must be a branch index in [0, ", K, "), got ", base);
  c.base = int(base);
  bool uniform = true;
  for (int64_t k = 0; k < K; ++k) {
    c.param[k] = check_space(param[k], "param");
    uniform = uniform && param[k] == param[0];
  }
  c.work = uniform ? c.param[0] : kVelocity;
  for (int64_t j = 0; j < J; ++j) {
    RAEKERN_CHECK(term_pos[j] >= 0 && term_pos[j] < K, kOp, "terms", "positive branch of term ", j,
                  " must be in [0, ", K, "), got ", term_pos[j]);
    RAEKERN_CHECK(term_neg[j] >= 0 && term_neg[j] < K, kOp, "terms", "negative branch of term ", j,
                  " must be in [0, ", K, "), got ", term_neg[j]);
    c.pos[j] = int(term_pos[j]);
    c.neg[j] = int(term_neg[j]);
    c.stats_space[j] = check_space(stats_space[j], "stats_space");
    RAEKERN_CHECK(zero_star[j] >= -1 && zero_star[j] <= 2, kOp, "zero_star",
                  "must be -1 (off) or a space 0..2, got ", zero_star[j]);
    c.zero_star[j] = int(zero_star[j]);
    c.beta[j] = apg_beta[j];
    c.r[j] = apg_r[j];
    c.project[j] = !std::isnan(apg_eta[j]);
    c.eta[j] = c.project[j] ? apg_eta[j] : 0.0;
  }
  c.phi = rescale_phi;
  c.rescale_space = check_space(rescale_space, "rescale_space");
  RAEKERN_CHECK(rescale_ref >= 0 && rescale_ref < K, kOp, "rescale_ref", "must be a branch index in [0, ",
                K, "), got ", rescale_ref);
  c.rescale_ref = int(rescale_ref);
  c.out_param = check_space(out_param, "out_param");
  RAEKERN_CHECK(solver >= 0 && solver <= 2, kOp, "solver", "must be 0 (none), 1 (euler) or 2 (heun2), got ",
                solver);
  c.solver = int(solver);
  c.numel = N;
  c.has_momentum = momentum.has_value() && J > 0;

  // Branches: K tensors [B, *S], or one [K*B, *S] as a batched network call returns it.
  std::vector<Rows> br(K);
  if (int64_t(branches.size()) == 1 && K > 1) {
    const at::Tensor& s = branches[0];
    RAEKERN_CHECK(s.dim() == x.dim() && s.size(0) == K * B && s.numel() == K * B * N, kOp, "branches",
                  "as one tensor must have shape [K*B, *S] = [", K * B, ", ...] matching x ", x.sizes(),
                  ", got ", s.sizes());
    check_same_dtype(s, x, kOp, "branches");
    check_same_device(s, x, kOp, "branches");
    Rows whole = rows_of(s);
    for (int64_t k = 0; k < K; ++k) {
      br[k] = whole;
      br[k].ptr = static_cast<const char*>(whole.ptr) + k * B * whole.stride * int64_t(s.element_size());
    }
  } else {
    RAEKERN_CHECK(int64_t(branches.size()) == K, kOp, "branches", "must hold ", K,
                  " tensors (one per entry of 'param'), got ", branches.size());
    for (int64_t k = 0; k < K; ++k) {
      RAEKERN_CHECK(branches[k].sizes() == x.sizes(), kOp, "branches", "[", k, "] must have the shape of x ",
                    x.sizes(), ", got ", branches[k].sizes());
      check_same_dtype(branches[k], x, kOp, "branches");
      check_same_device(branches[k], x, kOp, "branches");
      br[k] = rows_of(branches[k]);
    }
  }
  p.streams.push_back(rows_of(x));
  p.streams.push_back(br[c.base]);
  for (int64_t k = 0; k < K; ++k)
    if (k != c.base) p.streams.push_back(br[k]);

  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (c.has_momentum) {
    const at::Tensor& m = *momentum;
    RAEKERN_CHECK(m.dim() == x.dim() + 1 && m.size(0) == J && m.numel() == J * B * N &&
                      m.sizes().slice(1) == x.sizes(),
                  kOp, "momentum", "must have shape [J, *x.shape] = [", J, ", ", x.sizes(), "], got ",
                  m.sizes());
    RAEKERN_CHECK(m.scalar_type() == acc_dtype, kOp, "momentum", "must be ", acc_dtype, " for x of dtype ",
                  x.scalar_type(), ", got ", m.scalar_type());
    check_same_device(m, x, kOp, "momentum");
    for (int64_t j = 0; j < J; ++j) p.streams.push_back(rows_of(m.select(0, j)));
  }
  if (c.solver == kHeun2) {
    RAEKERN_CHECK(x_prev.has_value(), kOp, "x_prev", "is required by solver 'heun2'");
    RAEKERN_CHECK(u_prev.has_value(), kOp, "u_prev", "is required by solver 'heun2'");
    RAEKERN_CHECK(x_prev->sizes() == x.sizes(), kOp, "x_prev", "must have the shape of x ", x.sizes(),
                  ", got ", x_prev->sizes());
    RAEKERN_CHECK(u_prev->sizes() == x.sizes(), kOp, "u_prev", "must have the shape of x ", x.sizes(),
                  ", got ", u_prev->sizes());
    check_same_dtype(*x_prev, x, kOp, "x_prev");
    check_same_dtype(*u_prev, x, kOp, "u_prev");
    check_same_device(*x_prev, x, kOp, "x_prev");
    check_same_device(*u_prev, x, kOp, "u_prev");
    p.streams.push_back(rows_of(*x_prev));
    p.streams.push_back(rows_of(*u_prev));
  }

  // Per-sample scalars, read in place when float64 or float32 (any strides, a scalar for every sample).
  RAEKERN_CHECK(t.numel() == 1 || (t.dim() == 1 && t.size(0) == B), kOp, "t", "must be a scalar or have shape [",
                B, "], got ", t.sizes());
  p.t = scalar_table_tensor(t);
  p.t_tab = per_sample_table(p.t);
  if (c.solver != kNone) {
    RAEKERN_CHECK(t_next.has_value(), kOp, "t_next", "is required by solver ",
                  c.solver == kEuler ? "'euler'" : "'heun2' (it holds t_prev)");
    RAEKERN_CHECK(t_next->numel() == 1 || (t_next->dim() == 1 && t_next->size(0) == B), kOp, "t_next",
                  "must be a scalar or have shape [", B, "], got ", t_next->sizes());
    p.t_next = scalar_table_tensor(*t_next);
    p.t_next_tab = per_sample_table(p.t_next);
  } else {
    p.t_next = p.t;
    p.t_next_tab = p.t_tab;
  }
  RAEKERN_CHECK(weights.dim() == 2 && weights.size(0) == B && weights.size(1) == J, kOp, "weights",
                "must have shape [B, J] = [", B, ", ", J, "], got ", weights.sizes());
  p.weights = scalar_table_tensor(weights);
  p.w_tab = ScalarTable{p.weights.const_data_ptr(), p.weights.stride(0), p.weights.stride(1),
                        p.weights.scalar_type() == at::kDouble};
  if (zero_init.has_value()) {
    RAEKERN_CHECK(zero_init->numel() == B, kOp, "zero_init", "must have ", B, " elements, got ",
                  zero_init->numel());
    // A bool mask is read as its bytes (0/1): no conversion kernel.
    const at::Tensor z = zero_init->scalar_type() == at::kBool ? *zero_init
                                                               : zero_init->to(x.options().dtype(at::kByte));
    p.zero_init = z.reshape({B}).contiguous();
  }  // else undefined: no sample starts at zero (no fill kernel for the common case)

  p.return_x0 = return_x0;
  p.out = ::raekern::empty_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  p.x0 = return_x0 ? ::raekern::empty_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                   : ::raekern::empty_output({0}, x.options());
  if (c.has_momentum) {
    std::vector<int64_t> ms{J};
    for (auto s : x.sizes()) ms.push_back(s);
    p.momentum_out = ::raekern::empty_output(ms, x.options().dtype(acc_dtype));
  } else {
    p.momentum_out = ::raekern::empty_output({0}, x.options().dtype(acc_dtype));
  }
  p.coeffs = ::raekern::empty_output({B, c.num_outputs(), c.num_streams()}, x.options().dtype(at::kDouble));
  return p;
}

// guidance_combine (the backward's Σ_e coeffs[b, e]·inputs_e[b]) as the CPU kernel, the CUDA
// launcher and the emulation all see it: the inputs as row views, the coefficients in fp64 on the
// inputs' device, and a fresh contiguous output. max_inputs: the CUDA kernel's parameter slots.
struct PreparedCombine {
  std::vector<Rows> rows;
  at::Tensor coeffs, out;
  int64_t B = 0, N = 0;
};

inline PreparedCombine prepare_combine(at::TensorList inputs, const at::Tensor& coeffs,
                                       int64_t max_inputs = INT64_MAX, bool cuda = false) {
  constexpr const char* op = "guidance_combine";
  RAEKERN_CHECK(!inputs.empty(), op, "inputs", "must not be empty");
  RAEKERN_CHECK(int64_t(inputs.size()) <= max_inputs, op, "inputs", "must hold at most ", max_inputs,
                " tensors on this device, got ", inputs.size());
  const at::Tensor& ref = inputs[0];
  check_floating(ref, op, "inputs");
  RAEKERN_CHECK(!cuda || ref.scalar_type() != at::kDouble, op, "inputs", "float64 is not supported on CUDA");
  PreparedCombine p;
  p.B = ref.dim() > 0 ? ref.size(0) : 1;
  const int64_t n_in = int64_t(inputs.size());
  RAEKERN_CHECK(coeffs.dim() == 2 && coeffs.size(0) == p.B && coeffs.size(1) == n_in, op, "coeffs",
                "must have shape [B, len(inputs)] = [", p.B, ", ", n_in, "], got ", coeffs.sizes());
  for (const auto& in : inputs) {
    RAEKERN_CHECK(in.sizes() == ref.sizes(), op, "inputs", "must all have shape ", ref.sizes(), ", got ",
                  in.sizes());
    check_same_dtype(in, ref, op, "inputs");
    check_same_device(in, ref, op, "inputs");
    p.rows.push_back(rows_of(in));
  }
  p.coeffs = coeffs.to(ref.device(), at::kDouble).contiguous();
  p.out = ::raekern::empty_output(ref.sizes(), ref.options().memory_format(at::MemoryFormat::Contiguous));
  p.N = p.B > 0 ? ref.numel() / p.B : 0;
  return p;
}

}  // namespace raekern::guidance
