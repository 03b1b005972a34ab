// Register-blocked inner kernels of the guidance CPU step, specialised on the number of streams so
// that every stream of a block (one vector register, guidance_vec_cpu.h) lives in a register: the
// output combination (no per-element branch, no intermediate buffer, one read of each used input
// and one write of each output) and the per-chunk Gram matrix / sums of the statistics pass.
// Configurations outside the instantiated range return nullptr from the pickers and the caller uses
// its generic buffered path.
//
// Precision: both kernels work in the rebased basis of guidance_solve.h. A branch difference
// P_k - P_base is formed in registers (exact in fp32 when the branches are close, Sterbenz) and only
// then multiplied by its coefficient, so a guidance weight never amplifies the rounding of the
// branches themselves. Folding the differences into the base coefficient (c_base - Σ c_k)·P_base +
// Σ c_k·P_k is cheaper by nothing on a memory-bound loop and loses w × ulp(P) when P_k ≈ P_base.
#pragma once
#include <cmath>
#include <cstdint>

#include "guidance/guidance_vec_cpu.h"

namespace raekern::guidance::blocks {

using cpu::acc_t;

constexpr int kMaxFixedInputs = 6;  // storage-typed inputs of one combination (x, branches, x_prev, u_prev)
constexpr int kMaxFixedDiffs = 3;   // difference streams of one combination (K <= 4 branches)
// Elements ahead of the Gram pass's loads that it prefetches into L2. The statistics pass is a pure
// read stream with little arithmetic per line; left to the hardware prefetchers it ran at about half
// the bandwidth of the output pass (a third of the statistics pass's time saved with this distance,
// measured on bf16 RAE latents; past the end of a row it touches the next sample, never faults).
constexpr int64_t kGramPrefetch = 4096;

// One sample's output combination: outputs o < NO are storage-typed (out, x0), the next NMO are
// accumulator-typed (momentum); inputs s < NS storage-typed, then NMI accumulator-typed. When ND > 0,
// in[0] is the base branch and in[1..ND] the raw branches whose difference with it is the stream.
// Coefficients are the solve's rebased ones, unchanged. Every output is evaluated in the same order,
// c0·v0 then one fused multiply-add per further input, so a stream with a zero value (the difference
// of identical branches) leaves the result bit-identical to the combination without it.
template <class T>
struct CombinePlan {
  using A = acc_t<T>;
  const T* in[kMaxFixedInputs] = {};
  const A* min[1] = {};
  T* out[2] = {};
  A* mout[1] = {};
  A coef[3][kMaxFixedInputs + 1] = {};
  bool stream = false;  // outputs written with non-temporal stores (every output row 64-byte aligned)
  void (*fn)(const CombinePlan&, int64_t, int64_t) = nullptr;
};

template <class T, int NS, int ND, int NMI, int NO, int NMO, bool NT>
inline void combine_loop(const T* const* in, const acc_t<T>* const* min, T* const* out, acc_t<T>* mout,
                         const acc_t<T> (&c)[NO + NMO][NS + NMI], int64_t& i, int64_t n) {
  using A = acc_t<T>;
  using V = vec::block_t<A>;
  constexpr int L = vec::lanes<A>, NI = NS + NMI;
  V cv[NO + NMO][NI];  // broadcast once per task; the coefficient blocks stay in registers
  for (int o = 0; o < NO + NMO; ++o)
    for (int s = 0; s < NI; ++s) cv[o][s] = V{} + c[o][s];
  for (; i + L <= n; i += L) {
    V v[NI];
    for (int s = 0; s < NS; ++s) v[s] = vec::load(in[s] + i);
    for (int s = 1; s <= ND; ++s) v[s] -= v[0];
    for (int s = 0; s < NMI; ++s) v[NS + s] = vec::load(min[s] + i);
    for (int o = 0; o < NO + NMO; ++o) {
      V a = cv[o][0] * v[0];
      for (int s = 1; s < NI; ++s) a = vec::fma<A>(cv[o][s], v[s], a);
      if (o < NO) {
        if constexpr (NT) vec::store_nt(out[o] + i, a);
        else vec::store(out[o] + i, a);
      } else {
        if constexpr (NT) vec::store_nt(mout + i, a);
        else vec::store(mout + i, a);
      }
    }
  }
}

template <class T, int NS, int ND, int NMI, int NO, int NMO>
void combine_fixed(const CombinePlan<T>& p, int64_t i0, int64_t n) {
  static_assert(ND < NS, "the base branch is one of the NS inputs");
  using A = acc_t<T>;
  constexpr int L = vec::lanes<A>, NI = NS + NMI;
  const T* in[NS];
  const A* min[NMI > 0 ? NMI : 1] = {};
  A c[NO + NMO][NI];
  for (int s = 0; s < NS; ++s) in[s] = p.in[s] + i0;
  for (int s = 0; s < NMI; ++s) min[s] = p.min[s] + i0;
  for (int o = 0; o < NO + NMO; ++o)
    for (int s = 0; s < NI; ++s) c[o][s] = p.coef[o][s];
  T* out[NO];
  for (int o = 0; o < NO; ++o) out[o] = p.out[o] + i0;
  A* mout = NMO ? p.mout[0] + i0 : nullptr;

  int64_t i = 0;
  if (p.stream && vec::kHaveStreamStores && (i0 % L) == 0) {
    combine_loop<T, NS, ND, NMI, NO, NMO, true>(in, min, out, mout, c, i, n);
    vec::stream_fence();
  } else {
    combine_loop<T, NS, ND, NMI, NO, NMO, false>(in, min, out, mout, c, i, n);
  }
  for (; i < n; ++i) {
    A v[NI];
    for (int s = 0; s < NS; ++s) v[s] = cpu::widen(in[s][i]);
    for (int s = 1; s <= ND; ++s) v[s] -= v[0];
    for (int s = 0; s < NMI; ++s) v[NS + s] = min[s][i];
    for (int o = 0; o < NO + NMO; ++o) {
      A a = c[o][0] * v[0];
      for (int s = 1; s < NI; ++s) a = std::fma(c[o][s], v[s], a);
      if (o < NO)
        out[o][i] = cpu::narrow<T>(a);
      else
        mout[i] = a;
    }
  }
}

template <class T>
using CombineFn = void (*)(const CombinePlan<T>&, int64_t, int64_t);

template <class T, int NS, int ND, int NMI, int NMO>
CombineFn<T> pick_outputs(int no) {
  if (no == 1) return &combine_fixed<T, NS, ND, NMI, 1, NMO>;
  if (no == 2) return &combine_fixed<T, NS, ND, NMI, 2, NMO>;
  return nullptr;
}

template <class T, int NS, int ND>
CombineFn<T> pick_momentum(int nmi, int no, int nmo) {
  if (nmo == 0 && nmi == 0) return pick_outputs<T, NS, ND, 0, 0>(no);
  if (nmo == 1 && nmi == 0) return pick_outputs<T, NS, ND, 0, 1>(no);
  if (nmo == 1 && nmi == 1) return pick_outputs<T, NS, ND, 1, 1>(no);
  return nullptr;
}

template <class T, int NS>
CombineFn<T> pick_diffs(int nd, int nmi, int no, int nmo) {
  if constexpr (NS > 3) {
    if (nd == 3) return pick_momentum<T, NS, 3>(nmi, no, nmo);
  }
  if constexpr (NS > 2) {
    if (nd == 2) return pick_momentum<T, NS, 2>(nmi, no, nmo);
  }
  if constexpr (NS > 1) {
    if (nd == 1) return pick_momentum<T, NS, 1>(nmi, no, nmo);
  }
  if (nd == 0) return pick_momentum<T, NS, 0>(nmi, no, nmo);
  return nullptr;
}

// ns storage-typed inputs (at least one) of which nd are difference streams, nmi momentum inputs,
// no storage-typed outputs, nmo momentum outputs.
template <class T>
CombineFn<T> pick_combine(int ns, int nd, int nmi, int no, int nmo) {
  if (nd > kMaxFixedDiffs) return nullptr;
  switch (ns) {
    case 1: return pick_diffs<T, 1>(nd, nmi, no, nmo);
    case 2: return pick_diffs<T, 2>(nd, nmi, no, nmo);
    case 3: return pick_diffs<T, 3>(nd, nmi, no, nmo);
    case 4: return pick_diffs<T, 4>(nd, nmi, no, nmo);
    case 5: return pick_diffs<T, 5>(nd, nmi, no, nmo);
    case 6: return pick_diffs<T, 6>(nd, nmi, no, nmo);
    default: return nullptr;
  }
}

// Gram matrix (packed upper triangle, gram_index order) and sums of NT storage-typed streams in the
// rebased layout (x, P_base, then P_k - P_base, differences formed in registers before any product)
// followed by NM accumulator-typed momentum streams, over n elements; written as fp64 to out.
// !X: x is not read and its entries are written as 0 (the caller's statistics never involve x, so
// the solve gives them zero weight); saves a third of the statistics pass of a two-branch rule.
template <class T, int NT, int NM, bool X>
void gram_fixed(const T* const* in, const acc_t<T>* const* min, int64_t n, double* out) {
  using A = acc_t<T>;
  using V = vec::block_t<A>;
  constexpr int L = vec::lanes<A>, NG = NT + NM, NP = NG * (NG + 1) / 2;
  V acc[NP], sum[NG];
  for (int p = 0; p < NP; ++p) acc[p] = V{};
  for (int e = 0; e < NG; ++e) sum[e] = V{};
  // Without x, its row of products is skipped rather than multiplied by zero (the compiler may not
  // drop 0·v: v could be infinite), a third of the arithmetic of a two-branch rule.
  constexpr int E0 = X ? 0 : 1;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V v[NG];
    for (int e = E0; e < NT; ++e) __builtin_prefetch(in[e] + i + kGramPrefetch, 0, 2);
    for (int e = 0; e < NM; ++e) __builtin_prefetch(min[e] + i + kGramPrefetch, 0, 2);
    v[0] = X ? vec::load(in[0] + i) : V{};
    for (int e = 1; e < NT; ++e) v[e] = vec::load(in[e] + i);
    for (int e = 2; e < NT; ++e) v[e] -= v[1];
    for (int e = 0; e < NM; ++e) v[NT + e] = vec::load(min[e] + i);
    int p = 0;
    for (int e = 0; e < NG; ++e)
      for (int f = e; f < NG; ++f, ++p)
        if (e >= E0) acc[p] = vec::fma<A>(v[e], v[f], acc[p]);
    for (int e = E0; e < NG; ++e) sum[e] += v[e];
  }
  A tacc[NP] = {}, tsum[NG] = {};
  for (; i < n; ++i) {
    A v[NG];
    v[0] = X ? cpu::widen(in[0][i]) : A(0);
    for (int e = 1; e < NT; ++e) v[e] = cpu::widen(in[e][i]);
    for (int e = 2; e < NT; ++e) v[e] -= v[1];
    for (int e = 0; e < NM; ++e) v[NT + e] = min[e][i];
    int p = 0;
    for (int e = 0; e < NG; ++e)
      for (int f = e; f < NG; ++f, ++p)
        if (e >= E0) tacc[p] = std::fma(v[e], v[f], tacc[p]);
    for (int e = E0; e < NG; ++e) tsum[e] += v[e];
  }
  for (int p = 0; p < NP; ++p) out[p] = double(tacc[p] + vec::hsum<A>(acc[p]));
  for (int e = 0; e < NG; ++e) out[NP + e] = double(tsum[e] + vec::hsum<A>(sum[e]));
}

template <class T>
using GramFn = void (*)(const T* const*, const acc_t<T>* const*, int64_t, double*);

template <class T, bool X>
GramFn<T> pick_gram_x(int nt, int nm) {
  if (nm == 0) {
    if (nt == 2) return &gram_fixed<T, 2, 0, X>;
    if (nt == 3) return &gram_fixed<T, 3, 0, X>;
    if (nt == 4) return &gram_fixed<T, 4, 0, X>;
  } else if (nm == 1) {
    if (nt == 2) return &gram_fixed<T, 2, 1, X>;
    if (nt == 3) return &gram_fixed<T, 3, 1, X>;
    if (nt == 4) return &gram_fixed<T, 4, 1, X>;
  }
  return nullptr;
}

template <class T>
GramFn<T> pick_gram(int nt, int nm, bool read_x) {
  return read_x ? pick_gram_x<T, true>(nt, nm) : pick_gram_x<T, false>(nt, nm);
}

}  // namespace raekern::guidance::blocks
