// CPU kernels of latent_normalize / latent_denormalize: the token ⇄ channels-first transpose and the
// dataset standardisation z' = (z − μ)/sqrt(σ² + eps) in one pass, by tiles of kTile tokens.
// Their backwards are the same transposes with only the scale (μ is a constant shift).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_utils.h"
#include "common/dispatch.h"
#include "fusion/fusion_args.h"
#include "fusion/latent_tile.h"

namespace raekern::fusion::cpu {
namespace {

using raekern::cpu::acc_t;

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// tokens [B, N, D] (any strides) → contiguous [B, D, H, W]: (z − shift)·scale.
at::Tensor tokens_to_cf(const at::Tensor& z, const at::Tensor& shift, const at::Tensor& var, double eps,
                        bool inverse_scale, int64_t H, int64_t W) {
  const int64_t B = z.size(0), N = z.size(1), D = z.size(2);
  at::Tensor out = at::empty({B, D, H, W}, z.options());
  if (out.numel() == 0) return out;
  const auto acc = acc_of(z.scalar_type());
  const at::Tensor v = var.to(acc).contiguous();
  const at::Tensor m = shift.defined() ? shift.to(acc).contiguous() : at::Tensor();
  RAEKERN_DISPATCH_FLOATING(z.scalar_type(), "latent_tokens_to_cf", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<A> sc = latent_scale(v.data_ptr<A>(), D * N, A(eps), inverse_scale);
    const A* mp = m.defined() ? m.data_ptr<A>() : nullptr;
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t tiles = (N + kTile - 1) / kTile;
    raekern::cpu::parallel_rows(B * tiles, 2 * kTile * D * sizeof(scalar_t), [&](int64_t lo, int64_t hi) {
      std::vector<A> tile(kTile * D);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / tiles, n0 = (task % tiles) * kTile, tn = std::min(N, n0 + kTile) - n0;
        for (int64_t t = 0; t < tn; ++t)
          raekern::cpu::load_row(zp + b * z.stride(0) + (n0 + t) * z.stride(1), z.stride(2), D,
                                 tile.data() + t * D);
        store_tile_cf(tile.data(), tn, D, N, b, n0, mp, sc.data(), op);
      }
    });
  });
  return out;
}

// [B, D, H, W] (any strides) → contiguous tokens [B, N, D]: x·scale + shift.
at::Tensor cf_to_tokens(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& var, double eps,
                        bool inverse_scale) {
  const int64_t B = x.size(0), D = x.size(1), W = x.size(3), N = x.size(2) * x.size(3);
  at::Tensor out = at::empty({B, N, D}, x.options());
  if (out.numel() == 0) return out;
  const auto acc = acc_of(x.scalar_type());
  const at::Tensor v = var.to(acc).contiguous();
  const at::Tensor m = shift.defined() ? shift.to(acc).contiguous() : at::Tensor();
  RAEKERN_DISPATCH_FLOATING(x.scalar_type(), "latent_cf_to_tokens", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<A> sc = latent_scale(v.data_ptr<A>(), D * N, A(eps), inverse_scale);
    const A* mp = m.defined() ? m.data_ptr<A>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t tiles = (N + kTile - 1) / kTile;
    raekern::cpu::parallel_rows(B * tiles, 2 * kTile * D * sizeof(scalar_t), [&](int64_t lo, int64_t hi) {
      std::vector<A> tile(kTile * D);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / tiles, n0 = (task % tiles) * kTile, tn = std::min(N, n0 + kTile) - n0;
        load_tile_cf(xp, x.stride(0), x.stride(1), x.stride(2), x.stride(3), W, D, N, b, n0, tn, mp, sc.data(),
                     tile.data());
        for (int64_t t = 0; t < tn; ++t)
          raekern::cpu::store_row(tile.data() + t * D, D, op + (b * N + n0 + t) * D);
      }
    });
  });
  return out;
}

void check_tokens(const at::Tensor& z, const char* op, const char* arg) {
  raekern::check_floating(z, op, arg);
  raekern::check_dim(z, 3, op, arg);
}

void check_cf(const at::Tensor& x, const char* op, const char* arg) {
  raekern::check_floating(x, op, arg);
  raekern::check_dim(x, 4, op, arg);
}

at::Tensor latent_normalize_cpu(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& var, double eps) {
  const char* op = "latent_normalize";
  check_tokens(z, op, "z");
  check_latent_stats(mean, var, z, z.size(2), z.size(1), op);
  return tokens_to_cf(z, mean, var, eps, true, var.size(1), var.size(2));
}

at::Tensor latent_normalize_backward_cpu(const at::Tensor& grad, const at::Tensor& var, double eps) {
  const char* op = "latent_normalize_backward";
  check_cf(grad, op, "grad");
  check_latent_stats(at::Tensor(), var, grad, grad.size(1), grad.size(2) * grad.size(3), op);
  return cf_to_tokens(grad, at::Tensor(), var, eps, true);
}

at::Tensor latent_denormalize_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, double eps) {
  const char* op = "latent_denormalize";
  check_cf(x, op, "x");
  RAEKERN_CHECK(mean.sizes() == var.sizes() && mean.dim() == 3 && mean.size(0) == x.size(1) &&
                    mean.size(1) == x.size(2) && mean.size(2) == x.size(3),
                op, "mean", "and 'var' must have shape [D, H, W] = ", x.sizes().slice(1), ", got ", mean.sizes(),
                " and ", var.sizes());
  check_latent_stats(mean, var, x, x.size(1), x.size(2) * x.size(3), op);
  return cf_to_tokens(x, mean, var, eps, false);
}

at::Tensor latent_denormalize_backward_cpu(const at::Tensor& grad, const at::Tensor& var, double eps) {
  const char* op = "latent_denormalize_backward";
  check_tokens(grad, op, "grad");
  check_latent_stats(at::Tensor(), var, grad, grad.size(2), grad.size(1), op);
  return tokens_to_cf(grad, at::Tensor(), var, eps, false, var.size(1), var.size(2));
}

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CPU, m) {
  m.impl("latent_normalize", &latent_normalize_cpu);
  m.impl("latent_normalize_backward", &latent_normalize_backward_cpu);
  m.impl("latent_denormalize", &latent_denormalize_cpu);
  m.impl("latent_denormalize_backward", &latent_denormalize_backward_cpu);
}

}  // namespace raekern::fusion::cpu
