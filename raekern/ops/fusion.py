"""Multi-layer representation fusion (DESIGN §3.2): RAEv2's layer-stack mean, DRoRAE's depth routing
and the latent (de)standardisation between token and channels-first layouts.

Every op reads its inputs once (forward) and writes each input's gradient in one more pass
(backward); no ``[L, B, N, D]`` intermediate is built. Layer and expert lists are read through their
own pointers, so the hidden states a ViT returns are passed as they are (views, slices and expanded
tensors included).

Devices: CPU kernels (fp64/fp32/bf16/fp16, statistics in fp32 or fp64 for fp64 input). CUDA kernels
(fp32/bf16/fp16): their GPU tests pass on an H200 (2026-11-30).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from raekern._utils.checks import (autocast_promote, check_choice, check_eps, check_grid, check_positive, check_tensor,
                                   fail, is_int)
from raekern._utils.library import forbid_double_backward

__all__ = [
    "layer_stack_fuse",
    "layer_stack_fuse_reference",
    "depth_route",
    "depth_route_reference",
    "latent_normalize",
    "latent_normalize_reference",
    "latent_denormalize",
    "latent_denormalize_reference",
]

_ops = torch.ops.raekern
TensorList = Sequence[torch.Tensor] | torch.Tensor

# --------------------------------------------------------------------------------------------------
# argument handling


def _as_list(layers, op: str, arg: str) -> list[torch.Tensor]:
    """The ops' layer argument: a list of L tensors [B, T, D] as given, or one [L, B, T, D] tensor as a
    one-entry list (the kernels' stacked form: they read its L slices in place, and the backward
    returns one [L, B, T, D] gradient; split into views here, autograd would stack L gradients again,
    a copy of the whole tensor). `_layer_count` and `_layer_shape` read either form."""
    if isinstance(layers, torch.Tensor):
        check_tensor(layers, op, arg, ndim=4)
        if layers.shape[0] == 0:
            fail(op, arg, f"as one [L, B, T, D] tensor must hold at least one layer, got L = 0 "
                          f"(shape {tuple(layers.shape)})")
        return [layers]
    if not isinstance(layers, (list, tuple)):
        fail(op, arg, f"must be a list of tensors or one [L, B, T, D] tensor, got {type(layers).__name__}",
             TypeError)
    if len(layers) == 0:
        fail(op, arg, "must hold at least one tensor")
    ref = None
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor):
            fail(op, arg, f"entry {i} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        check_tensor(t, op, arg, ndim=3)
        if ref is None:
            ref = t
            continue
        if t.shape != ref.shape:
            fail(op, arg, f"entries must share one shape: entry {i} has {tuple(t.shape)}, entry 0 has "
                          f"{tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            fail(op, arg, f"entries must share one dtype: entry {i} is {t.dtype}, entry 0 is {ref.dtype}",
                 TypeError)
        if t.device != ref.device:
            fail(op, arg, f"entries must share one device: entry {i} is on {t.device}, entry 0 on "
                          f"{ref.device}")
    return list(layers)


def _is_stacked(layers: list[torch.Tensor]) -> bool:
    return len(layers) == 1 and layers[0].dim() == 4


def _layer_count(layers: list[torch.Tensor]) -> int:
    return layers[0].shape[0] if _is_stacked(layers) else len(layers)


def _layer_shape(layers: list[torch.Tensor]) -> torch.Size:
    """[B, T, D] of one layer, in either form of `_as_list`."""
    return layers[0].shape[-3:]


def _square_grid(n: int, op: str) -> tuple[int, int]:
    # math.isqrt cannot take a symbolic token count (torch.compile with dynamic shapes); the float
    # square root is exact for any count a latent grid can have (< 2^52) and traces as a SymInt.
    h = int(math.sqrt(n))
    if h * h != n:
        fail(op, "grid", f"must be given: N = {n} patch tokens is not a square")
    return h, h


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# layer_stack_fuse


def layer_stack_fuse(
    layers: TensorList,
    weights: torch.Tensor | None = None,
    *,
    skip_tokens: int = 0,
    normalize: bool = True,
    eps: float = 1e-6,
    reduce: str | None = None,
    add_last_token_mean: bool = False,
    channels_first: bool = False,
    grid: tuple[int, int] | None = None,
    latent_mean: torch.Tensor | None = None,
    latent_var: torch.Tensor | None = None,
    latent_eps: float = 1e-5,
) -> torch.Tensor:
    """Fuse L encoder layers into one latent in a single pass (RAEv2 §2.1; RAE v1 is L = 1).

    ``out[b, n] = Σ_l w_l · LN(h_l[b, skip_tokens + n])`` (+ ``mean_m LN(h_L[b, m])`` if
    ``add_last_token_mean``), where LN is a non-affine LayerNorm over D (``normalize``; statistics in
    fp32) and the weights are 1/L (``reduce="mean"``), 1 (``"sum"``), or ``weights`` (``"weighted"``):
    learnable per layer ``[L]`` or per token ``[B, N, L]``.

    Args:
        layers: L tensors ``[B, T, D]`` (a ViT's hidden states, any strides; never stacked) or one
            ``[L, B, T, D]`` tensor (its gradient is then one tensor too, no stacking copy). Same
            shape, dtype (fp32/bf16/fp16/fp64) and device.
        weights: ``[L]`` or ``[B, N, L]``, any float dtype (used in fp32); required for "weighted".
        skip_tokens: P prefix tokens (CLS + registers) dropped; N = T − P.
        normalize / eps: per-layer non-affine LayerNorm (eps 1e-6 DINOv2, 1e-5 DINOv3).
        reduce: "mean" | "sum" | "weighted" (default: "weighted" when weights are given, else "mean").
        add_last_token_mean: add the token-mean of the last normalised layer (RAEv2's released encoders).
        channels_first: return ``[B, D, H, W]`` (token n = h·W + w); ``grid = (H, W)`` defaults to the
            statistics' shape or a square grid.
        latent_mean / latent_var: ``[D, H, W]`` dataset statistics, fused as
            ``(out − mean)/sqrt(var + latent_eps)`` (channels-first only). Not differentiated.

    Returns ``[B, N, D]`` or ``[B, D, H, W]`` in the layers' dtype, contiguous. Differentiable w.r.t.
    every layer and ``weights``.
    """
    op = "layer_stack_fuse"
    layers = _as_list(layers, op, "layers")
    L = _layer_count(layers)
    B, T, D = _layer_shape(layers)
    check_eps(eps, op)
    check_eps(latent_eps, op, "latent_eps")
    if not is_int(skip_tokens) or not 0 <= skip_tokens < T:
        fail(op, "skip_tokens", f"must be an int in [0, T) with T = {T} tokens per layer, got {skip_tokens!r}")
    skip_tokens = int(skip_tokens)
    N = T - skip_tokens
    if reduce is None:
        reduce = "mean" if weights is None else "weighted"
    check_choice(reduce, ("mean", "sum", "weighted"), op, "reduce")
    if reduce == "weighted":
        if weights is None:
            fail(op, "weights", "is required when reduce='weighted'")
        check_tensor(weights, op, "weights", like=layers[0], same_dtype=False)
        if tuple(weights.shape) not in ((L,), (B, N, L)):
            fail(op, "weights", f"must have shape [L] = [{L}] or [B, N, L] = [{B}, {N}, {L}], got "
                                f"{tuple(weights.shape)}")
    elif weights is not None:
        fail(op, "weights", "must be None unless reduce='weighted'")
    if (latent_mean is None) != (latent_var is None):
        fail(op, "latent_var" if latent_var is None else "latent_mean",
             "must be given together with the other latent statistic")
    if latent_mean is not None and not channels_first:
        fail(op, "latent_mean", "requires channels_first=True (the statistics are [D, H, W])")
    if grid is not None:
        if not channels_first:
            fail(op, "grid", "requires channels_first=True (the token order of a channels-first output)")
        grid = check_grid(grid, op, "grid")
    gh = gw = 0
    if channels_first:
        if grid is not None:
            gh, gw = int(grid[0]), int(grid[1])
        elif latent_mean is not None and latent_mean.dim() == 3:
            gh, gw = latent_mean.shape[1], latent_mean.shape[2]
            if gh * gw != N:
                fail(op, "latent_mean", f"must have shape [D, H, W] with H*W = N = {N} patch tokens, got "
                                        f"{tuple(latent_mean.shape)}")
        else:
            gh, gw = _square_grid(N, op)
        if gh * gw != N:
            fail(op, "grid", f"must be (H, W) with H*W = N = {N} patch tokens, got ({gh}, {gw})")
        for name, t in (("latent_mean", latent_mean), ("latent_var", latent_var)):
            if t is not None:
                check_tensor(t, op, name, like=layers[0], same_dtype=False)
                if tuple(t.shape) != (D, gh, gw):
                    fail(op, name, f"must have shape [D, H, W] = [{D}, {gh}, {gw}], got {tuple(t.shape)}")
    return _ops.layer_stack_fuse(layers, weights, skip_tokens, bool(normalize), float(eps), reduce,
                                 bool(add_last_token_mean), bool(channels_first), gh, gw, latent_mean,
                                 latent_var, float(latent_eps))


def layer_stack_fuse_reference(
    layers: TensorList,
    weights: torch.Tensor | None = None,
    *,
    skip_tokens: int = 0,
    normalize: bool = True,
    eps: float = 1e-6,
    reduce: str | None = None,
    add_last_token_mean: bool = False,
    channels_first: bool = False,
    grid: tuple[int, int] | None = None,
    latent_mean: torch.Tensor | None = None,
    latent_var: torch.Tensor | None = None,
    latent_eps: float = 1e-5,
) -> torch.Tensor:
    """Plain-PyTorch layer_stack_fuse (math in fp32, fp64 for fp64 input); the tests' ground truth."""
    if isinstance(layers, torch.Tensor):
        layers = list(layers.unbind(0))
    dtype = layers[0].dtype
    acc = _acc(dtype)
    L, D = len(layers), layers[0].shape[-1]
    ys = [h[:, skip_tokens:].to(acc) for h in layers]
    if normalize:
        ys = [F.layer_norm(y, (D,), eps=eps) for y in ys]
    if reduce is None:
        reduce = "mean" if weights is None else "weighted"
    if reduce == "mean":
        out = sum(ys) / L
    elif reduce == "sum":
        out = sum(ys)
    else:
        w = weights.to(acc)
        if w.dim() == 1:
            out = sum(w[l] * ys[l] for l in range(L))
        else:
            out = sum(w[..., l:l + 1] * ys[l] for l in range(L))
    if add_last_token_mean:
        out = out + ys[-1].mean(dim=1, keepdim=True)
    if channels_first:
        B, N, _ = out.shape
        if grid is None:
            grid = tuple(latent_mean.shape[1:]) if latent_mean is not None else (math.isqrt(N),) * 2
        out = out.transpose(1, 2).reshape(B, D, *grid)
        if latent_mean is not None:
            out = (out - latent_mean.to(acc)) / torch.sqrt(latent_var.to(acc) + latent_eps)
    return out.to(dtype).contiguous()


@torch.library.register_fake("raekern::layer_stack_fuse")
def _(layers, weights, skip_tokens, normalize, eps, reduce, add_last_token_mean, channels_first, grid_h,
      grid_w, latent_mean, latent_var, latent_eps):
    B, T, D = _layer_shape(layers)
    if channels_first:
        return layers[0].new_empty((B, D, grid_h, grid_w))
    return layers[0].new_empty((B, T - skip_tokens, D))


@torch.library.register_fake("raekern::layer_stack_fuse_backward")
def _(grad, layers, weights, skip_tokens, normalize, eps, reduce, add_last_token_mean, channels_first,
      latent_var, latent_eps, weights_grad):
    grads = [h.new_empty(h.shape) for h in layers]
    if weights_grad and weights is not None:
        dw = weights.new_empty(weights.shape)
    else:
        dw = layers[0].new_empty((0,), dtype=weights.dtype if weights is not None else layers[0].dtype)
    return grads, dw


def _lsf_setup(ctx, inputs, output):
    (layers, weights, skip_tokens, normalize, eps, reduce, add_last_token_mean, channels_first, _gh, _gw,
     _lm, latent_var, latent_eps) = inputs
    ctx.n_layers = len(layers)
    ctx.args = (skip_tokens, normalize, eps, reduce, add_last_token_mean, channels_first)
    ctx.latent_eps = latent_eps
    ctx.has_weights = weights is not None
    ctx.save_for_backward(*layers, weights, latent_var)


def _lsf_backward(ctx, grad):
    saved = ctx.saved_tensors
    layers, weights, latent_var = list(saved[:ctx.n_layers]), saved[ctx.n_layers], saved[ctx.n_layers + 1]
    skip_tokens, normalize, eps, reduce, add_last_token_mean, channels_first = ctx.args
    want_w = ctx.has_weights and ctx.needs_input_grad[1]
    dl, dw = _ops.layer_stack_fuse_backward(grad, layers, weights, skip_tokens, normalize, eps, reduce,
                                            add_last_token_mean, channels_first, latent_var, ctx.latent_eps,
                                            want_w)
    return (dl, dw if want_w else None) + (None,) * 11


torch.library.register_autograd("raekern::layer_stack_fuse", _lsf_backward, setup_context=_lsf_setup)


# --------------------------------------------------------------------------------------------------
# depth_route


def depth_route(
    experts: TensorList,
    router_logits: torch.Tensor,
    base: torch.Tensor,
    *,
    energy: str = "l2",
    bound: str = "tanh",
    gamma: torch.Tensor | None = None,
    cap: float | None = None,
) -> torch.Tensor:
    """DRoRAE aggregation after the expert MLPs, per token, in one pass (reference §3.2).

    ``w = energy(router_logits)`` over depth: ``"l2"`` signed weights of unit L2 norm
    (``a / max(‖a‖, 1e-12)``, like ``F.normalize``), ``"softmax"``, or ``"none"`` (logits used as is);
    ``f = Σ_l w_l · e_l``; correction ``Δ = bound(f)``: ``"tanh"`` → ``γ ⊙ tanh(f)`` (γ scalar or [D],
    zero-initialised in DepthRoutedFusion so training starts at the RAE latent; ``gamma=None`` means
    γ = 1), ``"norm_cap"`` → ``f · min(1, cap·‖base‖/‖f‖)`` per token, ``"none"`` → ``f``.
    Returns ``base + Δ``.

    Args:
        experts: L expert outputs ``[B, N, D]`` (any strides) or one ``[L, B, N, D]`` tensor (as a
            batched expert GEMM returns it; its gradient is then one tensor too, no stacking copy).
        router_logits: ``[B, N, L]``, any float dtype (used in fp32).
        base: ``[B, N, D]`` last-layer RAE feature, the experts' dtype.
        gamma: scalar, ``[1]`` or ``[D]`` gate (bound="tanh" only).
        cap: ratio c > 0 (bound="norm_cap" only).

    Returns ``[B, N, D]`` in base's dtype; differentiable w.r.t. experts, router_logits, base, gamma.
    """
    op = "depth_route"
    experts = _as_list(experts, op, "experts")
    base, *experts = autocast_promote(base, *experts)  # bf16 experts (autocast) and an fp32 LayerNorm base
    L = _layer_count(experts)
    B, N, D = _layer_shape(experts)
    check_choice(energy, ("l2", "softmax", "none"), op, "energy")
    check_choice(bound, ("tanh", "norm_cap", "none"), op, "bound")
    check_tensor(base, op, "base", ndim=3, like=experts[0])
    if tuple(base.shape) != (B, N, D):
        fail(op, "base", f"must have the experts' shape [B, N, D] = {[B, N, D]}, got "
                         f"{list(base.shape)}")
    check_tensor(router_logits, op, "router_logits", ndim=3, like=experts[0], same_dtype=False)
    if tuple(router_logits.shape) != (B, N, L):
        fail(op, "router_logits", f"must have shape [B, N, L] = [{B}, {N}, {L}] (one logit per expert), "
                                  f"got {tuple(router_logits.shape)}")
    if gamma is not None:
        if bound != "tanh":
            fail(op, "gamma", "is only used with bound='tanh'")
        check_tensor(gamma, op, "gamma", like=experts[0], same_dtype=False)
        if not ((gamma.numel() == 1 and gamma.dim() <= 1) or tuple(gamma.shape) == (D,)):
            fail(op, "gamma", f"must be a scalar, [1] or [D] = [{D}], got shape {tuple(gamma.shape)}")
    if bound == "norm_cap":
        check_positive(cap, op, "cap", "a positive ratio c (‖Δ‖ ≤ c·‖base‖) for bound='norm_cap'")
    elif cap is not None:
        fail(op, "cap", "is only used with bound='norm_cap'")
    return _ops.depth_route(experts, router_logits, base, energy, bound, gamma,
                            float(cap) if cap is not None else 0.0)


def depth_weights_reference(router_logits: torch.Tensor, energy: str = "l2") -> torch.Tensor:
    """Per-token depth weights [B, N, L] from router logits (the energy constraint)."""
    if energy == "l2":
        return F.normalize(router_logits, dim=-1, eps=1e-12)
    if energy == "softmax":
        return torch.softmax(router_logits, dim=-1)
    return router_logits


def depth_route_reference(
    experts: TensorList,
    router_logits: torch.Tensor,
    base: torch.Tensor,
    *,
    energy: str = "l2",
    bound: str = "tanh",
    gamma: torch.Tensor | None = None,
    cap: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch depth_route (math in fp32, fp64 for fp64 input); the tests' ground truth."""
    if isinstance(experts, torch.Tensor):
        experts = list(experts.unbind(0))
    dtype = base.dtype
    acc = _acc(dtype)
    w = depth_weights_reference(router_logits.to(acc), energy)
    f = sum(w[..., l:l + 1] * e.to(acc) for l, e in enumerate(experts))
    b = base.to(acc)
    if bound == "tanh":
        delta = torch.tanh(f)
        if gamma is not None:
            delta = gamma.to(acc).reshape(-1) * delta
    elif bound == "norm_cap":
        nf = f.norm(dim=-1, keepdim=True)
        limit = cap * b.norm(dim=-1, keepdim=True)
        delta = f * torch.where(nf > limit, limit / nf.clamp_min(1e-30), torch.ones_like(nf))
    else:
        delta = f
    return (b + delta).to(dtype)


@torch.library.register_fake("raekern::depth_route")
def _(experts, router_logits, base, energy, bound, gamma, cap):
    return base.new_empty(base.shape)


@torch.library.register_fake("raekern::depth_route_backward")
def _(grad, experts, router_logits, base, energy, bound, gamma, cap):
    ggamma = gamma.new_empty(gamma.shape) if gamma is not None else base.new_empty((0,))
    return ([e.new_empty(e.shape) for e in experts], router_logits.new_empty(router_logits.shape),
            base.new_empty(base.shape), ggamma)


def _dr_setup(ctx, inputs, output):
    experts, router_logits, base, energy, bound, gamma, cap = inputs
    ctx.n = len(experts)
    ctx.args = (energy, bound, cap)
    ctx.save_for_backward(*experts, router_logits, base, gamma)


def _dr_backward(ctx, grad):
    saved = ctx.saved_tensors
    experts = list(saved[:ctx.n])
    router_logits, base, gamma = saved[ctx.n:]
    energy, bound, cap = ctx.args
    ge, glog, gbase, ggamma = _ops.depth_route_backward(grad, experts, router_logits, base, energy, bound,
                                                        gamma, cap)
    return ge, glog, gbase, None, None, (ggamma if gamma is not None else None), None


torch.library.register_autograd("raekern::depth_route", _dr_backward, setup_context=_dr_setup)


# --------------------------------------------------------------------------------------------------
# latent_normalize / latent_denormalize


def _check_stats(mean, var, D, N, op, like):
    for name, t in (("mean", mean), ("var", var)):
        check_tensor(t, op, name, ndim=3, like=like, same_dtype=False)
        if t.shape[0] != D or t.shape[1] * t.shape[2] != N:
            fail(op, name, f"must have shape [D, H, W] with D = {D} and H*W = {N} tokens, got "
                           f"{tuple(t.shape)}")
    if mean.shape != var.shape:
        fail(op, "var", f"must have the shape of 'mean' {tuple(mean.shape)}, got {tuple(var.shape)}")


def latent_normalize(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Tokens ``[B, N, D]`` → standardised channels-first ``[B, D, H, W]`` in one pass:
    ``(z − mean)/sqrt(var + eps)`` with dataset statistics ``mean, var [D, H, W]`` (RAE's stat.pt;
    token n = h·W + w). z: any strides, fp32/bf16/fp16/fp64; stats any float dtype (used in fp32).
    Differentiable w.r.t. z (the statistics are constants)."""
    op = "latent_normalize"
    check_tensor(z, op, "z", ndim=3)
    _check_stats(mean, var, z.shape[2], z.shape[1], op, z)
    check_eps(eps, "latent_normalize")
    return _ops.latent_normalize(z, mean, var, float(eps))


def latent_denormalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Inverse of :func:`latent_normalize`: ``[B, D, H, W]`` → tokens ``[B, N, D]`` with
    ``x·sqrt(var + eps) + mean``, one pass. Differentiable w.r.t. x."""
    op = "latent_denormalize"
    check_tensor(x, op, "x", ndim=4)
    _check_stats(mean, var, x.shape[1], x.shape[2] * x.shape[3], op, x)
    if tuple(mean.shape[1:]) != tuple(x.shape[2:]):
        fail(op, "mean", f"must have shape [D, H, W] = {list(x.shape[1:])}, got {list(mean.shape)}")
    check_eps(eps, "latent_denormalize")
    return _ops.latent_denormalize(x, mean, var, float(eps))


def latent_normalize_reference(z, mean, var, eps: float = 1e-5):
    acc = _acc(z.dtype)
    B, N, D = z.shape
    x = z.to(acc).transpose(1, 2).reshape(B, D, *mean.shape[1:])
    return ((x - mean.to(acc)) / torch.sqrt(var.to(acc) + eps)).to(z.dtype).contiguous()


def latent_denormalize_reference(x, mean, var, eps: float = 1e-5):
    acc = _acc(x.dtype)
    B, D, H, W = x.shape
    z = x.to(acc) * torch.sqrt(var.to(acc) + eps) + mean.to(acc)
    return z.reshape(B, D, H * W).transpose(1, 2).to(x.dtype).contiguous()


@torch.library.register_fake("raekern::latent_normalize")
def _(z, mean, var, eps):
    return z.new_empty((z.shape[0], z.shape[2], mean.shape[1], mean.shape[2]))


@torch.library.register_fake("raekern::latent_normalize_backward")
def _(grad, var, eps):
    B, D, H, W = grad.shape
    return grad.new_empty((B, H * W, D))


@torch.library.register_fake("raekern::latent_denormalize")
def _(x, mean, var, eps):
    B, D, H, W = x.shape
    return x.new_empty((B, H * W, D))


@torch.library.register_fake("raekern::latent_denormalize_backward")
def _(grad, var, eps):
    return grad.new_empty((grad.shape[0], grad.shape[2], var.shape[1], var.shape[2]))


def _ln_setup(ctx, inputs, output):
    _, _, var, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(var)


def _ln_backward(ctx, grad):
    (var,) = ctx.saved_tensors
    return _ops.latent_normalize_backward(grad, var, ctx.eps), None, None, None


def _ldn_backward(ctx, grad):
    (var,) = ctx.saved_tensors
    return _ops.latent_denormalize_backward(grad, var, ctx.eps), None, None, None


torch.library.register_autograd("raekern::latent_normalize", _ln_backward, setup_context=_ln_setup)
torch.library.register_autograd("raekern::latent_denormalize", _ldn_backward, setup_context=_ln_setup)
for _name in ("layer_stack_fuse", "depth_route", "latent_normalize", "latent_denormalize"):
    forbid_double_backward(f"{_name}_backward", _name)
