// CUDA launcher of raekern::gfcg_select.
// Ran on an H200 (2026-11-30): GPU tests pass; timings in benchmarks/results/2026-11-30-h200.txt.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_launch.h"

// fp32/bf16/fp16 only: a switch without a float64 case, so no float64 kernel is ever instantiated.
#define RAEKERN_DISPATCH_CUDA_FLOATING(TYPE, NAME, ...)                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                   \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)            \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
#include "common/dispatch.h"
#include "guidance/gfcg_select_host.h"
#include "guidance/gfcg_select_launch.h"

namespace raekern::guidance {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gfcg_select_cuda(const at::Tensor& logits,
                                                                            const at::Tensor& target,
                                                                            double w_max, double kappa,
                                                                            double w_min) {
  constexpr const char* op = "gfcg_select";
  check_same_device(target, logits, op, "target");
  RAEKERN_CHECK(logits.scalar_type() != at::kDouble, op, "logits", "float64 is not supported on CUDA");
  c10::cuda::CUDAGuard guard(logits.device());
  PreparedSelect s = prepare_select(logits, target);
  const at::Tensor &lg = s.logits, &tg = s.target, &ref = s.ref, &weight = s.weight, &pt = s.p_target,
                   &pr = s.p_ref;
  const int64_t B = s.B, C = s.C;
  if (B == 0) return {ref, weight, pt, pr};
  RAEKERN_DISPATCH_CUDA_FLOATING(lg.scalar_type(), "gfcg_select_cuda", [&] {
      cuda::gfcg_select_kernel<cuda_t<scalar_t>><<<cuda::select_blocks(B), cuda::kSelectThreads, 0, current_stream()>>>(
          cuda_ptr<scalar_t>(lg), reinterpret_cast<const long long*>(tg.const_data_ptr<int64_t>()), C,
          float(w_max), float(kappa), float(w_min), reinterpret_cast<long long*>(ref.data_ptr<int64_t>()),
          weight.data_ptr<float>(), pt.data_ptr<float>(), pr.data_ptr<float>());
      RAEKERN_CUDA_CHECK_LAUNCH();
  });
  return {ref, weight, pt, pr};
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CUDA, m) { m.impl("gfcg_select", &gfcg_select_cuda); }

}  // namespace raekern::guidance
