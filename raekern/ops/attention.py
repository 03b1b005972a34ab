"""DiT attention (DESIGN §3.3): non-causal scaled dot-product attention with optional fused
per-head QK-RMSNorm, RAE's 2-D RoPE and a key padding mask; forward and backward.

Paths (see :func:`attention_path`):

* ``raekern_cpu``  -- tiled online-softmax (flash) kernel, fp64/fp32/bf16/fp16, O(N·Dh) extra memory,
  QK-norm and RoPE applied while K/V/Q tiles are packed. Forward and backward.
* ``raekern_cuda`` -- sm80+ tensor-core (``mma.sync``) forward; training calls (inputs requiring grad)
  add the FlashAttention-2 backward (``attention_backward`` on CUDA: a tensor-core mainloop for bf16/fp16 at
  Dh ≤ 128 (multiples of 8), a SIMT one otherwise; fp32 accumulation, dQ by fp32
  atomics, or by per-key-block slabs summed in a fixed order when
  ``torch.are_deterministic_algorithms_enabled()``). **Compiled, and both emulated on the CPU (the
  forward's tensor-core instructions from their PTX definitions), but neither has run on a GPU yet.**
  Forward head dims: 64, 72, 128 exact, any other multiple of 8 up to 256 in a bucket. Unsupported
  dtypes / head dims use the fallback.
* ``sdpa`` -- explicit QK-norm and RoPE in PyTorch followed by ``F.scaled_dot_product_attention``.

Each call logs the chosen path at DEBUG level on the ``raekern.attention`` logger.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from raekern._utils.checks import (autocast_lower, check_choice, check_eps, check_grid, check_positive, check_tensor,
                                   fail, is_real)
from raekern._utils.library import build_info, forbid_double_backward

__all__ = [
    "attention",
    "attention_packed",
    "attention_reference",
    "attention_path",
    "attention_info",
    "rope_2d_reference",
    "qk_rms_norm_reference",
]

log = logging.getLogger("raekern.attention")
_OP = "attention"
_LAYOUTS = ("bnhd", "bhnd")


# ----------------------------------------------------------------------------- reference math
def qk_rms_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Per-head RMSNorm over the last dim; statistics in fp32 (fp64 for fp64), as RAEv2's RMSNorm."""
    if weight is None:
        return x
    xf = x if x.dtype == torch.float64 else x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight.to(x.dtype)


def _rope_tables(n: int, grid: tuple[int, int], dh: int, theta: float, device, dtype):
    """cos/sin [n, dh] for RAE's 2-D RoPE; rows past the grid are (1, 0), i.e. unrotated."""
    # Built on the target device: a host-to-device copy per call would be a sync per layer, and is
    # illegal inside CUDA-graph capture. fp64 angles where the device has fp64 (not MPS).
    gh, gw = grid
    npair = dh // 4
    ft = torch.float32 if torch.device(device).type == "mps" else torch.float64
    freqs = theta ** (-torch.arange(npair, dtype=ft, device=device) * 2.0 / (dh // 2))
    tok = torch.arange(n, dtype=torch.int64, device=device)
    row = (tok // gw).to(ft)
    col = (tok % gw).to(ft)
    ang = torch.cat([row[:, None] * freqs, col[:, None] * freqs], dim=-1)  # [n, dh/2]
    ang = ang.repeat_interleave(2, dim=-1)  # one angle per interleaved pair
    ang = torch.where((tok < gh * gw)[:, None], ang, torch.zeros_like(ang))
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope_2d_reference(x: torch.Tensor, grid: Optional[tuple[int, int]], theta: float = 10000.0) -> torch.Tensor:
    """RAE/RAEv2 2-D RoPE on x [..., N, Dh] (tokens on dim -2): first half of Dh rotated by the
    token's grid row, second half by its column, interleaved pairs (0,1),(2,3),...; tokens with
    index >= H·W are unrotated."""
    if grid is None:
        return x
    n, dh = x.shape[-2], x.shape[-1]
    cos, sin = _rope_tables(n, grid, dh, theta, x.device, x.dtype)
    pairs = x.unflatten(-1, (dh // 2, 2))
    rot = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rot * sin


def _prologue(q, k, v, layout, q_norm_weight, k_norm_weight, norm_eps, rope_grid, rope_theta):
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q = rope_2d_reference(qk_rms_norm_reference(q, q_norm_weight, norm_eps), rope_grid, rope_theta)
    k = rope_2d_reference(qk_rms_norm_reference(k, k_norm_weight, norm_eps), rope_grid, rope_theta)
    return q, k, v


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str = "bnhd",
    scale: Optional[float] = None,
    q_norm_weight: Optional[torch.Tensor] = None,
    k_norm_weight: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-6,
    rope_grid: Optional[tuple[int, int]] = None,
    rope_theta: float = 10000.0,
    key_padding_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Plain-PyTorch attention with the same arguments as :func:`attention`, in the input dtype
    (any float dtype, fp64 included). Rows whose keys are all masked give 0 (lse = -inf)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = _prologue(q, k, v, layout, q_norm_weight, k_norm_weight, norm_eps, rope_grid, rope_theta)
    s = (q @ k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :].to(torch.bool)
        s = s.masked_fill(~keep, float("-inf"))
        dead = ~keep.any(-1, keepdim=True)  # [B,1,1,1]: no key left for this batch
        s = s.masked_fill(dead, 0.0)
        p = torch.softmax(s, dim=-1) * keep.to(s.dtype)
    else:
        dead = None
        p = torch.softmax(s, dim=-1)
    out = p @ v
    if layout == "bnhd":
        out = out.transpose(1, 2)
    if not return_lse:
        return out
    lse = torch.logsumexp(s.to(torch.float64 if s.dtype == torch.float64 else torch.float32), dim=-1)
    if dead is not None:
        lse = lse.masked_fill(dead[..., 0], float("-inf"))
    return out, lse


def _sdpa_fallback(q, k, v, layout, scale, qw, kw, eps, grid, theta, mask):
    """Explicit norm + RoPE, then torch SDPA (used where no raekern kernel fits)."""
    qp, kp, vp = _prologue(q, k, v, layout, qw, kw, eps, grid, theta)
    attn_mask, dead = None, None
    if mask is not None:
        dead = ~mask.any(-1)  # SDPA returns NaN for rows with no key: attend to all, then zero
        attn_mask = (mask | dead[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=attn_mask, scale=scale)
    if dead is not None:  # unconditional: a data-dependent branch would break torch.compile(fullgraph)
        out = out * (~dead).to(out.dtype)[:, None, None, None]
    return out.transpose(1, 2) if layout == "bnhd" else out


# ----------------------------------------------------------------------------- custom-op glue
def _layout_sizes(t: torch.Tensor, layout: int):
    b, x1, x2, d = t.shape
    return (b, x1, x2, d) if layout == 0 else (b, x2, x1, d)  # (B, N, H, D)


@torch.library.register_fake("raekern::attention")
def _attention_fake(q, k, v, qw, kw, mask, scale, eps, rope_h, rope_w, theta, layout):
    b, n, h, _ = _layout_sizes(q, layout)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty((b, h, n), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


@torch.library.register_fake("raekern::attention_backward")
def _attention_backward_fake(dout, dlse, q, k, v, out, lse, qw, kw, mask, scale, eps, rope_h, rope_w,
                             theta, layout, deterministic):
    def wgrad(w):
        if w is None:
            return q.new_empty((0,))
        return torch.empty(w.shape, dtype=w.dtype, device=w.device)

    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=q.dtype, device=q.device),
            torch.empty(v.shape, dtype=q.dtype, device=q.device), wgrad(qw), wgrad(kw))


def _setup_context(ctx, inputs, output):
    q, k, v, qw, kw, mask, scale, eps, rope_h, rope_w, theta, layout = inputs
    out, lse = output
    if not any(t is not None and t.requires_grad for t in (q, k, qw, kw)):
        ctx.mark_non_differentiable(lse)  # the lse does not depend on v
    ctx.save_for_backward(q, k, v, out, lse, qw, kw, mask)
    ctx.params = (scale, eps, rope_h, rope_w, theta, layout)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, qw, kw, mask = ctx.saved_tensors
    scale, eps, rope_h, rope_w, theta, layout = ctx.params
    dq, dk, dv, dqw, dkw = torch.ops.raekern.attention_backward(
        dout, dlse, q, k, v, out, lse, qw, kw, mask, scale, eps, rope_h, rope_w, theta, layout,
        torch.are_deterministic_algorithms_enabled())
    return (dq, dk, dv, dqw if qw is not None else None, dkw if kw is not None else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd("raekern::attention", _backward, setup_context=_setup_context)


forbid_double_backward("attention_backward", "attention")


# ----------------------------------------------------------------------------- dispatch
_FORCE_CUDA_BACKWARD = "RAEKERN_CUDA_ATTENTION_BACKWARD"


def _cuda_backward_forced() -> bool:
    return os.environ.get(_FORCE_CUDA_BACKWARD, "0") not in ("", "0")


# RAEKERN_CUDA_ATTENTION: unset/"auto" = measured policy; "1" = raekern's CUDA kernels for every
# eligible call; "0" = never (SDPA). Read at each call, so a benchmark can time our kernel.
_CUDA_ATTENTION = "RAEKERN_CUDA_ATTENTION"


def _cuda_attention_mode() -> str:
    v = os.environ.get(_CUDA_ATTENTION, "").strip().lower()
    return "on" if v in ("1", "on") else "off" if v in ("0", "off") else "auto"


# Facts about the build and the GPU: computed once per key, and by torch.compile at trace time as
# constants (a cache dict, not functools.lru_cache, which dynamo would trace through).
_FACTS: dict = {}


def _assume_constant_result(fn):
    # torch.compiler.assume_constant_result imports torch._dynamo, 1.5 s of every `import raekern`;
    # all it does is set this mark, which dynamo reads when it traces a call (torch 2.11 to 2.14;
    # test_attention.py checks that the two still agree).
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def _cached(fn):
    def wrapper(*key):
        if (fn, key) not in _FACTS:
            _FACTS[(fn, key)] = fn(*key)
        return _FACTS[(fn, key)]
    return _assume_constant_result(functools.wraps(fn)(wrapper))


@_cached  # a build fact; a constant to dynamo (torch 2.11 cannot trace the dispatcher query)
def _has_kernel(key: str, op: str = "raekern::attention") -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


@_cached
def _arch_reason(major: int, minor: int) -> Optional[str]:
    archs = build_info()["cuda_archs"]  # e.g. "8.0,9.0a" (TORCH_CUDA_ARCH_LIST at build time)
    for a in filter(None, archs.split(",")):
        ptx, a = a.endswith("+PTX"), a.replace("+PTX", "")
        specific, a = a.endswith("a"), a.rstrip("a")
        am, an = (int(x) for x in a.split("."))
        if (am, an) == (major, minor) or (not specific and am == major and an <= minor):
            return None  # machine code this GPU runs (sm_80 code runs on sm_86/89)
        if ptx and not specific and (am, an) <= (major, minor):
            return None  # PTX the driver compiles for it
    return (f"this build has no kernel image for sm_{major}{minor} (built for {archs}); rebuild with "
            f"TORCH_CUDA_ARCH_LIST including {major}.{minor}")


def _no_kernel_image(device) -> Optional[str]:
    return _arch_reason(*torch.cuda.get_device_capability(device))


@_cached
def _smem_reason(device_index: int, dh: int, fwd_variant: str) -> Optional[str]:
    # fwd_variant: RAEKERN_ATTENTION_FWD, which picks the forward's tile config (and its shared memory)
    need = torch.ops.raekern.attention_cuda_fwd_smem(dh)
    have = getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", None)
    if have is None or need <= have:
        return None
    return (f"head dim {dh} needs {need} bytes of shared memory per block, this GPU gives {have} "
            "(A100 and sm_86/89: Dh <= 128)")


def _smem_short(device, dh: int) -> Optional[str]:
    return _smem_reason(torch.device(device).index or 0, dh, os.environ.get("RAEKERN_ATTENTION_FWD", ""))


def _path_reasons(q, k, v, qw, kw, mask, grid, layout: str = "bnhd") -> dict[str, Optional[str]]:
    dh = q.shape[-1]
    reasons: dict[str, Optional[str]] = {}
    # raekern_cpu
    if q.device.type != "cpu":
        reasons["raekern_cpu"] = f"inputs are on {q.device.type}, not cpu"
    elif dh > 256:
        reasons["raekern_cpu"] = f"head dim {dh} > 256"
    else:
        reasons["raekern_cpu"] = None
    # raekern_cuda
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, qw, kw))
    if q.device.type != "cuda":
        reasons["raekern_cuda"] = f"inputs are on {q.device.type}, not cuda"
    elif not _has_kernel("CUDA"):
        reasons["raekern_cuda"] = "raekern was built without CUDA kernels"
    elif torch.cuda.get_device_capability(q.device) < (8, 0):
        reasons["raekern_cuda"] = "needs compute capability >= 8.0 (mma.sync bf16/fp16)"
    elif (why := _no_kernel_image(q.device)) is not None:
        reasons["raekern_cuda"] = why
    elif q.dtype not in (torch.float16, torch.bfloat16):
        reasons["raekern_cuda"] = f"dtype {q.dtype} (the tensor-core kernel takes fp16/bf16)"
    elif dh % 8 or dh > 256:
        reasons["raekern_cuda"] = f"head dim {dh} is not a multiple of 8 up to 256 (16-byte rows)"
    elif (why := _smem_short(q.device, dh)) is not None:
        reasons["raekern_cuda"] = why
    elif max(_layout_sizes(q, _LAYOUTS.index(layout))[0::2]) > 65535:  # (B, H) of (B, N, H, D)
        reasons["raekern_cuda"] = "batch or heads > 65535 (the kernel's grid y/z)"
    elif needs_grad and not _has_kernel("CUDA", "raekern::attention_backward"):
        reasons["raekern_cuda"] = "inputs require grad and this build has no CUDA attention_backward kernel"
    elif needs_grad and not (torch.are_deterministic_algorithms_enabled() or _cuda_backward_forced()):
        # The raekern CUDA backward ran at 0.58-0.77x SDPA's on an H200 (2026-11-30): SDPA is the
        # default; ours is taken where it adds something SDPA lacks, a deterministic dq.
        reasons["raekern_cuda"] = ("inputs require grad: the raekern CUDA backward (0.58-0.77x SDPA's on an "
                                   "H200) is used only under torch.use_deterministic_algorithms(True) or "
                                   f"{_FORCE_CUDA_BACKWARD}=1")
    elif (mode := _cuda_attention_mode()) == "off":
        reasons["raekern_cuda"] = f"{_CUDA_ATTENTION}=0"
    elif (mode == "auto" and qw is None and kw is None and grid is None and mask is None
          and not (needs_grad and torch.are_deterministic_algorithms_enabled())):
        # Nothing to fuse: on an H200 (2026-11-30, benchmarks/results/2026-11-30-h200.txt) this sm80
        # forward ran at 0.43-0.76x SDPA's default (cuDNN) backend at the DiT shapes; with QK-norm and
        # RoPE fused it was 1.96x SDPA after the unfused norm and RoPE, so those calls stay here.
        reasons["raekern_cuda"] = (f"nothing to fuse (no QK-norm, RoPE or key mask): SDPA's flash/cuDNN "
                                   f"kernels are faster on Hopper; {_CUDA_ATTENTION}=1 forces raekern")
    else:
        reasons["raekern_cuda"] = None
    reasons["sdpa"] = None
    return reasons


def _choose(reasons: dict[str, Optional[str]]) -> str:
    for name in ("raekern_cuda", "raekern_cpu", "sdpa"):
        if reasons[name] is None:
            return name
    return "sdpa"  # pragma: no cover


def _validate(q, k, v, layout, scale, qw, kw, eps, grid, theta, mask):
    check_choice(layout, _LAYOUTS, _OP, "layout")
    check_tensor(q, _OP, "q", ndim=4)
    check_tensor(k, _OP, "k", ndim=4, like=q)
    check_tensor(v, _OP, "v", ndim=4, like=q)
    b, nq, h, dh = _layout_sizes(q, _LAYOUTS.index(layout))
    bk, nk, hk, dk = _layout_sizes(k, _LAYOUTS.index(layout))
    if (bk, hk, dk) != (b, h, dh):
        fail(_OP, "k", f"must match q in batch, heads and head dim ({layout}), got {tuple(k.shape)} "
             f"vs q {tuple(q.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        fail(_OP, "v", f"must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if dh < 1:
        fail(_OP, "q", f"must have a head dim >= 1, got {tuple(q.shape)}")
    if scale is not None and not is_real(scale):
        fail(_OP, "scale", f"must be a float or None, got {type(scale).__name__}", TypeError)
    if scale is not None and not abs(scale) < math.inf:
        fail(_OP, "scale", f"must be finite, got {scale!r}")
    for name, w in (("q_norm_weight", qw), ("k_norm_weight", kw)):
        if w is not None:
            check_tensor(w, _OP, name, ndim=1)
            if w.shape[0] != dh:
                fail(_OP, name, f"must have shape [{dh}] (the head dim), got {tuple(w.shape)}")
            if w.device != q.device:
                fail(_OP, name, f"must be on {q.device} like q, got {w.device}")
    check_eps(eps, _OP, "norm_eps")
    if grid is not None:
        check_grid(grid, _OP, "rope_grid")
        if dh % 4:
            fail(_OP, "rope_grid", f"needs a head dim divisible by 4, got {dh}")
        if grid[0] * grid[1] > min(nq, nk):
            fail(_OP, "rope_grid", f"{grid[0]}x{grid[1]} = {grid[0] * grid[1]} grid tokens, more than the "
                 f"{min(nq, nk)} tokens of q/k (the grid is the first H*W tokens)")
        check_positive(theta, _OP, "rope_theta", "a positive float")
    if mask is not None:
        check_tensor(mask, _OP, "key_padding_mask", floating=False)
        if mask.dtype != torch.bool:
            fail(_OP, "key_padding_mask", f"must be a bool tensor (True = keep), got {mask.dtype}", TypeError)
        if mask.dim() != 2 or mask.shape[1] != nk or mask.shape[0] not in (1, b):
            fail(_OP, "key_padding_mask", f"must have shape [{b}, {nk}] (or [1, {nk}]), got {tuple(mask.shape)}")
        if mask.device != q.device:
            fail(_OP, "key_padding_mask", f"must be on {q.device} like q, got {mask.device}")
        mask = mask.expand(b, nk)
    return mask


def attention_info() -> dict[str, str]:
    """What this build and machine offer, for ``raekern info``: the CPU kernels' instruction sets
    (``bf16_forward`` and ``bf16_backward``: amx / avx512bf16 / avx512 / avx2 / portable; ``fp32``:
    avx512 / avx2 / portable) and whether the CUDA forward and backward are compiled."""
    info = dict(item.split("=", 1) for item in torch.ops.raekern.attention_cpu_backends().split(";"))
    info["cuda_forward"] = "sm80 mma.sync" if _has_kernel("CUDA") else "not built"
    info["cuda_backward"] = ("sm80 mma.sync for bf16/fp16 up to Dh 128, SIMT otherwise; fp32 atomics or "
                             "deterministic slabs"
                             if _has_kernel("CUDA", "raekern::attention_backward") else "not built")
    return info


def attention_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bnhd",
                   q_norm_weight: Optional[torch.Tensor] = None, k_norm_weight: Optional[torch.Tensor] = None,
                   rope_grid: Optional[tuple[int, int]] = None,
                   key_padding_mask: Optional[torch.Tensor] = None, **_unused) -> tuple[str, dict]:
    """Which implementation :func:`attention` would run for these arguments, and why each of the
    others would not: ``(path, {path_name: None if eligible else reason})``."""
    reasons = _path_reasons(q, k, v, q_norm_weight, k_norm_weight, key_padding_mask, rope_grid, layout)
    return _choose(reasons), reasons


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str = "bnhd",
    scale: Optional[float] = None,
    q_norm_weight: Optional[torch.Tensor] = None,
    k_norm_weight: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-6,
    rope_grid: Optional[tuple[int, int]] = None,
    rope_theta: float = 10000.0,
    key_padding_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Non-causal attention ``softmax(scale · rope(norm(q)) · rope(norm(k))ᵀ) · v``.

    Args:
        q: ``[B, Nq, H, Dh]`` (``layout="bnhd"``) or ``[B, H, Nq, Dh]`` (``"bhnd"``); fp64/fp32/bf16/fp16.
            Any strides (views of a packed qkv projection, expanded/stride-0 dims); the head dim is
            read with unit stride (copied once otherwise).
        k, v: ``[B, Nk, H, Dh]`` / ``[B, H, Nk, Dh]``, same dtype and device as q.
        scale: softmax scale, default ``Dh ** -0.5``.
        q_norm_weight, k_norm_weight: ``[Dh]`` weights of a per-head RMSNorm (eps ``norm_eps``)
            applied to q / k before RoPE (RAEv2's QK-norm); None = no norm.
        rope_grid: ``(H, W)``: the first H·W tokens form a row-major grid and get RAE's 2-D RoPE
            (first half of Dh rotated by row, second half by column, interleaved pairs, base
            ``rope_theta``); later tokens (RAEv2's time/class tokens) are unrotated. Needs Dh % 4 == 0.
        key_padding_mask: bool ``[B, Nk]`` (or ``[1, Nk]``), True = attend. A row with no key gets
            output 0 and lse -inf.
        return_lse: also return the log-sum-exp of the scaled scores, ``[B, H, Nq]`` fp32 (fp64 for
            fp64 inputs).

    Returns:
        ``out`` in the input layout (and ``lse``). Differentiable in q, k, v and both norm weights
        (gradient through lse included).

    Devices: the CPU kernel (all four dtypes, Dh <= 256) runs forward and backward; on CUDA the
    tensor-core forward (bf16/fp16, Dh a multiple of 8 up to 256) and, for training, the CUDA backward
    (tensor cores up to Dh 128) run (neither
    has run on a GPU yet; the backward is deterministic when
    ``torch.are_deterministic_algorithms_enabled()``); other cases use torch SDPA with explicit norm
    and RoPE. :func:`attention_path` says which runs.

    Under torch.autocast, q, k and v are cast to the autocast dtype first, as autocast casts the
    inputs of ``scaled_dot_product_attention`` (the norm weights keep theirs).
    """
    q, k, v = autocast_lower(q, k, v)
    mask = _validate(q, k, v, layout, scale, q_norm_weight, k_norm_weight, norm_eps, rope_grid,
                     rope_theta, key_padding_mask)
    dh = q.shape[-1]
    scale = float(dh ** -0.5 if scale is None else scale)
    b, nq, h, _ = _layout_sizes(q, _LAYOUTS.index(layout))
    if q.numel() == 0 or _layout_sizes(k, _LAYOUTS.index(layout))[1] == 0:
        # an empty batch, head or query axis gives empty outputs; no keys at all gives 0 and lse -inf,
        # as for a fully masked row (the kernels assume at least one query and one key)
        out = q.new_zeros(q.shape)
        lse = q.new_full((b, h, nq), float("-inf"), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        return (out, lse) if return_lse else out
    reasons = _path_reasons(q, k, v, q_norm_weight, k_norm_weight, mask, rope_grid, layout)
    path = _choose(reasons)
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, q_norm_weight, k_norm_weight))
        bwd = ""
        if grad and path != "sdpa":
            # the CPU backward is deterministic whatever the flag says
            det = path == "raekern_cpu" or torch.are_deterministic_algorithms_enabled()
            bwd = f", backward={path} deterministic={det}"
        log.debug("attention %s %s q%s: path=%s%s (%s)", layout, q.dtype, tuple(q.shape), path, bwd,
                  "; ".join(f"{n}: {r}" for n, r in reasons.items() if r))
    if path == "sdpa":
        if return_lse:
            return attention_reference(q, k, v, layout=layout, scale=scale, q_norm_weight=q_norm_weight,
                                       k_norm_weight=k_norm_weight, norm_eps=norm_eps, rope_grid=rope_grid,
                                       rope_theta=rope_theta, key_padding_mask=mask, return_lse=True)
        return _sdpa_fallback(q, k, v, layout, scale, q_norm_weight, k_norm_weight, norm_eps, rope_grid,
                              rope_theta, mask)
    gh, gw = rope_grid if rope_grid is not None else (0, 0)
    out, lse = torch.ops.raekern.attention(q, k, v, q_norm_weight, k_norm_weight, mask, scale,
                                           float(norm_eps), int(gh), int(gw), float(rope_theta),
                                           _LAYOUTS.index(layout))
    return (out, lse) if return_lse else out


def attention_packed(qkv: torch.Tensor, num_heads: int, **kwargs):
    """Attention on the ``[B, N, 3·H·Dh]`` output of a fused qkv Linear (q, k, v in that order,
    each ``[H, Dh]`` head-major), read in place with no copy. Returns ``[B, N, H·Dh]``, the layout
    the output projection consumes (and lse ``[B, H, N]`` with ``return_lse=True``). Takes the
    keyword arguments of :func:`attention` except ``layout``."""
    check_tensor(qkv, "attention_packed", "qkv", ndim=3)
    if not isinstance(num_heads, int) or num_heads < 1:
        fail("attention_packed", "num_heads", f"must be a positive int, got {num_heads!r}")
    if "layout" in kwargs:
        fail("attention_packed", "layout", "is fixed by the packed [B, N, 3·H·Dh] input; do not pass it",
             TypeError)
    b, n, c = qkv.shape
    if c % (3 * num_heads):
        fail("attention_packed", "qkv", f"last dim {c} is not divisible by 3·num_heads = {3 * num_heads}")
    dh = c // (3 * num_heads)
    q, k, v = qkv.unflatten(-1, (3, num_heads, dh)).unbind(2)
    res = attention(q, k, v, layout="bnhd", **kwargs)
    if isinstance(res, tuple):
        return res[0].flatten(-2), res[1]
    return res.flatten(-2)
