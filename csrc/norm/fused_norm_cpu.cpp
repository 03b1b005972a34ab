// CPU kernels of the norm family (see norm_params.h for the fused row operation) and the CPU
// registration of its ten ops. One task = a range of tokens of one sample, so per-sample operands
// (shift/scale/gate of shape [B, 1, D]) are widened once per task and their gradients are summed in
// task-local fp32 buffers; only those [tasks, D] partial sums leave the kernel.
// Each row is read from memory once: it is widened into an L1-resident fp32 buffer and every later
// step (statistics, normalisation, both outputs) works on that buffer with vectorised loops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cpu_convert.h"
#include "common/dispatch.h"
#include "norm/norm_host.h"

namespace raekern::norm {
namespace {

using cpu::acc_t;

template <class T>
inline const T* row_of(const Operand& o, int64_t b, int64_t n) {
  return static_cast<const T*>(o.ptr) + b * o.sb + n * o.sn;
}

template <class T>
inline void widen(const Operand& o, int64_t b, int64_t n, int64_t D, acc_t<T>* dst) {
  cpu::widen_row<T>(row_of<T>(o, b, n), o.sd, D, dst);
}

template <class T>
inline void narrow(const acc_t<T>* src, int64_t D, T* dst) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    if (src != dst) std::memcpy(dst, src, D * sizeof(T));
  } else {
    cpu::narrow_row<T>(src, D, dst);
  }
}

// Buffers of one worker thread; `n` rows of D accumulator values.
template <class A>
struct Scratch {
  std::vector<A> mem;
  int64_t D;
  Scratch(int64_t rows, int64_t D) : mem(rows * D), D(D) {}
  A* operator[](int i) { return mem.data() + i * D; }
};

template <class A>
inline void fill(A* p, int64_t D, A v) {
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) p[i] = v;
}

// Row statistics of xb; returns {mean, rstd} (mean = 0 for RMSNorm).
template <class A>
inline std::pair<A, A> row_stats(const A* __restrict xb, int64_t D, Kind kind, double eps) {
  const A inv_d = A(1) / A(D);
  A mean = 0, ss = 0;
  if (kind == Kind::Layer) {
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < D; ++i) s += xb[i];
    mean = s * inv_d;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += (xb[i] - mean) * (xb[i] - mean);
  } else {
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += xb[i] * xb[i];
  }
  return {mean, A(1) / std::sqrt(ss * inv_d + A(eps))};
}

template <class T>
void forward_kernel(const FwdParams& p) {
  using A = acc_t<T>;
  const int64_t B = p.B, N = p.N, D = p.D;
  const TaskPlan plan = plan_tasks(B, N, at::get_num_threads(), 1);
  const bool residual = p.gate.ptr != nullptr, norm = p.kind != Kind::None;
  // out = xhat * ca + cb with ca = weight*(1+scale), cb = bias*(1+scale) + shift: recomputed per
  // token only when shift or scale vary per token, otherwise once per sample.
  const bool coef_per_row = (p.shift.ptr && p.shift.sn != 0) || (p.scale.ptr && p.scale.sn != 0);
  const bool gate_per_row = residual && p.gate.sn != 0;
  const A* w = static_cast<const A*>(p.weight);
  const A* bias = static_cast<const A*>(p.bias);
  A* mean_out = static_cast<A*>(p.mean);
  A* rstd_out = static_cast<A*>(p.rstd);

  at::parallel_for(0, B * plan.chunks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<A> s(6, D);
    A *xb = s[0], *ca = s[1], *cb = s[2], *gb = s[3], *t1b = s[4], *t2b = s[5];
    int64_t coef_b = -1, gate_b = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / plan.chunks, n0 = (t % plan.chunks) * plan.rows_per_task;
      const int64_t n1 = std::min(N, n0 + plan.rows_per_task);
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t row = b * N + n;
        widen<T>(p.x, b, n, D, xb);
        if (residual) {
          if (gate_per_row || gate_b != b) {
            widen<T>(p.gate, b, n, D, gb);
            gate_b = b;
          }
          widen<T>(p.y, b, n, D, t1b);
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) xb[i] += gb[i] * t1b[i];
          if constexpr (std::is_same_v<T, A>) {
            std::memcpy(static_cast<T*>(p.x_out) + row * D, xb, D * sizeof(T));
          } else {
            // Normalise the rounded residual, as an unfused x' = x + g*y; h = norm(x') would.
            T* xo = static_cast<T*>(p.x_out) + row * D;
            cpu::narrow_row<T>(xb, D, xo);
            cpu::widen_row<T>(xo, 1, D, xb);
          }
        }
        if (!norm) continue;
        const auto [mean, rstd] = row_stats(xb, D, p.kind, p.eps);
        mean_out[row] = mean;
        rstd_out[row] = rstd;
        if (coef_per_row || coef_b != b) {
          coef_b = b;
          if (p.scale.ptr) widen<T>(p.scale, b, n, D, t1b);
          else fill(t1b, D, A(0));
          if (p.shift.ptr) widen<T>(p.shift, b, n, D, t2b);
          else fill(t2b, D, A(0));
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) {
            ca[i] = A(1) + t1b[i];
            cb[i] = t2b[i];
          }
          if (bias) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) cb[i] += bias[i] * ca[i];
          }
          if (w) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) ca[i] *= w[i];
          }
        }
        const A nmr = -mean * rstd;
        T* out = static_cast<T*>(p.out) + row * D;
        A* ob = std::is_same_v<T, A> ? reinterpret_cast<A*>(out) : t1b;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) ob[i] = (xb[i] * rstd + nmr) * ca[i] + cb[i];
        narrow<T>(ob, D, out);
      }
    }
  });
}

template <class T>
void backward_kernel(const BwdParams& p) {
  using A = acc_t<T>;
  const int64_t B = p.B, N = p.N, D = p.D;
  const bool residual = p.gate.ptr != nullptr;
  const bool norm = p.kind != Kind::None && p.dout.ptr != nullptr;
  const bool scale_per_row = p.scale.ptr && p.scale.sn != 0;
  const bool gate_per_row = residual && p.gate.sn != 0;
  const A* w = static_cast<const A*>(p.weight);
  const A* bias = static_cast<const A*>(p.bias);
  const A* mean_in = static_cast<const A*>(p.mean);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const A inv_d = A(1) / A(D);
  A* partials = static_cast<A*>(p.partials);
  const int64_t np = p.num_partials;

  at::parallel_for(0, B * p.chunks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<A> s(7 + 5, D);
    A *xh = s[0], *g = s[1], *ops = s[2], *gb = s[3], *yb = s[4], *tb = s[5], *hb = s[6];
    // Task-local sums, one per reduced gradient, in the slot order of the partial workspace.
    A* acc = s[7];
    auto acc_of = [&](const GradSlot& sl) { return sl.partial >= 0 ? acc + sl.partial * D : nullptr; };
    A *acc_gate = acc_of(p.dgate), *acc_shift = acc_of(p.dshift), *acc_scale = acc_of(p.dscale);
    A *acc_w = acc_of(p.dweight), *acc_b = acc_of(p.dbias);
    int64_t scale_b = -1, gate_b = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.chunks, n0 = (t % p.chunks) * p.rows_per_task;
      const int64_t n1 = std::min(N, n0 + p.rows_per_task);
      fill(acc, np * D, A(0));
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t row = b * N + n;
        if (!norm && p.kind != Kind::None) {  // no gradient reached `out`
          for (const GradSlot* sl : {&p.dshift, &p.dscale})
            if (sl->mode == GradMode::PerRow) std::memset(static_cast<T*>(sl->ptr) + row * D, 0, D * sizeof(T));
        }
        if (norm) {
          const A rstd = rstd_in[row];
          const A mean = p.kind == Kind::Layer ? mean_in[row] : A(0);
          widen<T>(p.xin, b, n, D, xh);
          const A nmr = -mean * rstd;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) xh[i] = xh[i] * rstd + nmr;
          widen<T>(p.dout, b, n, D, g);
          if (p.scale.ptr && (scale_per_row || scale_b != b)) {
            scale_b = b;
            widen<T>(p.scale, b, n, D, ops);
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) ops[i] += A(1);
          } else if (!p.scale.ptr && scale_b != b) {
            scale_b = b;
            fill(ops, D, A(1));
          }
          // Gradients of the modulation: d shift = g, d scale = g * h with h = xhat * w + bias.
          if (p.dshift.mode == GradMode::PerRow) {
            narrow<T>(g, D, static_cast<T*>(p.dshift.ptr) + row * D);
          } else if (acc_shift) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) acc_shift[i] += g[i];
          }
          if (p.dscale.mode != GradMode::Absent) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) hb[i] = xh[i];
            if (w) {
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) hb[i] *= w[i];
            }
            if (bias) {
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) hb[i] += bias[i];
            }
            if (p.dscale.mode == GradMode::PerRow) {
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) hb[i] *= g[i];
              narrow<T>(hb, D, static_cast<T*>(p.dscale.ptr) + row * D);
            } else {
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) acc_scale[i] += g[i] * hb[i];
            }
          }
          // g <- d h = g * (1 + scale); then the affine gradients; then g <- d xhat.
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) g[i] *= ops[i];
          if (acc_w) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) acc_w[i] += g[i] * xh[i];
          }
          if (acc_b) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) acc_b[i] += g[i];
          }
          if (w) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) g[i] *= w[i];
          }
          A s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t i = 0; i < D; ++i) {
            s1 += g[i];
            s2 += g[i] * xh[i];
          }
          const A c1 = p.kind == Kind::Layer ? s1 * inv_d : A(0), c2 = s2 * inv_d;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) g[i] = rstd * (g[i] - c1 - xh[i] * c2);
          if (p.dxo.ptr) {
            widen<T>(p.dxo, b, n, D, tb);
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) g[i] += tb[i];
          }
        } else if (p.dxo.ptr) {
          widen<T>(p.dxo, b, n, D, g);
        } else {
          fill(g, D, A(0));
        }
        if (residual) {
          // x' = x + gate * y: d y = gate * d x', d gate = d x' * y.
          if (gate_per_row || gate_b != b) {
            gate_b = b;
            widen<T>(p.gate, b, n, D, gb);
          }
          widen<T>(p.y, b, n, D, yb);
          if (p.dgate.mode == GradMode::PerRow) {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) tb[i] = g[i] * yb[i];
            narrow<T>(tb, D, static_cast<T*>(p.dgate.ptr) + row * D);
          } else {
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) acc_gate[i] += g[i] * yb[i];
          }
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) tb[i] = gb[i] * g[i];
          narrow<T>(tb, D, static_cast<T*>(p.dy) + row * D);
        }
        narrow<T>(g, D, static_cast<T*>(p.dx) + row * D);
      }
      if (np > 0) std::memcpy(partials + t * np * D, acc, np * D * sizeof(A));
    }
  });
}

void forward_cpu(const FwdParams& p, at::ScalarType st) {
  RAEKERN_DISPATCH_FLOATING(st, "raekern.norm_forward", [&] { forward_kernel<scalar_t>(p); });
}

void backward_cpu(const BwdParams& p, at::ScalarType st) {
  RAEKERN_DISPATCH_FLOATING(st, "raekern.norm_backward", [&] { backward_kernel<scalar_t>(p); });
}

int64_t cpu_workers(const at::Tensor&) { return at::get_num_threads(); }

// Tasks of at least 8 tokens keep the partial-sum workspace small next to the data.
const Backend kCpu{forward_cpu, backward_cpu, cpu_workers, 8};

}  // namespace

TORCH_LIBRARY_IMPL(raekern, CPU, m) {
  m.impl("rms_norm", [](const at::Tensor& x, const OptTensor& w, double eps) { return rms_norm(kCpu, x, w, eps); });
  m.impl("rms_norm_backward", [](const at::Tensor& go, const at::Tensor& x, const OptTensor& w,
                                 const at::Tensor& rstd) { return rms_norm_backward(kCpu, go, x, w, rstd); });
  m.impl("layer_norm", [](const at::Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
    return layer_norm(kCpu, x, w, b, eps);
  });
  m.impl("layer_norm_backward", [](const at::Tensor& go, const at::Tensor& x, const OptTensor& w,
                                   const OptTensor& b, const at::Tensor& mean, const at::Tensor& rstd) {
    return layer_norm_backward(kCpu, go, x, w, b, mean, rstd);
  });
  m.impl("norm_modulate", [](const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                             c10::string_view kind, const OptTensor& w, const OptTensor& b, double eps) {
    return norm_modulate(kCpu, x, shift, scale, kind, w, b, eps);
  });
  m.impl("norm_modulate_backward",
         [](const at::Tensor& go, const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
            c10::string_view kind, const OptTensor& w, const OptTensor& b, const at::Tensor& mean,
            const at::Tensor& rstd) {
           return norm_modulate_backward(kCpu, go, x, shift, scale, kind, w, b, mean, rstd);
         });
  m.impl("gated_residual", [](const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
    return gated_residual(kCpu, x, gate, y);
  });
  m.impl("gated_residual_backward", [](const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& y) {
    return gated_residual_backward(kCpu, grad, gate, y);
  });
  m.impl("gated_residual_norm_modulate",
         [](const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y, const at::Tensor& shift,
            const at::Tensor& scale, c10::string_view kind, const OptTensor& w, const OptTensor& b,
            double eps) { return gated_residual_norm_modulate(kCpu, x, gate, y, shift, scale, kind, w, b, eps); });
  m.impl("gated_residual_norm_modulate_backward",
         [](const OptTensor& gxo, const OptTensor& go, const at::Tensor& x_out, const at::Tensor& gate,
            const at::Tensor& y, const at::Tensor& shift, const at::Tensor& scale, c10::string_view kind,
            const OptTensor& w, const OptTensor& b, const at::Tensor& mean, const at::Tensor& rstd) {
           return gated_residual_norm_modulate_backward(kCpu, gxo, go, x_out, gate, y, shift, scale, kind, w, b,
                                                        mean, rstd);
         });
}

}  // namespace raekern::norm
