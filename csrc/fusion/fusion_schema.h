// Schemas of the fusion family (DESIGN §3.2): multi-layer representation fusion for RAE latents.
// Layer lists are Tensor[] so a ViT's hidden states are read through their own pointers, never
// stacked into a copy. Each forward op has a `_backward` op so torch.compile traces both graphs.
#pragma once
#include <torch/library.h>

namespace raekern::fusion {

inline void define_schemas(torch::Library& m) {
  m.def(
      "layer_stack_fuse(Tensor[] layers, Tensor? weights, int skip_tokens, bool normalize, float eps, "
      "str reduce, bool add_last_token_mean, bool channels_first, SymInt grid_h, SymInt grid_w, "
      "Tensor? latent_mean, Tensor? latent_var, float latent_eps) -> Tensor");
  m.def(
      "layer_stack_fuse_backward(Tensor grad, Tensor[] layers, Tensor? weights, int skip_tokens, "
      "bool normalize, float eps, str reduce, bool add_last_token_mean, bool channels_first, "
      "Tensor? latent_var, float latent_eps, bool weights_grad) -> (Tensor[], Tensor)");
  m.def(
      "depth_route(Tensor[] experts, Tensor router_logits, Tensor base, str energy, str bound, "
      "Tensor? gamma, float cap) -> Tensor");
  m.def(
      "depth_route_backward(Tensor grad, Tensor[] experts, Tensor router_logits, Tensor base, "
      "str energy, str bound, Tensor? gamma, float cap) -> (Tensor[], Tensor, Tensor, Tensor)");
  m.def("latent_normalize(Tensor z, Tensor mean, Tensor var, float eps) -> Tensor");
  m.def("latent_normalize_backward(Tensor grad, Tensor var, float eps) -> Tensor");
  m.def("latent_denormalize(Tensor x, Tensor mean, Tensor var, float eps) -> Tensor");
  m.def("latent_denormalize_backward(Tensor grad, Tensor var, float eps) -> Tensor");
}

}  // namespace raekern::fusion
