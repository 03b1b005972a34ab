// CPU kernels of latent_normalize / latent_denormalize: the token ⇄ channels-first transpose and the
// dataset standardisation z' = (z − μ)/sqrt(σ² + eps) in one pass, by tiles of kTile tokens.
// Their backwards are the same transposes with only the scale (μ is a constant shift).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/cpu_utils.h"
#include "common/cpu_vec_math.h"
#include "common/dispatch.h"
#include "fusion/dynamic_tasks.h"
#include "fusion/fusion_args.h"
#include "fusion/latent_tile.h"
#include "common/output_alloc.h"

namespace raekern::fusion::cpu {
namespace {

using raekern::cpu::acc_t;

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

#if defined(RAEKERN_CPU_VEC16)
using raekern::cpu::load16;
using raekern::cpu::store16;
using raekern::cpu::tail_mask;

// The transposes by 16×16 register blocks. A task is 32 tokens × up to kChannels channels of every
// sample: its slice of the statistics (packed [channel][32 tokens], scale computed here) is read
// from memory once and stays in L1 for all B samples, instead of once per sample. Each channel run
// written (or read) is 32 tokens, a whole 64-byte line even for 16-bit types, and each token row
// 32 channels, so no line is touched in halves by two different tasks.
constexpr int64_t kChannels = 256;
constexpr int64_t kTokens = 32;
constexpr int64_t kStreamBytes = int64_t(4) << 20;

struct CfTask {
  int64_t n0, tn, d0, dn;
};

inline CfTask cf_task(int64_t task, int64_t D, int64_t N) {
  const int64_t dblocks = (D + kChannels - 1) / kChannels;
  CfTask t;
  t.n0 = (task / dblocks) * kTokens;
  t.tn = std::min(kTokens, N - t.n0);
  t.d0 = (task % dblocks) * kChannels;
  t.dn = std::min(kChannels, D - t.d0);
  return t;
}

inline int64_t cf_tasks(int64_t D, int64_t N) {
  return ((N + kTokens - 1) / kTokens) * ((D + kChannels - 1) / kChannels);
}

// Token-lane mask of half h (tokens 16h .. 16h+15) of a task with tn tokens.
inline __mmask16 half_mask(int64_t tn, int h) { return tn > 16 * h ? tail_mask(tn - 16 * h) : __mmask16(0); }

// Packs shift[d, n0 + k] and scale = rsqrt(var + eps) (or sqrt) for the task's channels, kTokens per
// row; lanes past the tile's last token are 0.
inline void pack_stats(const CfTask& t, int64_t N, const float* var, const float* shift, float eps, bool inverse,
                       float* sc, float* sh) {
  const __m512 e = _mm512_set1_ps(eps), one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < t.dn; ++j)
    for (int h = 0; h < 2; ++h) {
      const __mmask16 m = half_mask(t.tn, h);
      const int64_t off = (t.d0 + j) * N + t.n0 + 16 * h;
      const __m512 r = _mm512_sqrt_ps(_mm512_add_ps(raekern::cpu::load16(var + off, m), e));
      _mm512_storeu_ps(sc + kTokens * j + 16 * h, _mm512_maskz_mov_ps(m, inverse ? _mm512_div_ps(one, r) : r));
      if (shift) _mm512_storeu_ps(sh + kTokens * j + 16 * h, raekern::cpu::load16(shift + off, m));
    }
}

// Runs body(task, scale, shift) for every task of the [D, N] statistics grid in parallel, with the
// task's statistics packed (pack_stats) into per-thread buffers.
template <class Body>
void for_each_cf_task(int64_t D, int64_t N, const float* var, const float* shift, float eps, bool inverse,
                      const Body& body) {
  parallel_tasks(cf_tasks(D, N), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> sc(kTokens * kChannels), sh(shift ? kTokens * kChannels : 0);
    for (int64_t task = lo; task < hi; ++task) {
      const CfTask t = cf_task(task, D, N);
      pack_stats(t, N, var, shift, eps, inverse, sc.data(), sh.data());
      body(t, sc.data(), sh.data());
    }
  });
}

// tokens z [B, N, D] (unit stride in D) → contiguous [B, D, N]: (z − shift)·scale.
template <class T>
void tokens_to_cf_vec(const T* z, int64_t zsb, int64_t zsn, int64_t B, int64_t N, int64_t D, const float* var,
                      const float* shift, float eps, bool inverse, T* out) {
  // Outputs far larger than L2 go around the caches: every channel run of a full task is whole
  // 64-byte lines when rows start on a line, so no read-for-ownership is needed.
  const bool stream = B * N * D * int64_t(sizeof(T)) >= ::raekern::cpu::stream_threshold(kStreamBytes) && (N * int64_t(sizeof(T))) % 64 == 0 &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0;
  for_each_cf_task(D, N, var, shift, eps, inverse, [&](const CfTask& t, const float* sc, const float* sh) {
    const __mmask16 mt[2] = {half_mask(t.tn, 0), half_mask(t.tn, 1)};
    const bool st = stream && t.tn == kTokens;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j0 = 0; j0 < t.dn; j0 += 16) {
        const int64_t dc = std::min<int64_t>(16, t.dn - j0);
        const __mmask16 mc = tail_mask(dc);
        // Rows here touch 64 bytes of 32 different pages per block, too little for the hardware
        // streamer to train on: the next line of every token row (or the next sample's first)
        // and the next block's output lines are fetched one block ahead.
        if ((j0 * int64_t(sizeof(T))) % 64 == 0) {
          int64_t pb = b, pj = j0 + 64 / int64_t(sizeof(T));
          if (pj >= t.dn) pb = b + 1, pj = 0;
          if (pb < B)
            for (int64_t k = 0; k < t.tn; ++k) _mm_prefetch(reinterpret_cast<const char*>(z + pb * zsb + (t.n0 + k) * zsn + t.d0 + pj), _MM_HINT_T0);
        }
        if (!st && j0 + 16 < t.dn)
          for (int64_t i = 0; i < std::min<int64_t>(16, t.dn - j0 - 16); ++i)
            raekern::cpu::prefetchw_lines(out + (b * D + t.d0 + j0 + 16 + i) * N + t.n0, t.tn * int64_t(sizeof(T)));
        __m512 r[2][16];  // [token half][row]: token rows in, channel rows after the transpose
        for (int h = 0; h < 2; ++h) {
          for (int64_t i = 0; i < 16; ++i) {
            const int64_t k = 16 * h + i;
            r[h][i] = k < t.tn ? load16(z + b * zsb + (t.n0 + k) * zsn + t.d0 + j0, mc) : _mm512_setzero_ps();
          }
          raekern::cpu::transpose16(r[h]);
        }
        for (int64_t i = 0; i < dc; ++i) {
          const int64_t j = j0 + i;
          T* dst = out + (b * D + t.d0 + j) * N + t.n0;
          for (int h = 0; h < 2; ++h) {
            __m512 v = r[h][i];
            if (shift) v = _mm512_sub_ps(v, _mm512_loadu_ps(sh + kTokens * j + 16 * h));
            v = _mm512_mul_ps(v, _mm512_loadu_ps(sc + kTokens * j + 16 * h));
            if (st) raekern::cpu::stream16(dst + 16 * h, v);
            else if (mt[h]) store16(dst + 16 * h, v, mt[h]);
          }
        }
      }
    }
    if (st) _mm_sfence();
  });
}

// x [B, D, N] (unit stride in N, channel stride xsd) → contiguous tokens [B, N, D]: x·scale + shift.
template <class T>
void cf_to_tokens_vec(const T* x, int64_t xsb, int64_t xsd, int64_t B, int64_t N, int64_t D, const float* var,
                      const float* shift, float eps, bool inverse, T* out) {
  // As in tokens_to_cf_vec: each 32-channel run of a token row is whole lines when rows start on one.
  const bool stream = B * N * D * int64_t(sizeof(T)) >= ::raekern::cpu::stream_threshold(kStreamBytes) && (D * int64_t(sizeof(T))) % 64 == 0 &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0;
  for_each_cf_task(D, N, var, shift, eps, inverse, [&](const CfTask& t, const float* sc, const float* sh) {
    for (int64_t b = 0; b < B; ++b) {
      for (int h = 0; h < 2 && 16 * h < t.tn; ++h) {
        const __mmask16 mt = half_mask(t.tn, h);
        const int64_t tn = std::min<int64_t>(16, t.tn - 16 * h);
        for (int64_t j0 = 0; j0 < t.dn; j0 += 32) {
          // As above: the next block's 32 channel rows and output lines, one block ahead.
          const bool st = stream && j0 + 32 <= t.dn;
          if (j0 + 32 < t.dn) {
            for (int64_t i = j0 + 32; i < std::min(t.dn, j0 + 64); ++i)
              _mm_prefetch(reinterpret_cast<const char*>(x + b * xsb + (t.d0 + i) * xsd + t.n0 + 16 * h), _MM_HINT_T0);
            if (!stream)
              for (int64_t i = 0; i < tn; ++i)
                raekern::cpu::prefetchw_lines(out + (b * N + t.n0 + 16 * h + i) * D + t.d0 + j0 + 32,
                                              std::min<int64_t>(32, t.dn - j0 - 32) * int64_t(sizeof(T)));
          }
          __m512 r[2][16];  // [channel half][row]: channel rows in, token rows after the transpose
          __mmask16 mc[2];
          for (int c = 0; c < 2; ++c) {
            const int64_t jc = j0 + 16 * c, dc = std::max<int64_t>(0, std::min<int64_t>(16, t.dn - jc));
            mc[c] = dc ? tail_mask(dc) : __mmask16(0);
            for (int64_t i = 0; i < 16; ++i) {
              if (i >= dc) {
                r[c][i] = _mm512_setzero_ps();
                continue;
              }
              const int64_t j = jc + i;
              __m512 v = _mm512_mul_ps(load16(x + b * xsb + (t.d0 + j) * xsd + t.n0 + 16 * h, mt),
                                       _mm512_loadu_ps(sc + kTokens * j + 16 * h));
              if (shift) v = _mm512_add_ps(v, _mm512_loadu_ps(sh + kTokens * j + 16 * h));
              r[c][i] = v;
            }
            if (dc) raekern::cpu::transpose16(r[c]);
          }
          for (int64_t i = 0; i < tn; ++i) {
            T* dst = out + (b * N + t.n0 + 16 * h + i) * D + t.d0 + j0;
            for (int c = 0; c < 2; ++c)
              if (st) raekern::cpu::stream16(dst + 16 * c, r[c][i]);
              else if (mc[c]) store16(dst + 16 * c, r[c][i], mc[c]);
          }
        }
      }
    }
    if (stream) _mm_sfence();
  });
}
#endif

// tokens [B, N, D] (any strides) → contiguous [B, D, H, W]: (z − shift)·scale.
at::Tensor tokens_to_cf(const at::Tensor& z, const at::Tensor& shift, const at::Tensor& var, double eps,
                        bool inverse_scale, int64_t H, int64_t W) {
  const int64_t B = z.size(0), N = z.size(1), D = z.size(2);
  at::Tensor out = ::raekern::empty_output({B, D, H, W}, z.options());
  if (out.numel() == 0) return out;
  const auto acc = acc_of(z.scalar_type());
  const at::Tensor v = var.to(acc).contiguous();
  const at::Tensor m = shift.defined() ? shift.to(acc).contiguous() : at::Tensor();
  RAEKERN_DISPATCH_FLOATING(z.scalar_type(), "latent_tokens_to_cf", [&] {
    using A = acc_t<scalar_t>;
#if defined(RAEKERN_CPU_VEC16)
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (z.stride(2) == 1) {
        tokens_to_cf_vec(z.data_ptr<scalar_t>(), z.stride(0), z.stride(1), B, N, D, v.data_ptr<float>(),
                         m.defined() ? m.data_ptr<float>() : nullptr, float(eps), inverse_scale,
                         out.data_ptr<scalar_t>());
        return;
      }
    }
#endif
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
  at::Tensor out = ::raekern::empty_output({B, N, D}, x.options());
  if (out.numel() == 0) return out;
  const auto acc = acc_of(x.scalar_type());
  const at::Tensor v = var.to(acc).contiguous();
  const at::Tensor m = shift.defined() ? shift.to(acc).contiguous() : at::Tensor();
  RAEKERN_DISPATCH_FLOATING(x.scalar_type(), "latent_cf_to_tokens", [&] {
    using A = acc_t<scalar_t>;
#if defined(RAEKERN_CPU_VEC16)
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (x.stride(3) == 1 && x.stride(2) == W) {
        cf_to_tokens_vec(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), B, N, D, v.data_ptr<float>(),
                         m.defined() ? m.data_ptr<float>() : nullptr, float(eps), inverse_scale,
                         out.data_ptr<scalar_t>());
        return;
      }
    }
#endif
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
  check_latent_stats_cf(at::Tensor(), var, grad, op);
  return cf_to_tokens(grad, at::Tensor(), var, eps, true);
}

at::Tensor latent_denormalize_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, double eps) {
  const char* op = "latent_denormalize";
  check_cf(x, op, "x");
  check_latent_stats_cf(mean, var, x, op);
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
