// CPU kernels of the mlp family (swiglu forward/backward, separate or packed operands) and their
// CPU registration. Work is split into tasks of one row segment (<= kSeg elements of one collapsed
// row, mlp_params.h), so a contiguous problem - one long row - still spreads over every thread.
// Rows with unit inner strides run explicitly vectorised (AVX-512: 16 fp32 lanes, masked tails;
// else AVX2 + FMA: 8 lanes, scalar tails); fp64, strided rows and builds without either use the
// portable loop (fp32/fp64 scratch buffers).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/cpu_convert.h"
#include "common/cpu_vec_math.h"
#include "common/dispatch.h"
#include "mlp/mlp_host.h"

// GCC 12 reports the intrinsics' own _mm512_undefined_ps() operands (abs, roundscale, scalef, rcp14)
// as uninitialized once they are inlined here (GCC bug 105593, a false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace raekern::mlp {
namespace {

using cpu::acc_t;

constexpr int64_t kSeg = 16384;         // elements per task at most (a multiple of 64)
constexpr int64_t kMinTask = 1 << 15;   // elements a parallel chunk should cover at least
constexpr int64_t kBuf = 512;           // portable path: elements widened per step
// Outputs from this size on are written with non-temporal stores (no read-for-ownership).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

template <class T>
inline T* at_off(const Operand& o, int64_t off) {
  return static_cast<T*>(o.ptr) + off;
}

// ---- portable path --------------------------------------------------------------------------

// Rounds m accumulator values into dst[i * stride].
template <class T>
inline void put_row(acc_t<T>* src, int64_t m, T* dst, int64_t stride) {
  if (stride != 1) {
    for (int64_t i = 0; i < m; ++i) dst[i * stride] = static_cast<T>(src[i]);
  } else if constexpr (std::is_same_v<T, acc_t<T>>) {
    std::memcpy(dst, src, m * sizeof(T));
  } else {
    cpu::narrow_row<T>(src, m, dst);
  }
}

template <class T>
void fwd_portable(const T* a, int64_t sa, const T* b, int64_t sb, T* out, int64_t so, int64_t n) {
  using A = acc_t<T>;
  A av[kBuf], bv[kBuf];
  for (int64_t i0 = 0; i0 < n; i0 += kBuf) {
    const int64_t m = std::min(kBuf, n - i0);
    cpu::widen_row<T>(a + i0 * sa, sa, m, av);
    cpu::widen_row<T>(b + i0 * sb, sb, m, bv);
    for (int64_t i = 0; i < m; ++i) av[i] = swiglu_value<A>(av[i], bv[i]);
    put_row<T>(av, m, out + i0 * so, so);
  }
}

template <class T>
void bwd_portable(const T* g, int64_t sg, const T* a, int64_t sa, const T* b, int64_t sb, T* da, int64_t sda,
                  T* db, int64_t sdb, int64_t n) {
  using A = acc_t<T>;
  A gv[kBuf], av[kBuf], bv[kBuf];
  for (int64_t i0 = 0; i0 < n; i0 += kBuf) {
    const int64_t m = std::min(kBuf, n - i0);
    cpu::widen_row<T>(g + i0 * sg, sg, m, gv);
    cpu::widen_row<T>(a + i0 * sa, sa, m, av);
    cpu::widen_row<T>(b + i0 * sb, sb, m, bv);
    for (int64_t i = 0; i < m; ++i) swiglu_grad<A>(gv[i], av[i], bv[i], av[i], bv[i]);
    put_row<T>(av, m, da + i0 * sda, sda);
    put_row<T>(bv, m, db + i0 * sdb, sdb);
  }
}

// ---- AVX-512 path ---------------------------------------------------------------------------

#ifdef RAEKERN_CPU_VEC16
template <class T> constexpr bool has_vec = !std::is_same_v<T, double>;
constexpr bool kCanStream = true;

// exp(x) for x <= 0 (NaN allowed): Cody-Waite reduction x = n·ln2 + f, |f| <= ln2/2, degree-7
// Taylor polynomial of e^f (truncation < 6e-9 relative), scaled by 2^n with scalef, which rounds
// results below the normal range to denormals / 0 instead of wrapping the exponent.
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // e^-104 is below the smallest denormal
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 high part: exact product
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// sigmoid(x), sigmoid(-x) as in mlp_params.h's sigmoid_pair. 1/(1+e) with e in [0, 1]: rcp14 and
// one Newton step (relative error ~1e-8), no division.
inline void sigmoid_pair16(__m512 x, __m512& s, __m512& sc) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  const __m512 d = _mm512_add_ps(one, e);
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
  const __m512 q = _mm512_mul_ps(e, r);
  const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  s = _mm512_mask_blend_ps(pos, q, r);
  sc = _mm512_mask_blend_ps(pos, r, q);
}

// Elements before `p` reaches a 64-byte boundary (so full vectors after them can be streamed).
template <class T>
inline int64_t head_to_line(const T* p, int64_t n) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  return std::min<int64_t>(n, int64_t((64 - addr % 64) % 64) / int64_t(sizeof(T)));
}

// Runs body(i, mask, full) over [0, n) in steps of <= 16; with `align`, the first steps stop at
// the first 64-byte boundary of `align` so every later full step starts a cache-line piece.
template <class T, class F>
inline void vec_loop(int64_t n, const T* align, const F& body) {
  int64_t i = 0;
  if (align) {
    const int64_t head = head_to_line(align, n);
    while (i < head) {
      const int64_t c = std::min<int64_t>(16, head - i);
      body(i, cpu::tail_mask(c), false);
      i += c;
    }
  }
  for (; i + 16 <= n; i += 16) body(i, __mmask16(0xffff), true);
  if (i < n) body(i, cpu::tail_mask(n - i), false);
}

template <class T>
void fwd_vec(const T* a, const T* b, T* out, int64_t n, bool stream) {
  if constexpr (has_vec<T>) {
    vec_loop<T>(n, stream ? out : nullptr, [&](int64_t i, __mmask16 m, bool full) {
      const __m512 va = cpu::load16(a + i, m), vb = cpu::load16(b + i, m);
      __m512 s, sc;
      sigmoid_pair16(va, s, sc);
      cpu::put16(out + i, _mm512_mul_ps(_mm512_mul_ps(va, s), vb), m, stream && full);
    });
  }
}

// db may be streamed only when it shares da's alignment within a cache line.
template <class T>
void bwd_vec(const T* g, const T* a, const T* b, T* da, T* db, int64_t n, bool stream) {
  if constexpr (has_vec<T>) {
    const bool stream_db = stream && (reinterpret_cast<uintptr_t>(db) - reinterpret_cast<uintptr_t>(da)) % 64 == 0;
    const __m512 one = _mm512_set1_ps(1.f);
    vec_loop<T>(n, stream ? da : nullptr, [&](int64_t i, __mmask16 m, bool full) {
      const __m512 vg = cpu::load16(g + i, m), va = cpu::load16(a + i, m), vb = cpu::load16(b + i, m);
      __m512 s, sc;
      sigmoid_pair16(va, s, sc);
      const __m512 gs = _mm512_mul_ps(vg, s);
      cpu::put16(db + i, _mm512_mul_ps(gs, va), m, stream_db && full);
      cpu::put16(da + i, _mm512_mul_ps(_mm512_mul_ps(gs, vb), _mm512_fmadd_ps(va, sc, one)), m, stream && full);
    });
  }
}
#elif defined(RAEKERN_CPU_VEC8)
// ---- AVX2 path (CPUs without AVX-512, e.g. Zen 3) --------------------------------------------
// The same formulas 8 lanes at a time, read from and written to the rows directly; row tails take
// the portable loop. The portable loop alone (a libm exp per element, scratch copies) ran at 0.14x
// torch.compile on a Zen 3 (measured 2026-12-01).
template <class T> constexpr bool has_vec = !std::is_same_v<T, double>;
constexpr bool kCanStream = false;  // the AVX2 loops store normally

inline __m256 exp_nonpos8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-104.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  return cpu::scalef8(p, n);  // n in [-150, 0]
}

// sigmoid(x), sigmoid(-x) as in mlp_params.h's sigmoid_pair.
inline void sigmoid_pair8(__m256 x, __m256& s, __m256& sc) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp_nonpos8(_mm256_or_ps(x, _mm256_set1_ps(-0.f)));  // -|x|
  const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
  const __m256 q = _mm256_mul_ps(e, r);
  const __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
  s = _mm256_blendv_ps(q, r, pos);
  sc = _mm256_blendv_ps(r, q, pos);
}

template <class T>
void fwd_vec(const T* a, const T* b, T* out, int64_t n, bool) {
  if constexpr (has_vec<T>) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 va = cpu::load8(a + i), vb = cpu::load8(b + i);
      __m256 s, sc;
      sigmoid_pair8(va, s, sc);
      cpu::store8(out + i, _mm256_mul_ps(_mm256_mul_ps(va, s), vb));
    }
    if (i < n) fwd_portable<T>(a + i, 1, b + i, 1, out + i, 1, n - i);
  }
}

template <class T>
void bwd_vec(const T* g, const T* a, const T* b, T* da, T* db, int64_t n, bool) {
  if constexpr (has_vec<T>) {
    const __m256 one = _mm256_set1_ps(1.f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 vg = cpu::load8(g + i), va = cpu::load8(a + i), vb = cpu::load8(b + i);
      __m256 s, sc;
      sigmoid_pair8(va, s, sc);
      const __m256 gs = _mm256_mul_ps(vg, s);
      cpu::store8(db + i, _mm256_mul_ps(gs, va));
      cpu::store8(da + i, _mm256_mul_ps(_mm256_mul_ps(gs, vb), _mm256_fmadd_ps(va, sc, one)));
    }
    if (i < n) bwd_portable<T>(g + i, 1, a + i, 1, b + i, 1, da + i, 1, db + i, 1, n - i);
  }
}
#else
template <class T> constexpr bool has_vec = false;
constexpr bool kCanStream = false;
template <class T> void fwd_vec(const T*, const T*, T*, int64_t, bool) {}
template <class T> void bwd_vec(const T*, const T*, const T*, T*, T*, int64_t, bool) {}
#endif

// ---- driver ---------------------------------------------------------------------------------

template <class T, bool Bwd>
void run(const Params& p) {
  const int64_t L = p.cols, segs = (L + kSeg - 1) / kSeg, tasks = p.rows * segs;
  const int64_t per_task = std::min(L, kSeg), total = p.rows * L;
  const int in = p.ndim - 1;
  // Outputs are contiguous tensors, but the packed backward's d a / d b are halves of one: with H = 1
  // their inner stride is 2.
  const bool unit = p.a.stride[in] == 1 && p.b.stride[in] == 1 &&
                    (Bwd ? p.grad.stride[in] == 1 && p.da.stride[in] == 1 && p.db.stride[in] == 1
                         : p.out.stride[in] == 1);
  const bool vec = has_vec<T> && unit;
  const int64_t out_bytes = total * int64_t(sizeof(T)) * (Bwd ? 2 : 1);
  const bool stream = vec && kCanStream && out_bytes >= cpu::stream_threshold(kStreamBytes);
  // Small problems run on the calling thread: waking the pool costs more than the work.
  const int64_t grain = total < kMinTask ? std::max<int64_t>(tasks, 1)
                                         : std::max<int64_t>(1, kMinTask / std::max<int64_t>(per_task, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / segs, c0 = (t - row * segs) * kSeg, n = std::min(kSeg, L - c0);
      if constexpr (!Bwd) {
        const Operand* ops[3] = {&p.a, &p.b, &p.out};
        int64_t off[3];
        row_offsets(p, row, ops, off);
        const T* a = at_off<T>(p.a, off[0] + c0 * p.a.stride[in]);
        const T* b = at_off<T>(p.b, off[1] + c0 * p.b.stride[in]);
        T* out = at_off<T>(p.out, off[2] + c0 * p.out.stride[in]);
        if (vec) fwd_vec<T>(a, b, out, n, stream);
        else fwd_portable<T>(a, p.a.stride[in], b, p.b.stride[in], out, p.out.stride[in], n);
      } else {
        const Operand* ops[5] = {&p.grad, &p.a, &p.b, &p.da, &p.db};
        int64_t off[5];
        row_offsets(p, row, ops, off);
        const T* g = at_off<T>(p.grad, off[0] + c0 * p.grad.stride[in]);
        const T* a = at_off<T>(p.a, off[1] + c0 * p.a.stride[in]);
        const T* b = at_off<T>(p.b, off[2] + c0 * p.b.stride[in]);
        T* da = at_off<T>(p.da, off[3] + c0 * p.da.stride[in]);
        T* db = at_off<T>(p.db, off[4] + c0 * p.db.stride[in]);
        if (vec) bwd_vec<T>(g, a, b, da, db, n, stream);
        else bwd_portable<T>(g, p.grad.stride[in], a, p.a.stride[in], b, p.b.stride[in], da, p.da.stride[in], db,
                             p.db.stride[in], n);
      }
    }
#ifdef RAEKERN_CPU_VEC16
    if (stream) _mm_sfence();  // make the streamed lines visible before the join
#endif
  });
}

void forward_cpu(const Params& p, at::ScalarType st) {
  RAEKERN_DISPATCH_FLOATING(st, "raekern.swiglu", [&] { run<scalar_t, false>(p); });
}

void backward_cpu(const Params& p, at::ScalarType st) {
  RAEKERN_DISPATCH_FLOATING(st, "raekern.swiglu_backward", [&] { run<scalar_t, true>(p); });
}

}  // namespace

const Backend kCpu{forward_cpu, backward_cpu};

TORCH_LIBRARY_IMPL(raekern, CPU, m) { register_impls<&kCpu>(m); }

}  // namespace raekern::mlp
