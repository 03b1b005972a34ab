// CPU kernel of raekern::gfcg_select: one classifier row per task, fp32 softmax statistics.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_utils.h"
#include "common/dispatch.h"
#include "guidance/gfcg_select.h"
#include "guidance/gfcg_select_host.h"

namespace raekern::guidance {
namespace {

template <class T>
void select_rows(const at::Tensor& lg, const at::Tensor& tg, at::Tensor& ref, at::Tensor& weight, at::Tensor& pt,
                 at::Tensor& pr, double w_max, double kappa, double w_min) {
  const int64_t B = lg.size(0), C = lg.size(1);
  const int64_t* tgp = tg.const_data_ptr<int64_t>();
  const T* lp = lg.const_data_ptr<T>();
  int64_t* rp = ref.data_ptr<int64_t>();
  float *wp = weight.data_ptr<float>(), *ptp = pt.data_ptr<float>(), *prp = pr.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    std::vector<cpu::acc_t<T>> row(C);
    for (int64_t b = begin; b < end; ++b) {
      cpu::load_row(lp + b * C, 1, C, row.data());
      float mx = -std::numeric_limits<float>::infinity();
      bool nan = false;
      for (int64_t c = 0; c < C; ++c) {
        mx = std::max(mx, float(row[c]));
        nan = nan || std::isnan(row[c]);
      }
      float sum = 0.f;
      for (int64_t c = 0; c < C; ++c) sum += std::exp(float(row[c]) - mx);
      const int64_t tb = tgp[b];
      int64_t best = tb == 0 ? 1 : 0;
      // A row whose probabilities are undefined (a NaN logit, or a largest logit of ±inf) keeps the
      // first non-target class, as the argmax of the reference's all-NaN probabilities does.
      if (!nan && std::isfinite(mx))
        for (int64_t c = 0; c < C; ++c)
          if (c != tb && row[c] > row[best]) best = c;
      const float p_t = std::exp(float(row[tb]) - mx) / sum;
      const float p_r = std::exp(float(row[best]) - mx) / sum;
      rp[b] = best;
      ptp[b] = p_t;
      prp[b] = p_r;
      wp[b] = gfcg_weight(p_t, p_r, float(w_max), float(kappa), float(w_min));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gfcg_select_cpu(const at::Tensor& logits,
                                                                           const at::Tensor& target,
                                                                           double w_max, double kappa,
                                                                           double w_min) {
  constexpr const char* op = "gfcg_select";
  RAEKERN_CHECK(!target.is_floating_point() && !target.is_complex(), op, "target",
                "must be an integer tensor, got ", target.scalar_type());
  PreparedSelect s = prepare_select(logits, target);
  const at::Tensor &lg = s.logits, &tg = s.target;
  const int64_t B = s.B, C = s.C;
  const int64_t* tgp = tg.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    RAEKERN_CHECK(tgp[b] >= 0 && tgp[b] < C, op, "target", "must hold class indices in [0, ", C, "), got ",
                  tgp[b], " at row ", b);
  RAEKERN_DISPATCH_FLOATING(lg.scalar_type(), "gfcg_select_cpu",
                            [&] {
                              select_rows<scalar_t>(lg, tg, s.ref, s.weight, s.p_target, s.p_ref, w_max, kappa, w_min);
                            });
  return {s.ref, s.weight, s.p_target, s.p_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CPU, m) { m.impl("gfcg_select", &gfcg_select_cpu); }

}  // namespace raekern::guidance
