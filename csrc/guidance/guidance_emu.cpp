// The guidance family's CUDA kernels (guidance_step_kernel.cuh, gfcg_select_kernel.cuh) run on the
// host emulation, for python_tests/test_guidance.py. torch.ops.raekern_emu.{guidance_step,
// guidance_combine, gfcg_select} have the schemas of the raekern ops; each takes the family's host
// argument handling (guidance_step.h's prepare, the CUDA launchers' checks), maps every pointer into
// a guarded "device" buffer and launches the kernels with the plan of guidance_launch.h, as
// guidance_step.cu / gfcg_select.cu do on a GPU.
#if defined(RAEKERN_HOST_EMULATION) && __has_include("common/emulation_torch.h")
#include <torch/library.h>

#include "common/emulation_torch.h"
#include "guidance/guidance_launch.h"
// clang-format off
#include "guidance/gfcg_select_host.h"
#include "guidance/gfcg_select_launch.h"
// clang-format on
#include "guidance/guidance_schema.h"

namespace raekern::guidance {
namespace {

using emu::DeviceMemory;
using emu::emu_t;

template <class T>
void launch_step(Prepared& pr) {
  using DT = emu_t<T>;
  cuda::Params p;
  const cuda::StepLaunch L = cuda::plan_step<DT>(pr, p);
  DeviceMemory mem;
  const int64_t B = pr.B, N = pr.N;
  for (int e = 0; e < p.ns; ++e) {
    const bool is_m = e >= p.first_m && e < p.last_m;
    const size_t es = is_m ? sizeof(float) : sizeof(DT);
    // The span this row view addresses: B rows of N elements at the row stride (0: one row).
    const size_t span = N > 0 ? size_t((B - 1) * p.stride[e] + N) * es : 0;
    p.ptr[e] = mem.in_bytes(p.ptr[e], span, "streams");
  }
  p.t.ptr = mem.in_bytes(p.t.ptr, size_t(p.t.span_bytes(B)), "t");
  p.t_next.ptr = mem.in_bytes(p.t_next.ptr, size_t(p.t_next.span_bytes(B)), "t_next");
  if (pr.cfg.J > 0) p.w.ptr = mem.in_bytes(p.w.ptr, size_t(p.w.span_bytes(B, pr.cfg.J)), "weights");
  if (p.zero_init) p.zero_init = static_cast<const unsigned char*>(mem.in_bytes(p.zero_init, size_t(B), "zero_init"));
  p.coeffs = static_cast<double*>(mem.out_bytes(p.coeffs, size_t(B * p.nout * p.ns) * sizeof(double), "coeffs"));
  if (N > 0) {
    p.out = mem.out_bytes(p.out, size_t(B * N) * sizeof(DT), "out");
    if (p.x0) p.x0 = mem.out_bytes(p.x0, size_t(B * N) * sizeof(DT), "x0");
    if (p.mom_out)
      p.mom_out = static_cast<float*>(
          mem.out_bytes(p.mom_out, size_t(pr.cfg.J * B * N) * sizeof(float), "momentum_out"));
  }
  at::Tensor stats;
  if (L.gram) {
    stats = at::empty({B * p.chunks, L.stats_entries}, pr.out.options().dtype(at::kDouble));
    p.stats = static_cast<double*>(
        mem.out_bytes(stats.data_ptr<double>(), size_t(stats.numel()) * sizeof(double), "stats"));
    cuda::with_gram_kernel<DT>(L.ng, [&](auto kernel) {
      emu::emulate_launch(kernel, dim3(unsigned(L.blocks)), dim3(cuda::kThreads), L.gram_smem, p);
    });
  }
  cuda::with_solve_kernel(pr.cfg, [&](auto kernel) {
    emu::emulate_launch(kernel, dim3(unsigned(L.solve_blocks)), dim3(unsigned(L.solve_threads)), 0, p);
  });
  if (L.combine)
    cuda::with_combine_kernel<DT>(L.combine_ns, [&](auto kernel) {
      emu::emulate_launch(kernel, dim3(unsigned(L.blocks)), dim3(cuda::kThreads), 0, p);
    });
  mem.finish();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> guidance_step_emu(
    const at::Tensor& x, at::TensorList branches, const at::Tensor& t,
    const std::optional<at::Tensor>& t_next, const at::Tensor& weights,
    const std::optional<at::Tensor>& zero_init, const std::optional<at::Tensor>& momentum,
    const std::optional<at::Tensor>& x_prev, const std::optional<at::Tensor>& u_prev,
    at::IntArrayRef param, int64_t base, at::IntArrayRef term_pos, at::IntArrayRef term_neg,
    at::IntArrayRef stats_space, at::IntArrayRef zero_star, at::ArrayRef<double> apg_beta,
    at::ArrayRef<double> apg_r, at::ArrayRef<double> apg_eta, double rescale_phi,
    int64_t rescale_space, int64_t rescale_ref, int64_t out_param, int64_t solver, bool return_x0) {
  RAEKERN_CHECK(x.scalar_type() != at::kDouble, kOp, "x", "float64 is not supported on CUDA (use the CPU op)");
  Prepared p = prepare(x, branches, t, t_next, weights, zero_init, momentum, x_prev, u_prev, param, base,
                       term_pos, term_neg, stats_space, zero_star, apg_beta, apg_r, apg_eta, rescale_phi,
                       rescale_space, rescale_ref, out_param, solver, return_x0);
  if (p.B == 0) return {p.out, p.x0, p.momentum_out, p.coeffs};
  RAEKERN_EMU_DISPATCH(x.scalar_type(), "guidance_step_emu", [&] { launch_step<scalar_t>(p); });
  return {p.out, p.x0, p.momentum_out, p.coeffs};
}

at::Tensor guidance_combine_emu(at::TensorList inputs, const at::Tensor& coeffs) {
  PreparedCombine pc = prepare_combine(inputs, coeffs, cuda::kMaxCombineInputs, /*cuda=*/true);
  const std::vector<Rows>& rows = pc.rows;
  const at::Tensor &c = pc.coeffs, &out = pc.out;
  const int64_t B = pc.B, N = pc.N, n_in = int64_t(rows.size());
  if (N == 0) return out;
  cuda::CombineParams p{};
  p.n_in = int(n_in);
  const int64_t blocks = cuda::plan_combine(B, N, p);
  RAEKERN_EMU_DISPATCH(out.scalar_type(), "guidance_combine_emu", [&] {
    using DT = emu_t<scalar_t>;
    DeviceMemory mem;
    for (int64_t e = 0; e < n_in; ++e) {
      p.ptr[e] = mem.in_bytes(rows[e].ptr, size_t((B - 1) * rows[e].stride + N) * sizeof(DT), "inputs");
      p.stride[e] = rows[e].stride;
    }
    p.coeffs = static_cast<const double*>(mem.in_bytes(c.const_data_ptr<double>(), size_t(B * n_in) * sizeof(double),
                                                       "coeffs"));
    p.out = mem.out<scalar_t>(out, "out");
    emu::emulate_launch(cuda::lincomb_kernel<DT>, dim3(unsigned(blocks)), dim3(cuda::kThreads), 0, p);
    mem.finish();
  });
  return out;
}

// As gfcg_select.cu: no host-side validation of the targets (an invalid one yields ref = -1, NaNs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gfcg_select_emu(const at::Tensor& logits,
                                                                           const at::Tensor& target,
                                                                           double w_max, double kappa,
                                                                           double w_min) {
  constexpr const char* op = "gfcg_select";
  RAEKERN_CHECK(logits.scalar_type() != at::kDouble, op, "logits", "float64 is not supported on CUDA");
  PreparedSelect s = prepare_select(logits, target);
  const at::Tensor &lg = s.logits, &tg = s.target, &ref = s.ref, &weight = s.weight, &pt = s.p_target,
                   &pr = s.p_ref;
  const int64_t B = s.B, C = s.C;
  if (B == 0) return {ref, weight, pt, pr};
  RAEKERN_EMU_DISPATCH(lg.scalar_type(), "gfcg_select_emu", [&] {
    DeviceMemory mem;
    const auto* lp = mem.in<scalar_t>(lg, "logits");
    const auto* tp = static_cast<const long long*>(mem.in_bytes(tg.const_data_ptr<int64_t>(), size_t(B) * 8, "target"));
    auto* rp = static_cast<long long*>(mem.out_bytes(ref.data_ptr<int64_t>(), size_t(B) * 8, "ref"));
    emu::emulate_launch(cuda::gfcg_select_kernel<emu_t<scalar_t>>, dim3(unsigned(cuda::select_blocks(B))),
                        dim3(cuda::kSelectThreads), 0, lp, tp, C, float(w_max), float(kappa), float(w_min), rp,
                        mem.out<float>(weight, "weight"), mem.out<float>(pt, "p_target"),
                        mem.out<float>(pr, "p_ref"));
    mem.finish();
  });
  return {ref, weight, pt, pr};
}

}  // namespace
}  // namespace raekern::guidance

TORCH_LIBRARY_FRAGMENT(raekern_emu, m) { raekern::guidance::define_schemas(m); }

TORCH_LIBRARY_IMPL(raekern_emu, CPU, m) {
  m.impl("guidance_step", &raekern::guidance::guidance_step_emu);
  m.impl("guidance_combine", &raekern::guidance::guidance_combine_emu);
  m.impl("gfcg_select", &raekern::guidance::gfcg_select_emu);
}
#endif  // RAEKERN_HOST_EMULATION
