// Schemas of the attention family (DESIGN §3.3). Layout codes: 0 = [B,N,H,Dh], 1 = [B,H,N,Dh].
// q/k/v may be arbitrary strided views (e.g. slices of a packed qkv projection); out and the input
// gradients are returned contiguous in the same layout. rope_h = rope_w = 0 disables RoPE.
#pragma once
#include <torch/library.h>

#include <string>

#include "attention/attention_sm80_config.h"

namespace raekern::attention {

// "bf16_forward=amx|avx512|avx2|portable;fp32=avx512|avx2|portable" for `raekern info` (attention_fwd_cpu.cpp).
std::string cpu_backends();

inline void define_schemas(torch::Library& m) {
  m.def("attention_cpu_backends() -> str", &cpu_backends);
  // Shared memory the CUDA forward needs per block at a head dim (plain C++: also in CPU builds).
  m.def("attention_cuda_fwd_smem(int head_dim) -> int",
        [](int64_t D) -> int64_t { return D % 8 == 0 && D > 0 && D <= 256 ? sm80::fwd_smem_bytes(D) : -1; });
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
