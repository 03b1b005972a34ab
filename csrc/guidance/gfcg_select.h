// GFCG reference selection (DESIGN §4.3), one row of classifier logits: softmax, the most probable
// class other than the target (lowest index on ties), and the weight
// w = clamp(w_max·exp(-kappa·(p_target - p_ref)), w_min, w_max). Shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>

#include "guidance/guidance_solve.h"

namespace raekern::guidance {

RAEKERN_HD inline float gfcg_weight(float p_target, float p_ref, float w_max, float kappa, float w_min) {
  float w = w_max * expf(-kappa * (p_target - p_ref));
  return fminf(fmaxf(w, w_min), w_max);
}

}  // namespace raekern::guidance
