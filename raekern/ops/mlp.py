"""MLP family: the gated activation between a transformer MLP's two GEMMs (SwiGLU, as every RAE /
RAEv2 DiT-DH block uses it)::

    h = silu(a) * b          # silu(a) = a * sigmoid(a)
    y = w3(h)                # the GEMMs stay torch's (nn.Linear)

Two entry points:

- :func:`swiglu` takes ``a`` and ``b`` as separate tensors (RAEv2's ``w1(x)``, ``w2(x)``).
- :func:`swiglu_packed` takes the ``[..., 2H]`` output of one fused ``w12`` Linear (RAE v1): ``a`` is
  the first half of the last dimension and ``b`` the second, read in place (no ``chunk`` copies).

Layouts. Any shape ``[..., H]`` and any strides: non-contiguous views, slices of a larger tensor
and ``expand``-ed (stride-0) inputs are read through their strides, never copied. ``a`` and ``b``
must have the same shape (no implicit broadcasting; ``expand`` first). Outputs and gradients are
contiguous; the packed backward writes ``d(ab)`` as one ``[..., 2H]`` tensor.

Dtypes. float64, float32, bfloat16, float16; bf16/fp16 are computed in fp32 and rounded once
(``silu(a)`` is not rounded before the product, unlike eager ``F.silu(a) * b`` in bf16). The
sigmoid is evaluated from ``exp(-|a|)``, so no intermediate overflows for any finite ``a``.

One helper of a Linear's backward: :func:`transpose_copy` (``x.t().contiguous()`` of a 2-D tensor, as
a new tensor). oneDNN's GEMM, which the raekern backend runs for fp32 Linears on AMD CPUs
(``raekern.models.layers``), takes both operands with the reduction dimension contiguous, so the weight
gradient ``dyᵀ·x`` needs ``dy`` and ``x`` transposed. torch copies a transposed fp32 matrix in
single-threaded 60×60 blocks; this op uses 16×16 (AVX-512) or 8×8 (AVX2) in-register transposes on
every thread. 4-byte dtypes with contiguous rows take the kernel; other inputs, and CUDA tensors,
take torch's copy.

Devices. CPU kernels: AVX-512 (a portable loop otherwise), multithreaded. CUDA kernels (fp32/bf16/
fp16, up to 128-bit vector accesses, 64-bit indexing, current stream) compile for sm_80/sm_90a and
are tested on the CPU through the host emulation and pass their GPU tests on an H200 (2026-11-30).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raekern._utils.checks import autocast_promote, check_tensor, fail
from raekern._utils.library import forbid_double_backward

__all__ = ["swiglu", "swiglu_packed", "swiglu_reference", "swiglu_packed_reference", "transpose_copy",
           "transpose_copy_reference"]

_ops = torch.ops.raekern


# --------------------------------------------------------------------------------------------------
# argument handling (errors name the argument)

def _check_pair(a, b, op: str) -> None:
    check_tensor(a, op, "a", min_ndim=1)
    check_tensor(b, op, "b", like=a)
    if b.shape != a.shape:
        fail(op, "b", f"must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)} "
                      "(expand it first to broadcast)")


def _check_packed(ab, op: str) -> None:
    check_tensor(ab, op, "ab", min_ndim=1)
    if ab.shape[-1] % 2:
        fail(op, "ab", f"must have an even last dimension [..., 2H] (a then b), got shape {tuple(ab.shape)}")


# --------------------------------------------------------------------------------------------------
# public ops

def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """``silu(a) * b``, computed in fp32 (fp64 for fp64 inputs) and rounded once.

    a, b: ``[..., H]`` of one shape, dtype and device; any strides (stride 0 included).
    Returns a contiguous ``[..., H]`` tensor in a's dtype. Differentiable in a and b.
    Under torch.autocast, mixed dtypes are promoted as eager ``silu(a) * b`` promotes them.
    """
    a, b = autocast_promote(a, b)
    _check_pair(a, b, "swiglu")
    return _ops.swiglu(a, b)


def swiglu_packed(ab: Tensor) -> Tensor:
    """``silu(a) * b`` with ``a, b = ab.chunk(2, dim=-1)``, reading both halves in place.

    ab: ``[..., 2H]`` (a fused w12 Linear's output), any strides. Returns a contiguous ``[..., H]``
    tensor in ab's dtype. Differentiable in ab (its gradient is one contiguous ``[..., 2H]`` tensor).
    """
    _check_packed(ab, "swiglu_packed")
    return _ops.swiglu_packed(ab)


# --------------------------------------------------------------------------------------------------
# plain-PyTorch references (the tests' ground truth, and the eager baseline of the benchmarks)

def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def swiglu_reference(a: Tensor, b: Tensor) -> Tensor:
    cd = _compute_dtype(a)
    return (F.silu(a.to(cd)) * b.to(cd)).to(a.dtype)


def swiglu_packed_reference(ab: Tensor) -> Tensor:
    a, b = ab.chunk(2, dim=-1)
    return swiglu_reference(a, b)


def transpose_copy(x: Tensor) -> Tensor:
    """``xᵀ`` of a 2-D ``x [R, C]`` as a new contiguous ``[C, R]`` tensor (never ``x`` itself).

    Any dtype and strides; fp32 (any 4-byte dtype) with contiguous rows runs the vectorised,
    multithreaded CPU kernel, the rest torch's copy. Differentiable (the gradient is the transpose of
    the output's gradient)."""
    check_tensor(x, "transpose_copy", "x", ndim=2, floating=False)
    return _ops.transpose_copy(x)


def transpose_copy_reference(x: Tensor) -> Tensor:
    """Plain-PyTorch transpose_copy."""
    return x.t().clone(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------------
# fake kernels: shapes/dtypes of every op, so torch.compile and torch.export trace through them

def _half(ab: Tensor) -> list[int]:
    return [*ab.shape[:-1], ab.shape[-1] // 2]


@torch.library.register_fake("raekern::swiglu")
def _(a, b):
    return a.new_empty(a.shape)


@torch.library.register_fake("raekern::swiglu_backward")
def _(grad, a, b):
    return a.new_empty(a.shape), a.new_empty(a.shape)


@torch.library.register_fake("raekern::swiglu_packed")
def _(ab):
    return ab.new_empty(_half(ab))


@torch.library.register_fake("raekern::swiglu_packed_backward")
def _(grad, ab):
    return ab.new_empty(ab.shape)


@torch.library.register_fake("raekern::transpose_copy")
def _(x):
    return x.new_empty((x.shape[1], x.shape[0]))


# --------------------------------------------------------------------------------------------------
# autograd: the backward is itself a custom op (with a fake kernel above)

def _sw_setup(ctx, inputs, output):
    a, b = inputs
    ctx.save_for_backward(a, b)


def _sw_backward(ctx, grad):
    a, b = ctx.saved_tensors
    da, db = _ops.swiglu_backward(grad, a, b)
    return da, db


def _swp_setup(ctx, inputs, output):
    (ab,) = inputs
    ctx.save_for_backward(ab)


def _swp_backward(ctx, grad):
    (ab,) = ctx.saved_tensors
    return _ops.swiglu_packed_backward(grad, ab)


torch.library.register_autograd("raekern::swiglu", _sw_backward, setup_context=_sw_setup)
torch.library.register_autograd("raekern::swiglu_packed", _swp_backward, setup_context=_swp_setup)
torch.library.register_autograd("raekern::transpose_copy", lambda ctx, grad: _ops.transpose_copy(grad),
                                setup_context=lambda ctx, inputs, output: None)
forbid_double_backward("swiglu_backward", "swiglu")
forbid_double_backward("swiglu_packed_backward", "swiglu_packed")
