// CPU kernels of the norm family (see norm_params.h for the fused row operation) and the CPU
// registration of its ten ops. One task = a range of tokens of one sample, so per-sample operands
// (shift/scale/gate of shape [B, 1, D]) are widened once per task and their gradients are summed in
// task-local fp32 buffers; only those [tasks, D] partial sums leave the kernel.
// Each row is read from memory once: it is widened into an L1-resident fp32 buffer and every later
// step (statistics, normalisation, both outputs) works on that buffer with vectorised loops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_cache.h"
#include "common/cpu_convert.h"
#include "common/dispatch.h"
#include "norm/norm_host.h"
#include "norm/norm_rows_cpu.h"

namespace raekern::norm {
namespace {

using cpu::acc_t;
using namespace rows;  // the per-ISA row functions and has_vec / kStreams

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
    // Summed relative to the first value: a constant row gets mean == x exactly (s * (1/D) is not
    // exact, and rstd = 1/sqrt(eps) would turn that rounding into an output of ~1 instead of 0).
    const A c = xb[0];
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < D; ++i) s += xb[i] - c;
    mean = c + s * inv_d;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += (xb[i] - mean) * (xb[i] - mean);
  } else {
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += xb[i] * xb[i];
  }
  return {mean, A(1) / std::sqrt(ss * inv_d + A(eps))};
}

// Small problems run on the calling thread: waking the pool costs more than the work.
inline int64_t grain_for(int64_t tasks, int64_t elements) {
  return elements < (int64_t(1) << 15) ? std::max<int64_t>(tasks, 1) : 1;
}

// Output size from which the forward streams its stores past the caches.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// The next token's row of a per-token operand that is not laid out right after this one (a chunk of
// an adaLN output: rows 6*D apart), or nullptr. The hardware prefetchers follow each row but restart
// cold at every jump; rows read through this pointer are prefetched one token ahead.
template <class T>
inline const T* next_strided_row(const Operand& o, int64_t b, int64_t n, int64_t n_end, int64_t D) {
  if (!o.ptr || o.sn == 0 || o.sn == D || n + 1 >= n_end) return nullptr;
  return row_of<T>(o, b, n + 1);
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
  // Hand-vectorised rows need unit feature strides; fp64 (reference precision) uses the generic path.
  const bool vec_rows = has_vec<T> && p.x.sd == 1 && (!residual || (p.gate.sd == 1 && p.y.sd == 1));
  // Outputs much larger than the caches are written with non-temporal stores (saves the
  // read-for-ownership of every output line); needs cache-line aligned rows.
  const int64_t out_bytes = B * N * D * int64_t(sizeof(T)) * ((residual ? 1 : 0) + (norm ? 1 : 0));
  // On Zen 4 the streamed forward lost wherever its reads and writes fit the L3 (fp32 2048x1152:
  // rms_norm 1.21x and per-sample norm_modulate 1.16-1.22x slower in two sessions' A/Bs), and gained or
  // broke even beyond it (residual and per-token forms at the same shape 1.2-1.5x faster streamed):
  // benchmarks/results/2026-12-01-cpu-epyc-2core-stream-ab*.txt. Sapphire Rapids streamed faster at
  // 2048x1152 and keeps the size rule alone.
  const int64_t per_row_reads = 1 + (residual ? 1 : 0) + (gate_per_row ? 1 : 0) +
                                (p.shift.ptr && p.shift.sn != 0 ? 1 : 0) + (p.scale.ptr && p.scale.sn != 0 ? 1 : 0);
  const bool fits_llc = cpu::cpu_is_amd() && !cpu::stream_bytes_setting() &&
                        out_bytes + B * N * D * int64_t(sizeof(T)) * per_row_reads <= cpu::llc_bytes();
  const bool stream = kStreams && vec_rows && !fits_llc && out_bytes >= cpu::stream_threshold(kStreamBytes) && (D * int64_t(sizeof(T))) % 64 == 0 &&
                      (!p.out || reinterpret_cast<uintptr_t>(p.out) % 64 == 0) &&
                      (!p.x_out || reinterpret_cast<uintptr_t>(p.x_out) % 64 == 0);
  // Per-token shift/scale: fold them into the output loop instead of precomputing coefficients.
  const bool vec_token = vec_rows && coef_per_row && (!p.shift.ptr || p.shift.sd == 1) &&
                         (!p.scale.ptr || p.scale.sd == 1);
  const A* w = static_cast<const A*>(p.weight);
  const A* bias = static_cast<const A*>(p.bias);
  const bool plain = !w && !bias && !p.shift.ptr && !p.scale.ptr;  // out = xhat
  A* mean_out = static_cast<A*>(p.mean);
  A* rstd_out = static_cast<A*>(p.rstd);

  at::parallel_for(0, B * plan.chunks, grain_for(B * plan.chunks, B * N * D), [&](int64_t t0, int64_t t1) {
    Scratch<A> s(6, D);
    A *xb = s[0], *ca = s[1], *cb = s[2], *gb = s[3], *t1b = s[4], *t2b = s[5];
    int64_t coef_b = -1, gate_b = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / plan.chunks, n0 = (t % plan.chunks) * plan.rows_per_task;
      const int64_t n1 = std::min(N, n0 + plan.rows_per_task);
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t row = b * N + n;
        T* xo = residual ? static_cast<T*>(p.x_out) + row * D : nullptr;
        A mean = 0, rstd = 0;
        // Stage 1: xb = x (+ gate*y), x_out written, statistics.
        if (vec_rows) {
          vec_residual_stats<T>(row_of<T>(p.x, b, n), residual ? row_of<T>(p.gate, b, n) : nullptr,
                                residual ? row_of<T>(p.y, b, n) : nullptr, xo, D, xb, p.kind, p.eps, mean, rstd, stream,
                                residual ? next_strided_row<T>(p.gate, b, n, n1, D) : nullptr);
        } else {
          widen<T>(p.x, b, n, D, xb);
          if (residual) {
            if (gate_per_row || gate_b != b) {
              widen<T>(p.gate, b, n, D, gb);
              gate_b = b;
            }
            widen<T>(p.y, b, n, D, t1b);
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) xb[i] += gb[i] * t1b[i];
            // Normalise the rounded residual, as an unfused x' = x + g*y; h = norm(x') would.
            cpu::narrow_row<T>(xb, D, xo);
            if constexpr (!std::is_same_v<T, A>) cpu::widen_row<T>(xo, 1, D, xb);
          }
          if (norm) std::tie(mean, rstd) = row_stats(xb, D, p.kind, p.eps);
        }
        if (!norm) continue;
        mean_out[row] = mean;
        rstd_out[row] = rstd;
        T* out = static_cast<T*>(p.out) + row * D;
        if (vec_token) {
          vec_output_token<T>(xb, w, bias, p.shift.ptr ? row_of<T>(p.shift, b, n) : nullptr,
                              p.scale.ptr ? row_of<T>(p.scale, b, n) : nullptr, rstd, mean, D, out, stream,
                              next_strided_row<T>(p.shift, b, n, n1, D), next_strided_row<T>(p.scale, b, n, n1, D));
          continue;
        }
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
        if (vec_rows) {
          const bool more = n + 1 < n1;
          vec_output<T>(xb, plain ? nullptr : ca, p.shift.ptr || bias ? cb : nullptr, rstd, mean, D, out, stream,
                        more ? row_of<T>(p.x, b, n + 1) : nullptr, more && !stream ? out + D : nullptr);
        } else {
          // Through a scratch row: GCC's loop writing `out` directly ran several times slower.
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) t1b[i] = (xb[i] - mean) * rstd * ca[i] + cb[i];
          narrow<T>(t1b, D, out);
        }
      }
    }
#ifdef RAEKERN_CPU_VEC16
    if (stream) _mm_sfence();  // make the streamed lines visible before the join
#endif
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
  const auto unit = [](const Operand& o) { return !o.ptr || o.sd == 1; };
  // Hand-vectorised rows need unit feature strides; fp64 (reference precision) uses the generic path.
  const bool vec_rows = has_vec<T> && p.xin.sd == 1 && unit(p.dout) && unit(p.dxo) && unit(p.scale) &&
                        unit(p.gate) && unit(p.y);
  // As in the forward: outputs far larger than the caches bypass them (no read-for-ownership).
  const auto aligned = [](const void* q) { return !q || reinterpret_cast<uintptr_t>(q) % 64 == 0; };
  int64_t out_rows = 1 + (residual ? 1 : 0);
  for (const GradSlot* sl : {&p.dgate, &p.dshift, &p.dscale})
    if (sl->mode == GradMode::PerRow) out_rows += 1;
  const bool stream = kStreams && vec_rows && B * N * D * int64_t(sizeof(T)) * out_rows >= cpu::stream_threshold(kStreamBytes) &&
                      (D * int64_t(sizeof(T))) % 64 == 0 && aligned(p.dx) && aligned(p.dy) &&
                      aligned(p.dgate.ptr) && aligned(p.dshift.ptr) && aligned(p.dscale.ptr);

  at::parallel_for(0, B * p.chunks, grain_for(B * p.chunks, B * N * D), [&](int64_t t0, int64_t t1) {
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
        if constexpr (has_vec<T>) {
          if (vec_rows) {
            const auto row_ptr = [&](const GradSlot& sl) -> void* {
              return sl.mode == GradMode::PerRow ? static_cast<T*>(sl.ptr) + row * D : nullptr;
            };
            BwdRowPtrs r;
            r.x = row_of<T>(p.xin, b, n);
            r.dout = norm ? row_of<T>(p.dout, b, n) : nullptr;
            r.dxo = p.dxo.ptr ? row_of<T>(p.dxo, b, n) : nullptr;
            r.scale = p.scale.ptr ? row_of<T>(p.scale, b, n) : nullptr;
            r.gate = residual ? row_of<T>(p.gate, b, n) : nullptr;
            r.y = residual ? row_of<T>(p.y, b, n) : nullptr;
            r.next_scale = norm ? next_strided_row<T>(p.scale, b, n, n1, D) : nullptr;
            r.next_gate = residual ? next_strided_row<T>(p.gate, b, n, n1, D) : nullptr;
            r.dx = static_cast<T*>(p.dx) + row * D;
            r.dy = residual ? static_cast<T*>(p.dy) + row * D : nullptr;
            r.dshift_row = row_ptr(p.dshift), r.dscale_row = row_ptr(p.dscale), r.dgate_row = row_ptr(p.dgate);
            r.acc_shift = acc_shift, r.acc_scale = acc_scale, r.acc_w = acc_w, r.acc_b = acc_b;
            r.acc_gate = acc_gate;
            const A rstd = norm ? rstd_in[row] : A(0);
            const A mean = norm && p.kind == Kind::Layer ? mean_in[row] : A(0);
            vec_backward_row<T>(r, w, bias, mean, rstd, D, p.kind == Kind::Layer, g, stream);
            continue;
          }
        }
        if (norm) {
          const A rstd = rstd_in[row];
          const A mean = p.kind == Kind::Layer ? mean_in[row] : A(0);
          widen<T>(p.xin, b, n, D, xh);
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) xh[i] = (xh[i] - mean) * rstd;
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
#ifdef RAEKERN_CPU_VEC16
    if (stream) _mm_sfence();  // make the streamed lines visible before the join
#endif
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
}  // namespace

const Backend kCpu{forward_cpu, backward_cpu, cpu_workers, 8};

TORCH_LIBRARY_IMPL(raekern, CPU, m) { register_impls<&kCpu>(m); }

}  // namespace raekern::norm
