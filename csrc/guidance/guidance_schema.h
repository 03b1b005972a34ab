// Schemas of the guidance family (DESIGN §3.4). Integer codes: spaces 0 velocity, 1 x0, 2 eps;
// solver 0 none, 1 euler, 2 heun2; zero_star -1 off or the space of the scaled negative branch;
// apg_eta NaN = no projection. raekern/ops/guidance.py is the documented entry point.
#pragma once
#include <torch/library.h>

namespace raekern::guidance {

inline void define_schemas(torch::Library& m) {
  m.def(
      "guidance_step(Tensor x, Tensor[] branches, Tensor t, Tensor? t_next, Tensor weights, "
      "Tensor? zero_init, Tensor? momentum, Tensor? x_prev, Tensor? u_prev, int[] param, int base, "
      "int[] term_pos, int[] term_neg, int[] stats_space, int[] zero_star, float[] apg_beta, "
      "float[] apg_r, float[] apg_eta, float rescale_phi, int rescale_space, int rescale_ref, "
      "int out_param, int solver, bool return_x0) -> (Tensor out, Tensor x0, Tensor momentum, "
      "Tensor coeffs)");
  // Per-sample linear combination Σ_e coeffs[b,e]·inputs[e][b]; guidance_step's backward.
  m.def("guidance_combine(Tensor[] inputs, Tensor coeffs) -> Tensor");
  m.def(
      "gfcg_select(Tensor logits, Tensor target, float w_max, float kappa, float w_min) -> "
      "(Tensor ref, Tensor weight, Tensor p_target, Tensor p_ref)");
}

}  // namespace raekern::guidance
