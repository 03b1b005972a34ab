"""Normalisation family (DESIGN §3.1): RMSNorm, LayerNorm, adaLN modulation, gated residual and the
fused residual → norm → modulate pair every DiT block calls.

All five ops are configurations of one fused row kernel (``csrc/norm/``) over ``x [B, N, D]``::

    x'  = x + gate * y                      # gated residual (optional)
    h   = norm(x') * weight + bias          # "layer" (LayerNorm) or "rms" (RMSNorm); fp32 statistics
    out = h * (1 + scale) + shift           # adaLN modulation (optional)

Layouts. ``shift``, ``scale`` and ``gate`` may be per sample (``[B, 1, D]`` or ``[B, D]``), per token
(``[B, N, D]``) or shared (``[D]``), with any strides: the chunks of an adaLN output
(``Linear(c).chunk(6, dim=-1)``, non-contiguous views) and ``expand``-ed (stride-0) tensors are read in
place, never copied. Their gradients are summed over the broadcast dimensions inside the kernel.
Outputs are contiguous.

Dtypes. float64, float32, bfloat16, float16 (all operands in x's dtype; ``weight``/``bias`` may be
any floating dtype, e.g. fp32 parameters with bf16 activations, and get gradients in their own dtype).
Statistics and all arithmetic are fp32 (fp64 for fp64 input), rounded once on output.

Devices. CPU kernels: AVX-512 (AVX2 otherwise) and multithreaded. CUDA kernels (fp32/bf16/fp16,
128-bit vector loads, fp32 block reductions) for sm_80/sm_90a; their GPU tests pass on an H200 (2026-11-30).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from raekern._utils.checks import (autocast_promote, check_broadcast, check_choice, check_eps, check_last_dim,
                                  check_tensor, fail)
from raekern._utils.library import forbid_double_backward

__all__ = [
    "rms_norm", "layer_norm", "norm_modulate", "gated_residual", "gated_residual_norm_modulate",
    "rms_norm_reference", "layer_norm_reference", "norm_modulate_reference", "gated_residual_reference",
    "gated_residual_norm_modulate_reference",
]

Kind = Literal["layer", "rms"]
_ops = torch.ops.raekern


# --------------------------------------------------------------------------------------------------
# argument handling (errors name the argument)

def _check_x(x, op: str, ndim: int | None = 3) -> None:
    if ndim is None:
        check_tensor(x, op, "x", min_ndim=1)
    else:
        check_tensor(x, op, "x", ndim=ndim)


def _check_affine(t: Optional[Tensor], x: Tensor, op: str, arg: str) -> None:
    if t is None:
        return
    check_tensor(t, op, arg, ndim=1, like=x, same_dtype=False)
    check_last_dim(t, x.shape[-1], op, arg)


def _as_operand(t, x: Tensor, op: str, arg: str) -> Tensor:
    """A broadcast operand as the [B', N', D] view the kernels take (no copy)."""
    check_tensor(t, op, arg, ndim=(1, 2, 3), like=x)
    B, N, D = x.shape
    check_last_dim(t, D, op, arg)
    if t.dim() == 1:
        return t[None, None]
    if t.dim() == 2:  # [B, D]: one row per sample
        if t.shape[0] not in (1, B):
            fail(op, arg, f"of shape {tuple(t.shape)} must be [B, D] = [{B}, {D}] (per sample), "
                          f"[B, 1, D] or [B, N, D] to modulate x of shape {tuple(x.shape)}")
        return t.unsqueeze(1)
    check_broadcast(t, x.shape, op, arg)
    return t


def _check_kind(kind, op: str) -> None:
    check_choice(kind, ("layer", "rms"), op, "kind")


# --------------------------------------------------------------------------------------------------
# public ops

def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x², -1) + eps) * weight``.

    x: ``[..., D]``, any strides. weight: optional ``[D]``. Returns a contiguous tensor like x.
    Differentiable in x and weight.
    """
    _check_x(x, "rms_norm", None)
    _check_affine(weight, x, "rms_norm", "weight")
    check_eps(eps, "rms_norm")
    return _ops.rms_norm(x, weight, float(eps))[0]


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dimension, affine optional (RAE features use the non-affine form).

    x: ``[..., D]``, any strides. weight, bias: optional ``[D]``. Differentiable in x, weight, bias.
    """
    _check_x(x, "layer_norm", None)
    _check_affine(weight, x, "layer_norm", "weight")
    _check_affine(bias, x, "layer_norm", "bias")
    check_eps(eps, "layer_norm")
    return _ops.layer_norm(x, weight, bias, float(eps))[0]


def norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, *, kind: Kind = "layer",
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  eps: float = 1e-6) -> Tensor:
    """adaLN modulation of a normalised input: ``norm(x) * (1 + scale) + shift``.

    x: ``[B, N, D]``. shift, scale: ``[B, 1, D]`` / ``[B, D]`` (per sample), ``[B, N, D]`` (per token)
    or ``[D]``, any strides (adaLN chunks are read in place). kind: ``"layer"`` or ``"rms"``; weight
    (and bias for "layer") are the norm's optional affine parameters ``[D]``.
    Differentiable in x, shift, scale, weight, bias.
    """
    op = "norm_modulate"
    x, shift, scale = autocast_promote(x, shift, scale)
    _check_x(x, op)
    _check_kind(kind, op)
    shift = _as_operand(shift, x, op, "shift")
    scale = _as_operand(scale, x, op, "scale")
    _check_affine(weight, x, op, "weight")
    _check_affine(bias, x, op, "bias")
    check_eps(eps, op)
    return _ops.norm_modulate(x, shift, scale, kind, weight, bias, float(eps))[0]


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """``x + gate * y`` (DiT's gated residual), computed in fp32 and rounded once.

    x, y: ``[B, N, D]`` (any strides). gate: ``[B, 1, D]`` / ``[B, D]`` / ``[B, N, D]`` / ``[D]``.
    Differentiable in x, gate, y.
    """
    op = "gated_residual"
    x, gate, y = autocast_promote(x, gate, y)
    _check_x(x, op)
    gate = _as_operand(gate, x, op, "gate")
    _check_y(y, x, op)
    return _ops.gated_residual(x, gate, y)


def gated_residual_norm_modulate(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, *,
                                 kind: Kind = "layer", weight: Optional[Tensor] = None,
                                 bias: Optional[Tensor] = None, eps: float = 1e-6
                                 ) -> tuple[Tensor, Tensor]:
    """The fused pair of a DiT block, in one pass over memory::

        x_out = x + gate * y
        out   = norm(x_out) * (1 + scale) + shift      # = norm_modulate(x_out, shift, scale, ...)

    Returns ``(x_out, out)``; shapes and layouts as in :func:`gated_residual` and
    :func:`norm_modulate`. For bf16/fp16, ``out`` normalises the rounded ``x_out`` (as the unfused
    pair would). Differentiable in x, gate, y, shift, scale, weight, bias.
    """
    op = "gated_residual_norm_modulate"
    x, gate, y, shift, scale = autocast_promote(x, gate, y, shift, scale)
    _check_x(x, op)
    _check_kind(kind, op)
    gate = _as_operand(gate, x, op, "gate")
    _check_y(y, x, op)
    shift = _as_operand(shift, x, op, "shift")
    scale = _as_operand(scale, x, op, "scale")
    _check_affine(weight, x, op, "weight")
    _check_affine(bias, x, op, "bias")
    check_eps(eps, op)
    x_out, out, _, _ = _ops.gated_residual_norm_modulate(x, gate, y, shift, scale, kind, weight, bias,
                                                         float(eps))
    return x_out, out


def _check_y(y, x: Tensor, op: str) -> None:
    check_tensor(y, op, "y", ndim=3, like=x)
    if y.shape != x.shape:
        fail(op, "y", f"must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")


# --------------------------------------------------------------------------------------------------
# plain-PyTorch references (the tests' ground truth, and the eager baseline of the benchmarks)

def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ref_operand(t: Tensor, x: Tensor) -> Tensor:
    return t.unsqueeze(1) if t.dim() == 2 and x.dim() == 3 else t


def _ref_norm(x: Tensor, kind: str, weight, bias, eps: float) -> Tensor:
    xf = x.to(_compute_dtype(x))
    if kind == "layer":
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        h = (xf - mean) * torch.rsqrt(var + eps)
    else:
        h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        h = h * weight.to(xf.dtype)
    if bias is not None:
        h = h + bias.to(xf.dtype)
    return h


def rms_norm_reference(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    return _ref_norm(x, "rms", weight, None, eps).to(x.dtype)


def layer_norm_reference(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                         eps: float = 1e-6) -> Tensor:
    return _ref_norm(x, "layer", weight, bias, eps).to(x.dtype)


def norm_modulate_reference(x: Tensor, shift: Tensor, scale: Tensor, *, kind: Kind = "layer",
                            weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                            eps: float = 1e-6) -> Tensor:
    h = _ref_norm(x, kind, weight, bias, eps)
    shift, scale = _ref_operand(shift, x).to(h.dtype), _ref_operand(scale, x).to(h.dtype)
    return (h * (1 + scale) + shift).to(x.dtype)


def gated_residual_reference(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    cd = _compute_dtype(x)
    return (x.to(cd) + _ref_operand(gate, x).to(cd) * y.to(cd)).to(x.dtype)


def gated_residual_norm_modulate_reference(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor,
                                           scale: Tensor, *, kind: Kind = "layer",
                                           weight: Optional[Tensor] = None,
                                           bias: Optional[Tensor] = None, eps: float = 1e-6
                                           ) -> tuple[Tensor, Tensor]:
    x_out = gated_residual_reference(x, gate, y)
    return x_out, norm_modulate_reference(x_out, shift, scale, kind=kind, weight=weight, bias=bias,
                                          eps=eps)


# --------------------------------------------------------------------------------------------------
# fake kernels: shapes/dtypes of every op, so torch.compile and torch.export trace through them

def _stat_dtype(x: Tensor) -> torch.dtype:
    return _compute_dtype(x)


def _affine_grad(t: Optional[Tensor], x: Tensor) -> Tensor:
    return t.new_empty(t.shape) if t is not None else x.new_empty((0,))


@torch.library.register_fake("raekern::rms_norm")
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=_stat_dtype(x))


@torch.library.register_fake("raekern::rms_norm_backward")
def _(grad_out, x, weight, rstd):
    return x.new_empty(x.shape), _affine_grad(weight, x)


@torch.library.register_fake("raekern::layer_norm")
def _(x, weight, bias, eps):
    stat = x.new_empty(x.shape[:-1], dtype=_stat_dtype(x))
    return x.new_empty(x.shape), stat, stat.new_empty(stat.shape)


@torch.library.register_fake("raekern::layer_norm_backward")
def _(grad_out, x, weight, bias, mean, rstd):
    return x.new_empty(x.shape), _affine_grad(weight, x), _affine_grad(bias, x)


@torch.library.register_fake("raekern::norm_modulate")
def _(x, shift, scale, kind, weight, bias, eps):
    stat = x.new_empty(x.shape[:-1], dtype=_stat_dtype(x))
    return x.new_empty(x.shape), stat, stat.new_empty(stat.shape)


@torch.library.register_fake("raekern::norm_modulate_backward")
def _(grad_out, x, shift, scale, kind, weight, bias, mean, rstd):
    return (x.new_empty(x.shape), shift.new_empty(shift.shape), scale.new_empty(scale.shape),
            _affine_grad(weight, x), _affine_grad(bias, x))


@torch.library.register_fake("raekern::gated_residual")
def _(x, gate, y):
    return x.new_empty(x.shape)


@torch.library.register_fake("raekern::gated_residual_backward")
def _(grad, gate, y):
    return gate.new_empty(gate.shape), grad.new_empty(grad.shape)


@torch.library.register_fake("raekern::gated_residual_norm_modulate")
def _(x, gate, y, shift, scale, kind, weight, bias, eps):
    stat = x.new_empty(x.shape[:-1], dtype=_stat_dtype(x))
    return x.new_empty(x.shape), x.new_empty(x.shape), stat, stat.new_empty(stat.shape)


@torch.library.register_fake("raekern::gated_residual_norm_modulate_backward")
def _(grad_x_out, grad_out, x_out, gate, y, shift, scale, kind, weight, bias, mean, rstd):
    return (x_out.new_empty(x_out.shape), gate.new_empty(gate.shape), x_out.new_empty(x_out.shape),
            shift.new_empty(shift.shape), scale.new_empty(scale.shape), _affine_grad(weight, x_out),
            _affine_grad(bias, x_out))


# --------------------------------------------------------------------------------------------------
# autograd: every backward is itself a custom op (with a fake kernel above)

def _opt(grad: Optional[Tensor], t: Optional[Tensor]) -> Optional[Tensor]:
    return grad if t is not None else None


def _rms_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_backward(ctx, grad_out, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _ops.rms_norm_backward(grad_out, x, weight, rstd)
    return dx, _opt(dw, weight), None


def _ln_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])


def _ln_backward(ctx, grad_out, _gm, _gr):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _ops.layer_norm_backward(grad_out, x, weight, bias, mean, rstd)
    return dx, _opt(dw, weight), _opt(db, bias), None


def _nm_setup(ctx, inputs, output):
    x, shift, scale, kind, weight, bias, _ = inputs
    ctx.kind = kind
    ctx.save_for_backward(x, shift, scale, weight, bias, output[1], output[2])


def _nm_backward(ctx, grad_out, _gm, _gr):
    x, shift, scale, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale, dw, db = _ops.norm_modulate_backward(grad_out, x, shift, scale, ctx.kind, weight,
                                                             bias, mean, rstd)
    return dx, dshift, dscale, None, _opt(dw, weight), _opt(db, bias), None


def _gr_setup(ctx, inputs, output):
    _, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gr_backward(ctx, grad):
    gate, y = ctx.saved_tensors
    dgate, dy = _ops.gated_residual_backward(grad, gate, y)
    return grad, dgate, dy


def _grnm_setup(ctx, inputs, output):
    x, gate, y, shift, scale, kind, weight, bias, _ = inputs
    x_out, _, mean, rstd = output
    # x_out = x + gate·y: with only the norm's operands requiring grad it is a constant, and says so.
    # (One call: each mark_non_differentiable replaces the previous set.)
    constant = () if any(t.requires_grad for t in (x, gate, y)) else (x_out,)
    ctx.mark_non_differentiable(*constant, mean, rstd)
    # An unused output's gradient arrives as None rather than a materialised zero tensor: with only
    # x_out used, the norm's operands then get None, as in the unfused pair (optimisers skip None, not 0).
    ctx.set_materialize_grads(False)
    ctx.kind = kind
    ctx.save_for_backward(x_out, gate, y, shift, scale, weight, bias, mean, rstd)


def _grnm_backward(ctx, grad_x_out, grad_out, _gm, _gr):
    x_out, gate, y, shift, scale, weight, bias, mean, rstd = ctx.saved_tensors
    if grad_out is None:
        if grad_x_out is None:  # pragma: no cover - autograd never asks for this
            return (None,) * 9
        dgate, dy = _ops.gated_residual_backward(grad_x_out, gate, y)
        return grad_x_out, dgate, dy, None, None, None, None, None, None
    dx, dgate, dy, dshift, dscale, dw, db = _ops.gated_residual_norm_modulate_backward(
        grad_x_out, grad_out, x_out, gate, y, shift, scale, ctx.kind, weight, bias, mean, rstd)
    return dx, dgate, dy, dshift, dscale, None, _opt(dw, weight), _opt(db, bias), None


torch.library.register_autograd("raekern::rms_norm", _rms_backward, setup_context=_rms_setup)
torch.library.register_autograd("raekern::layer_norm", _ln_backward, setup_context=_ln_setup)
torch.library.register_autograd("raekern::norm_modulate", _nm_backward, setup_context=_nm_setup)
torch.library.register_autograd("raekern::gated_residual", _gr_backward, setup_context=_gr_setup)
torch.library.register_autograd("raekern::gated_residual_norm_modulate", _grnm_backward,
                                setup_context=_grnm_setup)
for _name in ("rms_norm", "layer_norm", "norm_modulate", "gated_residual", "gated_residual_norm_modulate"):
    forbid_double_backward(f"{_name}_backward", _name)
