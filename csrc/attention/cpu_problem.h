// What the CPU forward and backward kernels share: raw pointers and (b, n, h, d) strides of every
// operand, the QK-norm weights widened once, the RoPE table, and the per-batch list of kept keys.
#pragma once
#include <ATen/core/Tensor.h>
#include <cmath>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <optional>
#include <vector>

#include "attention/attention_args.h"
#include "attention/cpu_prologue.h"

namespace raekern::attention::cpu {

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
inline int64_t round64(int64_t n) { return (n + 63) / 64 * 64; }
inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }
// Row stride of the row-major panels: the padded head dim plus one vector, so rows do not all
// land in the same few L1 sets when Dh is a multiple of 64.
inline int64_t panel_ld(int64_t D) { return round16(D) + 16; }
// Transposed panels ([Dh][64 keys] blocks): element (i, key j).
inline int64_t tpanel_index(int64_t D, int64_t i, int64_t j) { return (j / 64) * D * 64 + i * 64 + j % 64; }

// rows [0, n) of a row-major matrix (row stride ld) -> transposed 64-key panels, keys n..round64(n)
// zero. Scattering one row at a time into the panels instead touches D lines per key, and those
// L1-missing stores back up the store buffer (a tenth of the forward's time, measured).
template <class C> inline void transpose_to_panels(const C* __restrict src, int64_t ld, int64_t n, int64_t D,
                                                   C* __restrict dst) {
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t cnt = std::min<int64_t>(64, n - j0);
    C* __restrict panel = dst + (j0 / 64) * D * 64;
    const C* __restrict s = src + j0 * ld;
#if defined(RAEKERN_CPU_VEC16)
    if constexpr (std::is_same_v<C, float>) {
      // 16 keys × 16 dims per register transpose (gathers cost a load per element).
      for (int64_t jj = 0; jj < 64; jj += 16)
        for (int64_t i = 0; i < D; i += 16) {
          const __mmask16 mk = tail_mask(D - i);
          __m512 r[16];
          for (int64_t k = 0; k < 16; ++k)
            r[k] = jj + k < cnt ? raekern::cpu::load16(s + (jj + k) * ld + i, mk) : _mm512_setzero_ps();
          raekern::cpu::transpose16(r);
          for (int64_t c = 0; c < std::min<int64_t>(16, D - i); ++c) _mm512_storeu_ps(panel + (i + c) * 64 + jj, r[c]);
        }
      continue;
    }
#endif
    for (int64_t i = 0; i < D; ++i) {
      int64_t jj = 0;
      for (; jj < cnt; ++jj) panel[i * 64 + jj] = s[jj * ld + i];
      for (; jj < 64; ++jj) panel[i * 64 + jj] = C(0);
    }
  }
}

// Token rows of a [B, N, H, Dh] tensor lie H·Dh elements apart, a new 4 KiB page every row or two,
// where the hardware prefetchers do not follow: gathering them one by one stalls on every row
// (a third of the forward's time, measured). The kernels therefore prefetch rows well ahead of use.
// kWrite: the row is about to be overwritten (fetch it exclusive); kL2: keep it out of L1.
template <bool kWrite = false, bool kL2 = false>
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63));
  const char* e = static_cast<const char*>(p) + bytes;
  for (; c < e; c += 64) __builtin_prefetch(c, kWrite ? 1 : 0, kL2 ? 2 : 3);
}
constexpr int64_t kPrefetchRows = 8;  // rows in flight while a gather loop packs the current one

template <class T, class C> struct Problem {
  Dims d;
  int64_t Dp;  // head dim padded to 16 lanes for the row-major panels
  int64_t Dn;  // head dim rounded to 8: the columns the products with Dh outputs compute (gemm's half vector)
  int64_t ld;  // their row stride
  const T *q, *k, *v;
  Strides4 sq, sk, sv;
  std::vector<C> qw, kw;  // empty: no QK-norm
  C eps;
  double scale;
  RopeTable<C> rope;
  const bool* mask = nullptr;
  int64_t smb = 0, smn = 0;

  Problem(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
          const std::optional<at::Tensor>& qw_, const std::optional<at::Tensor>& kw_,
          const std::optional<at::Tensor>& mask_, double scale_, double eps_, int64_t rh, int64_t rw,
          double theta, int64_t layout)
      : d(dims_of(q_, k_, layout)),
        Dp(round16(d.D)),
        Dn(round8(d.D)),
        ld(panel_ld(d.D)),
        q(q_.data_ptr<T>()),
        k(k_.data_ptr<T>()),
        v(v_.data_ptr<T>()),
        sq(strides_bnhd(q_, layout)),
        sk(strides_bnhd(k_, layout)),
        sv(strides_bnhd(v_, layout)),
        eps(C(eps_)),
        scale(scale_),
        rope(rh, rw, d.D, theta) {
    auto widen_weight = [](const std::optional<at::Tensor>& w, std::vector<C>& out) {
      if (!w) return;
      const at::Tensor t = w->to(sizeof(C) == 8 ? at::kDouble : at::kFloat).contiguous();
      out.assign(t.data_ptr<C>(), t.data_ptr<C>() + t.numel());
    };
    widen_weight(qw_, qw);
    widen_weight(kw_, kw);
    if (mask_) {
      mask = mask_->data_ptr<bool>();
      smb = mask_->stride(0);
      smn = mask_->stride(1);
    }
  }

  const C* qwp() const { return qw.empty() ? nullptr : qw.data(); }
  const C* kwp() const { return kw.empty() ? nullptr : kw.data(); }
  const T* q_row(int64_t b, int64_t n, int64_t h) const { return q + b * sq.b + n * sq.n + h * sq.h; }
  const T* k_row(int64_t b, int64_t n, int64_t h) const { return k + b * sk.b + n * sk.n + h * sk.h; }
  const T* v_row(int64_t b, int64_t n, int64_t h) const { return v + b * sv.b + n * sv.n + h * sv.h; }
  template <bool kL2 = false> void prefetch_q(int64_t b, int64_t n, int64_t h) const {
    prefetch_row<false, kL2>(q_row(b, n, h), d.D * sizeof(T));
  }
  template <bool kL2 = false> void prefetch_kv(int64_t b, int64_t n, int64_t h) const {
    prefetch_row<false, kL2>(k_row(b, n, h), d.D * sizeof(T));
    prefetch_row<false, kL2>(v_row(b, n, h), d.D * sizeof(T));
  }

  // Indices of the keys batch b attends to: masked keys are dropped from the panels altogether.
  void kept_keys(int64_t b, std::vector<int64_t>& idx) const {
    idx.clear();
    for (int64_t n = 0; n < d.Nk; ++n)
      if (!mask || mask[b * smb + n * smn]) idx.push_back(n);
  }
};

// Tasks handed out one at a time to whichever thread is free (rather than a static split): on a
// machine shared with other work one slowed thread otherwise holds all the others at the end. A
// thread claims its next task before running the current one, so the current one can prefetch
// for it.
// Claims are spread: in the [B, N, H, Dh] layout the rows of heads h and h + 1 share cache lines, so
// threads running neighbouring heads at once write the same lines (and ping-pong them between
// cores). Consecutive claims are therefore units `n / threads` apart (a unit: the `unit` consecutive
// tasks of one head, its query chunks), so concurrent tasks touch heads far from each other.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t n, int64_t unit = 1) : n_(n), unit_(std::max<int64_t>(1, unit)) {
    const int64_t units = (n_ + unit_ - 1) / unit_, T = threads();
    if (T < 2 || units < 2) return;
    const int64_t span = (units + T - 1) / T;  // units per stripe; claim c runs stripe c % T
    order_.reserve(units);
    for (int64_t i = 0; i < span; ++i)
      for (int64_t t = 0; t < T; ++t)
        if (t * span + i < units) order_.push_back(t * span + i);
  }
  int64_t claim() {
    const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
    if (t >= n_) return -1;
    return order_.empty() ? t : order_[t / unit_] * unit_ + t % unit_;
  }
  // The range to give at::parallel_for (grain 1): one call per thread, each looping over claim().
  int64_t threads() const { return std::max<int64_t>(1, std::min<int64_t>(n_, at::get_num_threads())); }

 private:
  std::atomic<int64_t> next_{0};
  int64_t n_, unit_;
  std::vector<int64_t> order_;
};

// Per-thread head-major copy of one batch's q/k/v rows for a small group of heads. In the
// [B, N, H, Dh] layout a head's rows are H·Dh apart, a page each, so a task gathering one head's
// rows touches a new page (and a cache line shared with the next head) per row; the group's rows of
// one token, however, are one contiguous block, which this copies token by token. The group is sized
// so the copy stays in L2 (kStageBytes): staging all heads of a batch at once measured slower than
// not staging at all. The kernels then read `view`, a Problem whose q/k/v point into the copy
// (strides {0, Dh, N·Dh, 1}).
template <class T, class C> struct HeadStage {
  Problem<T, C> view;
  std::vector<T> buf;
  int64_t b = -1, h0 = 0, h1 = -1;

  explicit HeadStage(const Problem<T, C>& P) : view(P) {}

  static constexpr int64_t kStageBytes = 640 << 10;
  // Heads per group: 1 (no staging) when the rows are adjacent already or two heads do not fit.
  static int64_t group(const Problem<T, C>& P) {
    const int64_t D = P.d.D;
    if (P.d.H < 2 || (P.sq.n == D && P.sk.n == D && P.sv.n == D)) return 1;
    const int64_t per_head = std::max<int64_t>(1, (P.d.Nq + 2 * P.d.Nk) * D * int64_t(sizeof(T)));
    return std::max<int64_t>(1, std::min<int64_t>(P.d.H, kStageBytes / per_head));
  }

  // Heads [ha, hb] of batch bb, staged on first use.
  const Problem<T, C>& get(const Problem<T, C>& P, int64_t bb, int64_t ha, int64_t hb) {
    if (bb == b && ha >= h0 && hb <= h1) return view;
    b = bb;
    h0 = ha;
    h1 = hb;
    const int64_t nh = hb - ha + 1, D = P.d.D, Nq = P.d.Nq, Nk = P.d.Nk;
    buf.resize(nh * (Nq + 2 * Nk) * D);
    T* q = buf.data();
    T* k = q + nh * Nq * D;
    T* v = k + nh * Nk * D;
    copy_heads(P.q + bb * P.sq.b, P.sq, Nq, ha, nh, D, q);
    copy_heads(P.k + bb * P.sk.b, P.sk, Nk, ha, nh, D, k);
    copy_heads(P.v + bb * P.sv.b, P.sv, Nk, ha, nh, D, v);
    // Row (n, h) of the copy is at base + (h - ha)·N·Dh + n·Dh, whatever the batch index.
    view.q = q - ha * Nq * D;
    view.k = k - ha * Nk * D;
    view.v = v - ha * Nk * D;
    view.sq = {0, D, Nq * D, 1};
    view.sk = view.sv = {0, D, Nk * D, 1};
    return view;
  }

 private:
  // Rows are a few hundred bytes: an inline vector copy, not a memcpy call per row.
  static void copy_row(const T* __restrict src, int64_t bytes, T* __restrict dst) {
#if defined(__AVX512BW__)
    const char* s = reinterpret_cast<const char*>(src);
    char* d = reinterpret_cast<char*>(dst);
    int64_t o = 0;
    for (; o + 64 <= bytes; o += 64) _mm512_storeu_si512(d + o, _mm512_loadu_si512(s + o));
    if (o < bytes) {
      const __mmask64 mk = (~0ull) >> (64 - (bytes - o));
      _mm512_mask_storeu_epi8(d + o, mk, _mm512_maskz_loadu_epi8(mk, s + o));
    }
#else
    std::memcpy(dst, src, bytes);
#endif
  }
  static void copy_heads(const T* src, const Strides4& s, int64_t N, int64_t ha, int64_t nh, int64_t D, T* dst) {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t span = ((nh - 1) * s.h + D) * int64_t(sizeof(T));  // the heads' rows are one block
      if (n + 4 < N && span <= 16384) prefetch_row(src + (n + 4) * s.n + ha * s.h, span);
      for (int64_t j = 0; j < nh; ++j) copy_row(src + n * s.n + (ha + j) * s.h, D * sizeof(T), dst + (j * N + n) * D);
    }
  }
};


// The forward's tasks, (batch·head)·chunks + chunk, handed to the threads. With head-group staging
// (HeadStage::group > 1, only when each (batch, head) is one task) a thread claims a group of heads
// of one batch, stages it and runs its tasks; otherwise tasks are claimed one at a time.
template <class T, class C> class TaskSource {
 public:
  // stage: allow head-group staging (it pays in the fp32 kernel, +3-12 % measured; the bf16 tile
  // kernel, whose rows are half the bytes and whose per-row work is cheaper, measured slower with it).
  TaskSource(const Problem<T, C>& P, int64_t chunks, bool stage)
      : G_(stage && chunks == 1 ? HeadStage<T, C>::group(P) : 1),
        per_batch_((P.d.H + G_ - 1) / G_),
        queue_(G_ > 1 ? P.d.B * per_batch_ : P.d.B * P.d.H * chunks, G_ > 1 ? 1 : chunks) {}
  int64_t threads() const { return queue_.threads(); }
  // On one thread: fn(R, task, next, inputs) for every task it claims, R the Problem to read rows
  // from, next its following task (-1: none), inputs false when R is a staged copy (nothing to prefetch).
  template <class Fn> void run_thread(const Problem<T, C>& P, Fn&& fn) {
    if (G_ == 1) {
      for (int64_t task = queue_.claim(), next; task >= 0; task = next) {
        next = queue_.claim();
        fn(P, task, next, true);
      }
      return;
    }
    HeadStage<T, C> stage(P);
    for (int64_t g = queue_.claim(); g >= 0; g = queue_.claim()) {
      const int64_t b = g / per_batch_, h0 = (g % per_batch_) * G_, h1 = std::min(P.d.H, h0 + G_) - 1;
      const Problem<T, C>& R = stage.get(P, b, h0, h1);
      for (int64_t h = h0; h <= h1; ++h) fn(R, b * P.d.H + h, h < h1 ? b * P.d.H + h + 1 : -1, false);
    }
  }

 private:
  int64_t G_, per_batch_;
  TaskQueue queue_;
};

// What a forward query tile prefetches while it computes, a few rows per call (issued all at once
// they stall on the fill buffers): the output rows the tile will write, the next tile's queries,
// and, spread over the tiles of a task, the next task's keys and values. Tasks are
// (batch·head, chunk of query tiles); `next` is the task this thread runs next (-1: none).
template <class T, class C> struct Lookahead {
  const Problem<T, C>& P;
  T* out;
  Strides4 so;
  int64_t b, h, i0, bq, rows;
  int64_t qb = 0, qh = 0, q0 = 0, q1 = 0, kvb = 0, kvh = 0, kv0 = 0, kv1 = 0, per = 0;

  Lookahead(const Problem<T, C>& P_, T* out_, const Strides4& so_, int64_t task, int64_t next, int64_t chunks,
            int64_t tiles_per_chunk, int64_t rows_, int64_t tile, int64_t t0, int64_t t1, bool inputs = true)
      : P(P_), out(out_), so(so_), rows(rows_) {
    const Dims& d = P.d;
    const int64_t bh = task / chunks;
    b = bh / d.H;
    h = bh % d.H;
    i0 = tile * rows;
    bq = std::min(rows, d.Nq - i0);
    if (!inputs) return;  // staged (HeadStage): the inputs are already close
    if (tile + 1 < t1) {
      qb = b;
      qh = h;
      q0 = i0 + rows;
      q1 = std::min(d.Nq, q0 + rows);
    } else if (next >= 0) {
      const int64_t nbh = next / chunks;
      qb = nbh / d.H;
      qh = nbh % d.H;
      q0 = (next % chunks) * tiles_per_chunk * rows;
      q1 = std::min(d.Nq, q0 + rows);
    }
    if (next >= 0 && next / chunks != bh) {
      const int64_t nbh = next / chunks, nt = t1 - t0;
      kvb = nbh / d.H;
      kvh = nbh % d.H;
      kv0 = (tile - t0) * d.Nk / nt;
      kv1 = (tile - t0 + 1) * d.Nk / nt;
      per = (kv1 - kv0 + rows - 1) / rows;
    }
  }
  // Row r in [0, rows) of the tile's share.
  void operator()(int64_t r) const {
    if (r < bq) prefetch_row<true>(out + b * so.b + (i0 + r) * so.n + h * so.h, P.d.D * sizeof(T));
    if (q0 + r < q1) P.template prefetch_q<true>(qb, q0 + r, qh);
    for (int64_t n = kv0 + r * per; n < std::min(kv1, kv0 + (r + 1) * per); ++n) P.template prefetch_kv<true>(kvb, n, kvh);
  }
};

}  // namespace raekern::attention::cpu
