"""Guidance family (DESIGN §3.4, §4.3): the fused multi-branch guidance step and GFCG selection.

Conventions (rectified flow, as RAE/RAEv2 and SiT/REPA use them): ``x_t = (1 - t)·x0 + t·eps``,
``t = 1`` is noise, ``t = 0`` data, the velocity is ``u = eps - x0``. A branch in parameterization
"velocity", "x0" or "eps" converts with ``x0 = x - t·u`` and ``eps = x + (1 - t)·u``.

What ``guidance_step`` computes, per sample ``b`` (docs/guidance.md has the long form):

1. Every branch is read in its declared parameterization; the combination happens in the *work
   space* (the branches' common parameterization, or velocity when they differ).
2. ``G = Y[base]``; for each term ``j = (pos, neg)`` with weight ``w_j[b]·mask[b, j]``, a
   displacement ``D_j`` is formed in the term's statistics space ``Z_j`` and added as ``G += w_j·D_j``
   (converted to the work space, where displacements scale by ``B_W / B_Z`` with ``B`` = 1, -t, 1-t for
   velocity, x0, eps):

   - ``D_j = Y_pos - Y_neg``; with ``zero_star`` the negative branch is first scaled by
     ``s* = <Y_pos, Y_neg> / (||Y_neg||² + 1e-8)`` (CFG-Zero*);
   - with momentum (APG): ``D_j += beta_j·M_j`` and the new buffer is ``M_j = D_j``;
   - with ``apg_norm_threshold`` r > 0: ``D_j *= min(1, r / ||D_j||)``;
   - with ``apg_eta`` η: ``D_j -= (1 - η)·(<D_j, Y_pos> / max(||Y_pos||, 1e-12)²)·Y_pos``.
3. Guidance rescale ``phi``: ``G *= phi·std(Y_ref)/std(G) + 1 - phi`` with both stds (unbiased, over
   all non-batch dims) taken in ``rescale_space``.
4. ``zero_init[b]``: ``G`` becomes zero velocity (CFG-Zero*'s first steps).
5. Output: ``G`` in ``out_param``; or Euler ``x + (t_next - t)·u_G``; or Heun's second stage.

CFG in the usual scale convention ``U + w·(C - U)`` is ``base = C`` with the term ``(C, U)`` at weight
``w - 1`` (a masked-off term then leaves the conditional prediction, as a guidance interval should);
the policies in :mod:`raekern.sampling.guidance` build these arguments.

Heun convention (``solver="heun2"``): the first stage is a call with ``solver="none",
out_param="velocity"`` returning the guided velocity ``u1`` at ``t``; the caller forms
``x1 = x + (t_next - t)·u1``, evaluates the network at ``(x1, t_next)`` and calls again with
``x=x1, t=t_next_of_stage_1, t_next=t_of_stage_1 (t_prev), x_prev=x, u_prev=u1, solver="heun2"``:
``out = x_prev + (t - t_prev)·(u_prev + u2)/2``.

Autograd: when no per-sample statistic is involved (no CFG-Zero*, APG norm threshold or projection,
rescale) the op is linear in its tensor inputs and the backward is exact (gradients to ``x``,
``branches``, ``momentum``, ``x_prev``, ``u_prev``; not to ``t`` or the weights). With statistics the
scalars depend on the inputs, so a backward treating them as constants would be wrong: backward then
raises a clear "not differentiable" error.

Devices: CPU kernel; CUDA kernels (sm_80/sm_90a), whose GPU tests pass on an H200 (2026-11-30).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple, Sequence, Union

import torch

from raekern._utils.checks import autocast_promote, check_tensor, fail

__all__ = [
    "GuidanceOutput",
    "guidance_step",
    "guidance_step_reference",
    "gfcg_select",
    "gfcg_select_reference",
    "SPACES",
    "SOLVERS",
]

SPACES = {"velocity": 0, "x0": 1, "eps": 2}
SOLVERS = {"none": 0, "euler": 1, "heun2": 2}
_SPACE_NAMES = {v: k for k, v in SPACES.items()}
_OP = "guidance_step"

TensorOrFloat = Union[torch.Tensor, float]


class GuidanceOutput(NamedTuple):
    out: torch.Tensor  # new state (solver) or guided prediction in out_param
    x0: torch.Tensor | None  # guided x0 when return_x0=True
    momentum: torch.Tensor | None  # updated APG buffers [J, B, *S] when momentum is used


# ----------------------------------------------------------------------------------------------
# argument normalisation


def _finite(v) -> bool:
    # Not math.isfinite: under torch.compile(dynamic=True) a float argument is symbolic, and only
    # comparisons trace. NaN and ±inf both compare False.
    return abs(v) < math.inf


def _space(value, arg: str) -> int:
    if isinstance(value, str) and value in SPACES:
        return SPACES[value]
    fail(_OP, arg, f"must be one of {list(SPACES)}, got {value!r}")


def _per_term(value, J: int, arg: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != J:
            fail(_OP, arg, f"must have one entry per term ({J}), got {len(value)}")
        return list(value)
    return [value] * J


def _per_sample(value, B: int, device, arg: str) -> torch.Tensor:
    """float or [B] (or scalar) tensor -> [B] tensor on `device` (no host sync). float32/float64
    tensors stay as they are (a view; the kernels read either), so a step adds no cast kernel."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, B)):
            fail(_OP, arg, f"must be a float or have shape [{B}], got {tuple(value.shape)}")
        if value.device != device:
            fail(_OP, arg, f"must be on {device} like the input, got {value.device}")
        if value.dtype not in (torch.float32, torch.float64):
            value = value.to(torch.float64)
        return value.reshape(-1).expand(B)
    if isinstance(value, (int, float)):
        if not _finite(value):  # (a tensor's values are not checked: that would sync with the device)
            fail(_OP, arg, f"must be finite, got {value!r}")
        return _constant_table(B, (float(value),), device)[:, 0]
    fail(_OP, arg, f"must be a float or a tensor, got {type(value).__name__}", TypeError)


_CONSTANTS: OrderedDict = OrderedDict()
_CONSTANTS_SIZE = 256  # a sampler's t and t_next grid (~100 values) and its weights fit


def _constant_table(B: int, values: tuple, device) -> torch.Tensor:
    """[B, len(values)] float64 of constant floats (weights, or a float t), one tensor per (B, values,
    device), built once and then reused (least recently used out past 256), so a sampler's steps (each
    an eager call or a replayed CUDA graph) launch no fill or stack kernel for them. Never cached while
    a CUDA stream is being captured (the fill would only run at replay) or while torch.compile traces
    (a global dict is not graph state). The kernels only read these tensors."""
    dev = torch.device(device)
    cacheable = not torch.compiler.is_compiling() and not (
        dev.type == "cuda" and torch.cuda.is_current_stream_capturing())
    key = (B, values, dev)
    if cacheable and key in _CONSTANTS:
        _CONSTANTS.move_to_end(key)
        return _CONSTANTS[key]
    if len(set(values)) == 1:
        w = torch.full((B, len(values)), values[0], dtype=torch.float64, device=dev)
    else:  # (fills, not a host-to-device copy: legal under CUDA-graph capture)
        w = torch.stack([torch.full((B,), v, dtype=torch.float64, device=dev) for v in values], dim=1)
    if cacheable:
        _CONSTANTS[key] = w
        if len(_CONSTANTS) > _CONSTANTS_SIZE:
            _CONSTANTS.popitem(last=False)
    return w


def _weights(weights, J: int, B: int, device) -> torch.Tensor:
    if isinstance(weights, torch.Tensor) and weights.dim() == 2:
        if tuple(weights.shape) != (B, J):
            fail(_OP, "weights", f"as one tensor must have shape [B, J] = [{B}, {J}], got {tuple(weights.shape)}")
        if weights.device != device:
            fail(_OP, "weights", f"must be on {device} like the input, got {weights.device}")
        return weights if weights.dtype in (torch.float32, torch.float64) else weights.to(torch.float64)
    if not isinstance(weights, (list, tuple)):
        if J == 1:
            weights = [weights]
        else:
            fail(_OP, "weights", f"must be a list of {J} weights (one per term) or a [B, J] tensor, got {type(weights).__name__}", TypeError)
    if len(weights) != J:
        fail(_OP, "weights", f"must have one entry per term ({J}), got {len(weights)}")
    if J > 0 and all(isinstance(w, (int, float)) and _finite(w) for w in weights):
        return _constant_table(B, tuple(float(w) for w in weights), device)
    cols = [_per_sample(w, B, device, "weights").to(torch.float64) for w in weights]
    if J == 0:
        return torch.zeros((B, 0), dtype=torch.float64, device=device)
    return torch.stack(cols, dim=1)


def _mask(mask, J: int, B: int, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        fail(_OP, "mask", f"must be a [B] or [B, J] tensor, got {type(mask).__name__}", TypeError)
    if mask.device != device:
        fail(_OP, "mask", f"must be on {device} like the input, got {mask.device}")
    if mask.dim() == 1 and mask.shape[0] == B:
        return mask.to(torch.float64).unsqueeze(1)
    if mask.dim() == 2 and tuple(mask.shape) == (B, J):
        return mask.to(torch.float64)
    fail(_OP, "mask", f"must have shape [{B}] or [{B}, {J}], got {tuple(mask.shape)}")


class _Args(NamedTuple):
    x: torch.Tensor
    branches: list
    t: torch.Tensor
    t_next: torch.Tensor | None
    weights: torch.Tensor
    zero_init: torch.Tensor | None
    momentum: torch.Tensor | None
    x_prev: torch.Tensor | None
    u_prev: torch.Tensor | None
    param: list
    base: int
    term_pos: list
    term_neg: list
    stats_space: list
    zero_star: list
    apg_beta: list
    apg_r: list
    apg_eta: list
    rescale_phi: float
    rescale_space: int
    rescale_ref: int
    out_param: int
    solver: int
    return_x0: bool


def _normalize(x, branches, t, *, param, terms, weights, base, zero_star, apg_eta, apg_norm_threshold,
               apg_beta, momentum, stats_space, rescale_phi, rescale_space, rescale_ref, mask,
               zero_init, out_param, solver, t_next, x_prev, u_prev, return_x0) -> _Args:
    check_tensor(x, _OP, "x", min_ndim=1)
    B = x.shape[0]
    dev = x.device
    # branches: list of K [B,*S] tensors or one [K*B,*S] tensor
    if isinstance(branches, torch.Tensor):
        check_tensor(branches, _OP, "branches", like=x)
        if branches.dim() != x.dim() or tuple(branches.shape[1:]) != tuple(x.shape[1:]) or B == 0 \
                or branches.shape[0] % B != 0:
            fail(_OP, "branches", f"as one tensor must have shape [K*B, *S] with B={B}, S={tuple(x.shape[1:])}, "
                 f"got {tuple(branches.shape)}")
        K = branches.shape[0] // B
        blist = [branches]
    elif isinstance(branches, (list, tuple)) and len(branches) > 0:
        for k, b in enumerate(branches):
            check_tensor(b, _OP, "branches", like=x)
            if tuple(b.shape) != tuple(x.shape):
                fail(_OP, "branches", f"[{k}] must have the shape of x {tuple(x.shape)}, got {tuple(b.shape)}")
        K = len(branches)
        blist = list(branches)
    else:
        fail(_OP, "branches", "must be a non-empty list of tensors or one [K*B, *S] tensor", TypeError)
    if K > 8:
        fail(_OP, "branches", f"at most 8 branches are supported, got {K}")
    if isinstance(param, (list, tuple)):
        if len(param) != K:
            fail(_OP, "param", f"must have one entry per branch ({K}), got {len(param)}")
        params = [_space(p, "param") for p in param]
    else:
        params = [_space(param, "param")] * K

    if not isinstance(base, int) or not 0 <= base < K:
        fail(_OP, "base", f"must be a branch index in [0, {K}), got {base!r}")
    if not isinstance(terms, (list, tuple)):
        fail(_OP, "terms", "must be a list of (pos, neg) branch-index pairs", TypeError)
    J = len(terms)
    if J > 8:
        fail(_OP, "terms", f"at most 8 terms are supported, got {J}")
    pos, neg = [], []
    for j, term in enumerate(terms):
        if not (isinstance(term, (list, tuple)) and len(term) == 2
                and all(isinstance(i, int) and 0 <= i < K for i in term)):
            fail(_OP, "terms", f"[{j}] must be a (pos, neg) pair of branch indices in [0, {K}), got {term!r}")
        pos.append(term[0])
        neg.append(term[1])
    w = _weights(weights, J, B, dev)
    m = _mask(mask, J, B, dev)
    if m is not None:
        w = w * m

    stats = [_space(s, "stats_space") for s in _per_term(stats_space, J, "stats_space")]
    zs = []
    for j, z in enumerate(_per_term(zero_star, J, "zero_star")):
        if z is False or z is None:
            zs.append(-1)
        elif z is True:
            zs.append(stats[j])
        else:
            zs.append(_space(z, "zero_star"))
    etas = []
    for e in _per_term(apg_eta, J, "apg_eta"):
        if e is None:
            etas.append(math.nan)
        elif isinstance(e, (int, float)) and _finite(e):
            etas.append(float(e))
        else:
            fail(_OP, "apg_eta", f"must be None or a finite float per term, got {e!r}")
    rs = []
    for r in _per_term(apg_norm_threshold, J, "apg_norm_threshold"):
        if r is None:
            rs.append(0.0)
        elif isinstance(r, (int, float)) and r >= 0:
            rs.append(float(r))
        else:
            fail(_OP, "apg_norm_threshold", f"must be None or a float >= 0 per term, got {r!r}")
    betas = []
    for bt in _per_term(apg_beta, J, "apg_beta"):
        if bt is None:
            betas.append(0.0)
        elif isinstance(bt, (int, float)) and _finite(bt):
            betas.append(float(bt))
        else:
            fail(_OP, "apg_beta", f"must be None or a finite float per term, got {bt!r}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    uses_momentum = momentum is not None or any(b is not None for b in _per_term(apg_beta, J, "apg_beta"))
    if uses_momentum and J > 0:
        if momentum is None:
            momentum = torch.zeros((J, *x.shape), dtype=acc, device=dev)
        else:
            check_tensor(momentum, _OP, "momentum", same_dtype=False, like=x)
            if tuple(momentum.shape) != (J, *x.shape):
                fail(_OP, "momentum", f"must have shape [J, *x.shape] = {(J, *x.shape)}, got {tuple(momentum.shape)}")
            if momentum.dtype != acc:
                fail(_OP, "momentum", f"must be {acc} for x of dtype {x.dtype}, got {momentum.dtype}", TypeError)
    else:
        momentum = None

    if not isinstance(rescale_phi, (int, float)) or not _finite(rescale_phi):
        fail(_OP, "rescale_phi", f"must be a finite float, got {rescale_phi!r}")
    rspace = _space(rescale_space, "rescale_space")
    if rescale_ref is None:
        rescale_ref = pos[0] if J > 0 else base
    if not isinstance(rescale_ref, int) or not 0 <= rescale_ref < K:
        fail(_OP, "rescale_ref", f"must be a branch index in [0, {K}), got {rescale_ref!r}")

    if zero_init is not None:
        if isinstance(zero_init, bool):  # (False: as absent, no tensor to fill)
            zero_init = torch.full((B,), True, dtype=torch.bool, device=dev) if zero_init else None
        elif not isinstance(zero_init, torch.Tensor) or zero_init.numel() != B:
            fail(_OP, "zero_init", f"must be a bool or a [{B}] tensor")
        elif zero_init.device != dev:
            fail(_OP, "zero_init", f"must be on {dev} like the input, got {zero_init.device}")
        elif zero_init.dtype != torch.bool:
            zero_init = zero_init.ne(0)  # truthiness, as a bool mask (the kernels' byte cast would truncate 0.5)
    out_code = _space(out_param, "out_param")
    if solver not in SOLVERS:
        fail(_OP, "solver", f"must be one of {list(SOLVERS)}, got {solver!r}")
    scode = SOLVERS[solver]
    tt = _per_sample(t, B, dev, "t")
    tn = None
    if scode != 0:
        if t_next is None:
            fail(_OP, "t_next", f"is required by solver {solver!r}")
        tn = _per_sample(t_next, B, dev, "t_next")
    if scode == 2:
        for name, v in (("x_prev", x_prev), ("u_prev", u_prev)):
            if v is None:
                fail(_OP, name, "is required by solver 'heun2'")
            check_tensor(v, _OP, name, like=x)
            if tuple(v.shape) != tuple(x.shape):
                fail(_OP, name, f"must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    else:
        x_prev = u_prev = None
    return _Args(x, blist, tt, tn, w, zero_init, momentum, x_prev, u_prev, params, base, pos, neg, stats, zs,
                 betas, rs, etas, float(rescale_phi), rspace, rescale_ref, out_code, scode, bool(return_x0))


# ----------------------------------------------------------------------------------------------
# public op


def guidance_step(
    x: torch.Tensor,
    branches: Union[Sequence[torch.Tensor], torch.Tensor],
    t: TensorOrFloat,
    *,
    param: Union[str, Sequence[str]] = "velocity",
    terms: Sequence[tuple[int, int]],
    weights: Union[Sequence[TensorOrFloat], torch.Tensor],
    base: int,
    zero_star: Union[bool, str, Sequence] = False,
    apg_eta: Union[float, None, Sequence] = None,
    apg_norm_threshold: Union[float, None, Sequence] = None,
    apg_beta: Union[float, None, Sequence] = None,
    momentum: torch.Tensor | None = None,
    stats_space: Union[str, Sequence[str]] = "x0",
    rescale_phi: float = 0.0,
    rescale_space: str = "x0",
    rescale_ref: int | None = None,
    mask: torch.Tensor | None = None,
    zero_init: Union[torch.Tensor, bool, None] = None,
    out_param: str = "velocity",
    solver: str = "none",
    t_next: TensorOrFloat | None = None,
    x_prev: torch.Tensor | None = None,
    u_prev: torch.Tensor | None = None,
    return_x0: bool = False,
) -> GuidanceOutput:
    """Fused multi-branch guidance step (one memory pass; two when a statistic is needed).

    Args:
        x: state ``x_t`` ``[B, *S]`` (float64/float32/bfloat16/float16; any layout whose non-batch
            dims are contiguous is read in place, batch stride may be 0; others are copied).
        branches: K tensors ``[B, *S]`` or ONE ``[K*B, *S]`` tensor (branch k = rows ``k*B..(k+1)*B``,
            as a batched network call returns it; read in place, never split-copied). Same dtype as x.
        t: float or ``[B]`` per-sample time (RF, t = 1 noise).
        param: "velocity" | "x0" | "eps", or one per branch.
        terms: J ``(pos, neg)`` branch-index pairs (J <= 8).
        weights: one float or ``[B]`` tensor per term, or one ``[B, J]`` tensor.
        base: index of the branch the terms are added to (CFG ``U + w(C-U)`` = base C, weight w-1).
        zero_star: CFG-Zero* per term: False, True (scale formed in the term's stats space), or the
            name of the space where ``s*·Y_neg`` is formed ("x0" reproduces ComfyUI's variant).
        apg_eta / apg_norm_threshold / apg_beta: APG options per term (None = off). With apg_beta a
            momentum buffer is used (zeros if ``momentum`` is None) and returned updated.
        momentum: ``[J, B, *S]`` float32 (float64 for float64 x) APG buffers, in the stats space.
        stats_space: space (per term) where CFG-Zero*/APG statistics and updates are computed.
        rescale_phi / rescale_space / rescale_ref: guidance rescale (0 = off); the reference branch
            defaults to the positive branch of term 0.
        mask: ``[B]`` or ``[B, J]``; 0 turns a term off for that sample (guidance interval).
        zero_init: ``[B]`` bool; those samples output zero velocity (CFG-Zero*).
        out_param: parameterization of ``out`` when ``solver="none"``.
        solver: "none" | "euler" (``x + (t_next - t)·u``) | "heun2" (see module doc).
        t_next: next time (euler) or t_prev (heun2); float or ``[B]``.
        x_prev / u_prev: Heun stage-2 inputs.
        return_x0: also return the guided x0 (previews, GFCG's classifier).

    Returns:
        GuidanceOutput(out, x0 or None, momentum or None); ``out``/``x0`` contiguous, dtype of x.
        Under torch.autocast, x, the branches and the Heun inputs are promoted to their common dtype
        (a bf16 network output beside an fp32 state gives an fp32 step, as eager math would).
    """
    x, branches, x_prev, u_prev = _autocast_promote_step(x, branches, x_prev, u_prev)
    a = _normalize(x, branches, t, param=param, terms=terms, weights=weights, base=base, zero_star=zero_star,
                   apg_eta=apg_eta, apg_norm_threshold=apg_norm_threshold, apg_beta=apg_beta,
                   momentum=momentum, stats_space=stats_space, rescale_phi=rescale_phi,
                   rescale_space=rescale_space, rescale_ref=rescale_ref, mask=mask, zero_init=zero_init,
                   out_param=out_param, solver=solver, t_next=t_next, x_prev=x_prev, u_prev=u_prev,
                   return_x0=return_x0)
    out, x0, mom, _ = torch.ops.raekern.guidance_step(*a)
    return GuidanceOutput(out, x0 if a.return_x0 else None, mom if a.momentum is not None else None)


def _autocast_promote_step(x, branches, x_prev, u_prev):
    if isinstance(branches, torch.Tensor):
        x, branches, x_prev, u_prev = autocast_promote(x, branches, x_prev, u_prev)
        return x, branches, x_prev, u_prev
    if not isinstance(branches, (list, tuple)):
        return x, branches, x_prev, u_prev  # _normalize names the error
    x, x_prev, u_prev, *bl = autocast_promote(x, x_prev, u_prev, *branches)
    return x, bl, x_prev, u_prev


def _needs_stats(zero_star, apg_r, apg_eta, rescale_phi) -> bool:
    return (rescale_phi != 0.0 or any(z >= 0 for z in zero_star) or any(r > 0 for r in apg_r)
            or any(not math.isnan(e) for e in apg_eta))


@torch.library.register_fake("raekern::guidance_step")
def _guidance_step_fake(x, branches, t, t_next, weights, zero_init, momentum, x_prev, u_prev, param, base,
                        term_pos, term_neg, stats_space, zero_star, apg_beta, apg_r, apg_eta, rescale_phi,
                        rescale_space, rescale_ref, out_param, solver, return_x0):
    B = x.shape[0]
    J = len(term_pos)
    K = len(param)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    has_m = momentum is not None and J > 0
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    x0 = torch.empty_like(x, memory_format=torch.contiguous_format) if return_x0 else x.new_empty((0,))
    mom = x.new_empty((J, *x.shape), dtype=acc) if has_m else x.new_empty((0,), dtype=acc)
    nout = 2 + (J if has_m else 0)
    ns = 1 + K + (J if has_m else 0) + (2 if solver == 2 else 0)
    coeffs = x.new_empty((B, nout, ns), dtype=torch.float64)
    return out, x0, mom, coeffs


def _setup_step(ctx, inputs, output):
    (x, branches, t, t_next, weights, zero_init, momentum, x_prev, u_prev, param, base, term_pos, term_neg,
     stats_space, zero_star, apg_beta, apg_r, apg_eta, rescale_phi, rescale_space, rescale_ref, out_param,
     solver, return_x0) = inputs
    ctx.stats = _needs_stats(zero_star, apg_r, apg_eta, rescale_phi)
    ctx.K = len(param)
    ctx.base = base
    ctx.J = len(term_pos)
    ctx.has_m = momentum is not None and ctx.J > 0
    ctx.heun = solver == 2
    ctx.stacked = len(branches) == 1 and ctx.K > 1
    ctx.n_branch_inputs = len(branches)
    ctx.shape = tuple(x.shape)
    ctx.dtype = x.dtype
    ctx.m_dtype = momentum.dtype if momentum is not None else None
    ctx.has_x_prev = x_prev is not None
    ctx.has_u_prev = u_prev is not None
    ctx.save_for_backward(output[3])


def _backward_step(ctx, g_out, g_x0, g_mom, g_coeffs):
    if ctx.stats:
        raise RuntimeError(
            "raekern.guidance_step: not differentiable when CFG-Zero*, APG norm threshold/projection or "
            "guidance rescale is used (its per-sample scalars depend on the inputs); only the linear "
            "rules (CFG, AutoGuidance, GFCG, internal guidance, APG momentum alone) have a backward")
    if any(ctx.needs_input_grad[i] for i in (2, 3, 4)):
        raise RuntimeError("raekern.guidance_step: no gradient with respect to 't', 't_next' or 'weights'")
    (coeffs,) = ctx.saved_tensors  # [B, nout, ns], rebased layout
    K, base, J = ctx.K, ctx.base, ctx.J
    # rebased -> raw coefficients: P_base carries c'_1 - Σ_k c'_k, every other branch its own.
    diff_idx = list(range(2, 1 + K))
    raw_base = coeffs[:, :, 1] - (coeffs[:, :, diff_idx].sum(-1) if diff_idx else 0)
    others = [k for k in range(K) if k != base]
    col = {0: coeffs[:, :, 0]}
    branch_cols = [None] * K
    branch_cols[base] = raw_base
    for i, k in enumerate(others):
        branch_cols[k] = coeffs[:, :, 2 + i]
    wdtype = torch.float64 if ctx.dtype == torch.float64 else torch.float32
    # Only the outputs that received a gradient take part: an unused x0 (or momentum) output adds
    # nothing, and reading a materialised zero tensor for it would cost a full pass per input grad.
    grads_in, outs = [], []
    for o, g in enumerate((g_out, g_x0) + tuple(g_mom[j] for j in range(J)) if ctx.has_m else (g_out, g_x0)):
        if g is not None and g.numel() != 0:
            grads_in.append(g.to(wdtype))
            outs.append(o)
    if not grads_in:
        grads_in, outs = [torch.zeros(ctx.shape, dtype=wdtype, device=coeffs.device)], [0]
    sel = torch.tensor(outs, device=coeffs.device)

    def combine(c):  # c: [B, nout]
        return torch.ops.raekern.guidance_combine(grads_in, c.index_select(1, sel).contiguous())

    gx = combine(col[0]).to(ctx.dtype)
    gb = [combine(branch_cols[k]).to(ctx.dtype) for k in range(K)]
    g_branches = [torch.cat(gb, dim=0)] if ctx.stacked else gb
    g_m = None
    if ctx.has_m:
        g_m = torch.stack([combine(coeffs[:, :, 1 + K + j]) for j in range(J)]).to(ctx.m_dtype)
    g_xp = g_up = None
    if ctx.heun:
        ns = coeffs.shape[2]
        g_xp = combine(coeffs[:, :, ns - 2]).to(ctx.dtype) if ctx.has_x_prev else None
        g_up = combine(coeffs[:, :, ns - 1]).to(ctx.dtype) if ctx.has_u_prev else None
    return (gx, g_branches, None, None, None, None, g_m, g_xp, g_up) + (None,) * 15


torch.library.register_autograd("raekern::guidance_step", _backward_step, setup_context=_setup_step)


@torch.library.register_fake("raekern::guidance_combine")
def _guidance_combine_fake(inputs, coeffs):
    return torch.empty_like(inputs[0], memory_format=torch.contiguous_format)


def _setup_combine(ctx, inputs, output):
    ins, coeffs = inputs
    ctx.n = len(ins)
    ctx.save_for_backward(coeffs)


def _backward_combine(ctx, g):
    (coeffs,) = ctx.saved_tensors
    return [torch.ops.raekern.guidance_combine([g], coeffs[:, e : e + 1].contiguous()) for e in range(ctx.n)], None


torch.library.register_autograd("raekern::guidance_combine", _backward_combine, setup_context=_setup_combine)


# ----------------------------------------------------------------------------------------------
# plain-PyTorch reference


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _ab(space: int, t: torch.Tensor):
    one = torch.ones_like(t)
    if space == SPACES["x0"]:
        return one, -t
    if space == SPACES["eps"]:
        return one, 1 - t
    return torch.zeros_like(t), one


def _convert(y, frm: int, to: int, x, t):
    if frm == to:
        return y
    af, bf = (_bcast(v, x) for v in _ab(frm, t))
    at, bt = (_bcast(v, x) for v in _ab(to, t))
    u = (y - af * x) / bf
    return at * x + bt * u


def _b_ratio(to: int, frm: int, t):
    return torch.ones_like(t) if to == frm else _ab(to, t)[1] / _ab(frm, t)[1]


def _sdot(a, b):
    return (a * b).flatten(1).sum(1)


def guidance_step_reference(x, branches, t, **kw) -> GuidanceOutput:
    """Plain-PyTorch transcription of :func:`guidance_step` (same arguments), computed in float32
    (float64 for float64 inputs); the tests' ground truth."""
    a = _normalize(x, branches, t, **{**_DEFAULTS, **kw})
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(cdt)
    B = x.shape[0]
    K = len(a.param)
    if len(a.branches) == 1 and K > 1:
        P = [b.to(cdt) for b in a.branches[0].split(B, dim=0)]
    else:
        P = [b.to(cdt) for b in a.branches]
    tt = a.t.to(cdt)
    W = a.param[0] if all(p == a.param[0] for p in a.param) else SPACES["velocity"]
    Y = [_convert(P[k], a.param[k], W, xc, tt) for k in range(K)]
    G = Y[a.base]
    Mnew = []
    for j in range(len(a.term_pos)):
        wj = _bcast(a.weights[:, j].to(cdt), xc)
        if (a.zero_star[j] < 0 and a.apg_r[j] <= 0 and math.isnan(a.apg_eta[j]) and a.momentum is None):
            # affine term: the same in every space, formed in the work space (no singular conversion)
            G = G + wj * (Y[a.term_pos[j]] - Y[a.term_neg[j]])
            continue
        Z = a.stats_space[j]
        yp = _convert(Y[a.term_pos[j]], W, Z, xc, tt)
        yn = _convert(Y[a.term_neg[j]], W, Z, xc, tt)
        if a.zero_star[j] >= 0:
            s = _sdot(yp, yn) / (_sdot(yn, yn) + 1e-8)
            Q = a.zero_star[j]
            dq = _convert(Y[a.term_pos[j]], W, Q, xc, tt) - _bcast(s, xc) * _convert(Y[a.term_neg[j]], W, Q, xc, tt)
            d = dq * _bcast(_b_ratio(Z, Q, tt), xc)
        else:
            d = yp - yn
        if a.momentum is not None:
            d = d + a.apg_beta[j] * a.momentum[j].to(cdt)
            Mnew.append(d)
        if a.apg_r[j] > 0:
            nrm = d.flatten(1).norm(dim=1)
            d = d * _bcast(torch.clamp(a.apg_r[j] / nrm, max=1.0), xc)
        if not math.isnan(a.apg_eta[j]):
            v1 = yp.flatten(1)
            pi = _sdot(d, yp) / v1.norm(dim=1).clamp_min(1e-12) ** 2
            d = d - (1 - a.apg_eta[j]) * _bcast(pi, xc) * yp
        G = G + wj * _bcast(_b_ratio(W, Z, tt), xc) * d
    if a.rescale_phi != 0.0:
        R = a.rescale_space
        gr = _convert(G, W, R, xc, tt)
        ref = _convert(Y[a.rescale_ref], W, R, xc, tt)
        n = gr.flatten(1).shape[1]  # (B may be 0)
        cor = 1 if n > 1 else 0
        sg = gr.flatten(1).std(dim=1, correction=cor)
        sr = ref.flatten(1).std(dim=1, correction=cor)
        f = torch.where(sg > 0, a.rescale_phi * sr / sg + (1 - a.rescale_phi), torch.ones_like(sg))
        G = _convert(gr * _bcast(f, xc), R, W, xc, tt)
    if a.zero_init is not None:
        zero = _bcast(_ab(W, tt)[0], xc) * xc
        G = torch.where(_bcast(a.zero_init.reshape(-1).bool(), xc), zero, G)
    if a.solver == 0:
        out = _convert(G, W, a.out_param, xc, tt)
    else:
        u = _convert(G, W, SPACES["velocity"], xc, tt)
        tn = a.t_next.to(cdt)
        if a.solver == 1:
            out = xc + _bcast(tn - tt, xc) * u
        else:
            out = a.x_prev.to(cdt) + _bcast((tt - tn) / 2, xc) * (a.u_prev.to(cdt) + u)
    x0 = _convert(G, W, SPACES["x0"], xc, tt).to(x.dtype) if a.return_x0 else None
    mom = torch.stack(Mnew).to(a.momentum.dtype) if a.momentum is not None else None
    return GuidanceOutput(out.to(x.dtype), x0, mom)


_DEFAULTS = dict(param="velocity", zero_star=False, apg_eta=None, apg_norm_threshold=None, apg_beta=None,
                 momentum=None, stats_space="x0", rescale_phi=0.0, rescale_space="x0", rescale_ref=None,
                 mask=None, zero_init=None, out_param="velocity", solver="none", t_next=None, x_prev=None,
                 u_prev=None, return_x0=False)


# ----------------------------------------------------------------------------------------------
# GFCG selection


def gfcg_select(logits: torch.Tensor, target: torch.Tensor, *, w_max: float, kappa: float,
                w_min: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GFCG reference class and weight per sample (DESIGN §4.3).

    Args:
        logits: ``[B, C]`` classifier logits (C >= 2; float64/float32/bfloat16/float16).
        target: ``[B]`` int64 target classes.
        w_max, kappa, w_min: ``w = clamp(w_max·exp(-kappa·(p_target - p_ref)), w_min, w_max)``.

    Returns:
        ``(ref [B] int64, weight [B] float32, p_target [B] float32, p_ref [B] float32)`` where ``ref`` is
        the most probable class other than the target (lowest index on ties) and p = softmax(logits)
        computed in fp32. Not differentiable (GFCG runs its classifier in inference mode).
    """
    op = "gfcg_select"
    check_tensor(logits, op, "logits", ndim=2)
    if logits.shape[1] < 2:
        fail(op, "logits", f"must have at least 2 classes, got shape {tuple(logits.shape)}")
    check_tensor(target, op, "target", ndim=1, floating=False)
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        fail(op, "target", f"must be an integer tensor, got {target.dtype}", TypeError)
    if target.shape[0] != logits.shape[0]:
        fail(op, "target", f"must have shape [{logits.shape[0]}], got {tuple(target.shape)}")
    if target.device != logits.device:
        fail(op, "target", f"must be on {logits.device} like the logits, got {target.device}")
    for name, v in (("w_max", w_max), ("kappa", kappa), ("w_min", w_min)):
        if not isinstance(v, (int, float)) or not _finite(v):
            fail(op, name, f"must be a finite float, got {v!r}")
    if w_min > w_max:
        fail(op, "w_min", f"must be <= w_max ({w_max}), got {w_min}")
    return torch.ops.raekern.gfcg_select(logits, target, float(w_max), float(kappa), float(w_min))


@torch.library.register_fake("raekern::gfcg_select")
def _gfcg_select_fake(logits, target, w_max, kappa, w_min):
    B = logits.shape[0]
    f = logits.new_empty((B,), dtype=torch.float32)
    return logits.new_empty((B,), dtype=torch.int64), f, torch.empty_like(f), torch.empty_like(f)


def _gfcg_backward(ctx, *grads):
    raise RuntimeError("raekern.gfcg_select is not differentiable: GFCG uses its classifier in inference "
                       "mode; call it under torch.no_grad() or on detached logits")


torch.library.register_autograd("raekern::gfcg_select", _gfcg_backward, setup_context=lambda ctx, inputs, output: None)


def gfcg_select_reference(logits, target, *, w_max, kappa, w_min=0.0):
    """Plain-PyTorch :func:`gfcg_select`."""
    p = torch.softmax(logits.float(), dim=-1)
    tgt = target.long()
    p_t = p.gather(1, tgt[:, None])[:, 0]
    masked = p.scatter(1, tgt[:, None], -1.0)
    ref = masked.argmax(dim=1)
    p_r = p.gather(1, ref[:, None])[:, 0]
    w = (w_max * torch.exp(-kappa * (p_t - p_r))).clamp(min=w_min, max=w_max)
    return ref, w, p_t, p_r
