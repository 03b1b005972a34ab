"""Argument validation shared by every public op. Errors name the op and the argument."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def fail(op: str, arg: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"raekern.{op}: argument '{arg}' {msg}")


def check_tensor(
    t,
    op: str,
    arg: str,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    like: torch.Tensor | None = None,
    same_dtype: bool = True,
    floating: bool = True,
) -> torch.Tensor:
    """Check type, dtype, rank and device of one tensor argument; returns it unchanged."""
    if not isinstance(t, torch.Tensor):
        fail(op, arg, f"must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if floating and t.dtype not in FLOAT_DTYPES:
        fail(op, arg, f"must be float64/float32/bfloat16/float16, got {t.dtype}", TypeError)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            fail(op, arg, f"must have {want} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        fail(op, arg, f"must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    if like is not None:
        if t.device != like.device:
            fail(op, arg, f"must be on {like.device} like the input, got {t.device}")
        if same_dtype and floating and t.dtype != like.dtype:
            fail(op, arg, f"must have dtype {like.dtype} like the input, got {t.dtype}", TypeError)
    return t


def check_last_dim(t: torch.Tensor, d: int, op: str, arg: str) -> None:
    if t.shape[-1] != d:
        fail(op, arg, f"must have last dimension {d}, got shape {tuple(t.shape)}")


def check_broadcast(t: torch.Tensor, shape: Sequence[int], op: str, arg: str) -> None:
    """t must broadcast to `shape` without changing it (no dimension of `shape` grows).

    Compared dimension by dimension: torch.broadcast_shapes goes through the symbolic-shape
    machinery and cost ~50 µs per call, more than a small op's kernel."""
    ts, ss = tuple(t.shape), tuple(shape)
    if len(ts) > len(ss) or any(a != 1 and a != b for a, b in zip(reversed(ts), reversed(ss))):
        fail(op, arg, f"of shape {ts} does not broadcast to {ss}")


def is_int(v) -> bool:
    """A Python or numpy integer; bools are not integers here."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A Python or numpy real number; bools are not numbers here."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_eps(eps, op: str, arg: str = "eps") -> None:
    """A stabilising epsilon: a real number >= 0 (a negative one turns small variances into NaN)."""
    if not is_real(eps) or not eps >= 0:
        fail(op, arg, f"must be a float >= 0, got {eps!r}")


def check_positive(value, op: str, arg: str, what: str = "a finite float > 0") -> None:
    if not is_real(value) or not 0 < value < math.inf:
        fail(op, arg, f"must be {what}, got {value!r}")


def check_grid(grid, op: str, arg: str) -> tuple[int, int]:
    """A token grid ``(H, W)``: two positive integers; returned as Python ints."""
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(is_int(g) and g > 0 for g in grid)):
        fail(op, arg, f"must be a tuple (H, W) of positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


def check_choice(value, choices: Sequence, op: str, arg: str) -> None:
    if value not in choices:
        fail(op, arg, f"must be one of {list(choices)}, got {value!r}")


# Decided once at import: torch.compile (dynamo) of torch 2.11 cannot trace is_autocast_available.
_AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla")
                              if torch.amp.is_autocast_available(d))


def _autocast_on(x) -> bool:
    if not isinstance(x, torch.Tensor):
        return False
    dev = x.device.type
    return dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev)


def autocast_lower(*ts):
    """Under torch.autocast, floating tensors (fp64 excepted) in the autocast dtype, as autocast
    casts the inputs of ``scaled_dot_product_attention`` and the other ops of its lower-precision
    list. Outside autocast, and on devices without it (meta), the tensors pass through."""
    ref = next((t for t in ts if isinstance(t, torch.Tensor)), None)
    if not _autocast_on(ref):
        return ts
    dt = torch.get_autocast_dtype(ref.device.type)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype not in (dt, torch.float64) else t for t in ts)


def autocast_promote(x, *ts):
    """Under torch.autocast a Linear's output (bf16/fp16: adaLN chunks, an attention or MLP branch,
    DRoRAE's experts) meets an fp32 tensor (the residual stream, a LayerNorm output); eager PyTorch
    promotes that mixed expression, and so do the ops that call this. Outside autocast a dtype
    mismatch stays an error naming the argument. Devices without autocast (meta) pass through."""
    if not _autocast_on(x):
        return (x, *ts)
    dt = x.dtype
    for t in ts:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and x.is_floating_point():
            dt = torch.promote_types(dt, t.dtype)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dt else t
                 for t in (x, *ts))
