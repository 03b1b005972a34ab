// Schemas of the attention family (DESIGN §3.3). Layout codes: 0 = [B,N,H,Dh], 1 = [B,H,N,Dh].
// q/k/v may be arbitrary strided views (e.g. slices of a packed qkv projection); out and the input
// gradients are returned contiguous in the same layout. rope_h = rope_w = 0 disables RoPE.
#pragma once
#include <torch/library.h>

namespace raekern::attention {

inline void define_schemas(torch::Library& m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? q_norm_weight, Tensor? k_norm_weight, "
      "Tensor? key_padding_mask, float scale, float norm_eps, int rope_h, int rope_w, "
      "float rope_theta, int layout) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? q_norm_weight, Tensor? k_norm_weight, Tensor? key_padding_mask, float scale, "
      "float norm_eps, int rope_h, int rope_w, float rope_theta, int layout, bool deterministic) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_q_norm_weight, "
      "Tensor grad_k_norm_weight)");
}

}  // namespace raekern::attention
