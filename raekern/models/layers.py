"""Building blocks shared by raekern's models, and the one place where the backend is chosen.

Every model module takes ``backend="raekern"`` (run on raekern's fused custom ops) or
``backend="torch"`` (the same weights through plain PyTorch, written as the released RAE/RAEv2 code
computes it, for comparison and as a fallback). ``set_backend(model, name)`` switches a built model.

What the raekern backend fuses, per transformer block:
- ``norm → modulate`` in one pass (``raekern.ops.norm_modulate``), reading shift/scale as views of the
  adaLN output (no chunk copies);
- ``residual (+gate) → next norm (→ modulate)`` in one pass (``gated_residual_norm_modulate``),
  including across block boundaries: a block's last residual is fused with the next block's first norm;
- attention with the QK-RMSNorm and the 2-D RoPE inside the kernel (``attention`` /
  ``attention_packed``), so q and k are never rotated into copies.
- SwiGLU's ``silu(a)·b`` in one pass (``swiglu_packed`` reads the fused ``w12`` output's two halves in
  place, RAE v1; ``swiglu`` takes RAEv2's separate ``w1``/``w2`` outputs), fp32 math, one output buffer.
The GEMMs (nn.Linear) are torch's in both backends. On AMD CPUs the raekern backend's fp32 Linears
take oneDNN's GEMM instead of MKL's (``dense`` below): on a Zen 5, MKL's sgemm ran at 34-41 % of the FMA
peak and oneDNN's at about twice that.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("raekern", "torch")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"raekern.models: argument 'backend' must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every raekern model module inside ``model`` to ``backend``; returns ``model``."""
    check_backend(backend)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
        if hasattr(m, "use_raekern"):  # the fusion modules' spelling of the same switch
            m.use_raekern = backend == "raekern"
    return model


def _cpu_is_amd() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False


def _onednn_fp32_default() -> bool:
    """Whether fp32 CPU Linears of the raekern backend go through oneDNN (RAEKERN_CPU_LINEAR, else AMD)."""
    choice = os.environ.get("RAEKERN_CPU_LINEAR", "")
    if choice not in ("", "onednn", "torch"):
        raise ValueError(f"raekern.models: RAEKERN_CPU_LINEAR must be 'onednn' or 'torch', got {choice!r}")
    available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return available and (choice == "onednn" or (choice == "" and _cpu_is_amd()))


_ONEDNN_FP32: Optional[bool] = None


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), b, "none", [], "")


def _transposed(m: torch.Tensor) -> torch.Tensor:
    """mᵀ contiguous: raekern's multithreaded transpose (torch's copy of a transposed fp32 matrix runs
    single-threaded at 4-10 GB/s, 10 % of a DiT-DH-S training step on a Zen 5)."""
    return torch.ops.raekern.transpose_copy(m)


class _OneDNNLinear(torch.autograd.Function):
    """y = x·wᵀ + b with oneDNN's GEMM for the forward and both backward products (oneDNN's op has no
    autograd formula of its own): dx = dy·w and dw = dyᵀ·x, each as a linear with transposed copies of
    its operands (the linear reduces over its operands' contiguous dimension)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn_linear(x, w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_linear(g2, _transposed(w), None).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = _onednn_linear(_transposed(g2), _transposed(x.reshape(-1, x.shape[-1])), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def dense(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """``m(x)`` for the raekern backend. fp32 CPU Linears run oneDNN's GEMM where it is the faster one
    (AMD CPUs, or ``RAEKERN_CPU_LINEAR=onednn``), with gradients through ``_OneDNNLinear``; everything
    else, and anything under ``torch.compile`` or CPU autocast, is ``m(x)``, except that a no-grad CPU product
    with an output of 32 MiB or more writes into raekern's cached CPU output (``_large_cpu_linear``).
    Measured on 2 Zen 5 cores (2026-12-02): oneDNN 200-245 GFLOP/s against MKL's 80-135 at the DiT-DH-S
    GEMM shapes; results agree to ~1e-6 relative."""
    if not isinstance(m, nn.Linear):  # nn.Identity and other stand-ins
        return m(x)
    w, b = m.weight, m.bias
    if not _onednn_fp32_applies(x, w):
        large = _large_cpu_linear(x, w, b)
        return m(x) if large is None else large  # (under CPU autocast nn.Linear runs the autocast dtype's GEMM)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _OneDNNLinear.apply(x, w, b)
    return _onednn_linear(x, w, b)


_LARGE_OUTPUT_BYTES = 32 << 20  # raekern's CPU output cache takes outputs from this size on


def _plain_cpu(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    """A CPU product of one dtype, outside torch.compile and autocast."""
    return not (x.device.type != "cpu" or x.dtype != w.dtype or (b is not None and b.dtype != x.dtype)
                or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"))


def _records_grad(*ts: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _no_grad_cpu(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    """A plain CPU product (``_plain_cpu``) that autograd does not record."""
    return _plain_cpu(x, w, b) and not _records_grad(x, w, b)


def _large(rows: int, cols: int, t: torch.Tensor) -> bool:
    return rows * cols * t.element_size() >= _LARGE_OUTPUT_BYTES


def _linear_into(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """``x·wᵀ + b`` through ``addmm(out=)`` into an output from raekern's CPU output cache."""
    n_out = w.shape[0]
    out = torch.ops.raekern.empty_cpu_output([*x.shape[:-1], n_out], x.dtype)
    x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, n_out)
    if b is None:
        torch.mm(x2, w.t(), out=o2)
    else:
        torch.addmm(b, x2, w.t(), out=o2)
    return out


def _large_cpu_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``x·wᵀ + b`` into an output from raekern's CPU output cache when that output is 32 MiB or more
    and autograd does not record the product (sampling); None otherwise. glibc maps such a buffer fresh
    on every call and the kernel zeroes each page on first write: in DiT-DH-S's forward at B = 8 the
    head's [2048, 12288] and [2048, 10922] fp32 outputs spent ~25 % of the whole forward in page faults
    (2-core Xeon, 2026-12-02). Same GEMM as ``nn.Linear``."""
    if not _plain_cpu(x, w, b) or not _large(x.numel() // max(1, x.shape[-1]), w.shape[0], x):
        return None
    if _records_grad(x, w, b):  # a training step: caching its outputs and gradients measured no faster
        return None
    return _linear_into(x, w, b)


def _onednn_fp32_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``dense``'s oneDNN path takes this fp32 CPU product (see ``dense``)."""
    global _ONEDNN_FP32
    if _ONEDNN_FP32 is None:
        _ONEDNN_FP32 = _onednn_fp32_default()
    return (_ONEDNN_FP32 and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


def baddbmm_dense(b: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``torch.baddbmm(b, x, w)`` (``x [L, M, K]``, ``w [L, K, N]``, ``b [L, 1, N]``) for the raekern
    backend. Where ``dense`` takes oneDNN's GEMM (fp32, AMD CPUs), the L products run as L oneDNN
    linears: torch has no exact-fp32 oneDNN batched GEMM, and MKL's batched sgemm ran at 90 GFLOP/s on a
    Zen 5 against oneDNN's ~470 (DepthRoutedFusion at DINOv2-B, B = 8: 84 % of its forward + backward
    in bmm/baddbmm). Each expert's weight is transposed once per call (``transpose_copy``, which also
    carries its gradient back)."""
    if not _onednn_fp32_applies(x, w):
        if _no_grad_cpu(x, w, b) and x.shape[0] * x.shape[1] * w.shape[2] * x.element_size() >= _LARGE_OUTPUT_BYTES:
            out = torch.ops.raekern.empty_cpu_output([x.shape[0], x.shape[1], w.shape[2]], x.dtype)
            return torch.baddbmm(b, x, w, out=out)  # into a cached output (see _large_cpu_linear)
        return torch.baddbmm(b, x, w)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w, b))
    outs = []
    for xl, wl, bl in zip(x.unbind(0), w.unbind(0), b.unbind(0)):
        wt = _transposed(wl)  # [N, K], the linear's weight layout
        bias = bl.reshape(-1)
        outs.append(_OneDNNLinear.apply(xl, wt, bias) if grad else _onednn_linear(xl, wt, bias))
    return torch.stack(outs)


def linear_for(backend: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)``, through ``dense`` for the raekern backend."""
    return dense(x, m) if backend == "raekern" else m(x)


def _ops():
    """raekern.ops, checked for the ops the raekern backend needs (they live on other branches until merged)."""
    import raekern.ops as ops

    missing = [n for n in ("norm_modulate", "gated_residual", "gated_residual_norm_modulate", "attention",
                           "attention_packed", "layer_norm", "rms_norm", "swiglu", "swiglu_packed")
               if not hasattr(ops, n)]
    if missing:
        raise RuntimeError(
            f"raekern.models: backend='raekern' needs raekern.ops.{', '.join(missing)}, which this build does not "
            "have; use backend='torch'")
    return ops


def raekern_backend_available() -> bool:
    try:
        _ops()
    except RuntimeError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# Normalisation + modulation + residual, in both backends
# ----------------------------------------------------------------------------------------------------


class NormSpec(NamedTuple):
    """A norm to apply next, optionally followed by ``·(1+scale)+shift``."""

    kind: str  # "rms" | "layer"
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    shift: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None


def _torch_rms(x, weight, eps):
    # as the released RMSNorm: statistics in fp32 (fp64 stays fp64), cast back, then the weight
    xf = x if x.dtype == torch.float64 else x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return out * weight if weight is not None else out


def _torch_norm(x, spec: NormSpec):
    if spec.kind == "rms":
        h = _torch_rms(x, spec.weight, spec.eps)
    else:
        h = F.layer_norm(x, (x.shape[-1],), spec.weight, spec.bias, spec.eps)
    if spec.scale is not None:
        h = h * (1 + spec.scale) + spec.shift
    return h


def _zeros_like_mod(x):
    # stride-0 view: the fused ops read it without a copy
    return x.new_zeros(()).expand(x.shape[0], 1, x.shape[-1])


def _ones_like_gate(x):
    return x.new_ones(()).expand(x.shape[0], 1, x.shape[-1])


def apply_norm(x: torch.Tensor, spec: NormSpec, backend: str) -> torch.Tensor:
    if backend == "torch":
        return _torch_norm(x, spec)
    ops = _ops()
    if spec.scale is None:
        if spec.kind == "rms":
            return ops.rms_norm(x, spec.weight, eps=spec.eps)
        return ops.layer_norm(x, spec.weight, spec.bias, eps=spec.eps)
    return ops.norm_modulate(x, spec.shift, spec.scale, kind=spec.kind, weight=spec.weight, bias=spec.bias,
                             eps=spec.eps)


def residual_norm(x: torch.Tensor, gate: Optional[torch.Tensor], y: torch.Tensor, nxt: Optional[NormSpec],
                  backend: str):
    """``x' = x + gate·y`` (gate None: 1), then ``h = nxt(x')``; returns ``(x', h)`` (h None if nxt is None)."""
    if backend == "torch":
        x = x + y if gate is None else x + gate * y
        return x, (None if nxt is None else _torch_norm(x, nxt))
    ops = _ops()
    if gate is None:
        gate = _ones_like_gate(x)
    if nxt is None:
        return ops.gated_residual(x, gate, y), None
    shift, scale = nxt.shift, nxt.scale
    if scale is None:
        shift = scale = _zeros_like_mod(x)
    return ops.gated_residual_norm_modulate(x, gate, y, shift, scale, kind=nxt.kind, weight=nxt.weight,
                                            bias=nxt.bias, eps=nxt.eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight (key ``weight``); eps 1e-6, statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "raekern"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend = check_backend(backend)

    def spec(self, shift=None, scale=None) -> NormSpec:
        return NormSpec("rms", self.weight, None, self.eps, shift, scale)

    def forward(self, x):
        return apply_norm(x, self.spec(), self.backend)


def layer_norm_spec(norm: nn.LayerNorm, shift=None, scale=None) -> NormSpec:
    return NormSpec("layer", norm.weight, norm.bias, norm.eps, shift, scale)


# ----------------------------------------------------------------------------------------------------
# RoPE tables (checkpoint buffers) and the torch-backend rotation
# ----------------------------------------------------------------------------------------------------


def rope_2d_tables(head_dim: int, grid: int, extra_tokens: int = 0, theta: float = 10000.0):
    """cos/sin tables ``[grid²+extra_tokens, head_dim]`` of RAE's 2-D RoPE.

    First half of head_dim rotated by the token's row, second half by its column; frequency k
    (k < head_dim/4) is ``theta^(-4k/head_dim)`` and is shared by the interleaved pair (2k, 2k+1).
    Tokens past the grid (RAEv2's time/class tokens) get angle 0 (cos 1, sin 0: unrotated).
    """
    if head_dim % 4:
        raise ValueError(f"raekern.models: 2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))  # [head_dim/4]
    pos = torch.arange(grid, dtype=torch.float32)
    ang = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # [grid, half]
    rows = ang[:, None, :].expand(grid, grid, half)
    cols = ang[None, :, :].expand(grid, grid, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    if extra_tokens:
        angles = torch.cat([angles, angles.new_zeros(extra_tokens, head_dim)], dim=0)
    return angles.cos(), angles.sin()


def _rotate_pairs(x):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class Rope2D(nn.Module):
    """The RoPE buffers as the released checkpoints store them (``freqs_cos``, ``freqs_sin``)."""

    def __init__(self, head_dim: int, grid: int, extra_tokens: int = 0, theta: float = 10000.0):
        super().__init__()
        self.grid, self.theta = grid, theta
        cos, sin = rope_2d_tables(head_dim, grid, extra_tokens, theta)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def rotate(self, t):  # t [B, H, N, Dh]; torch backend only
        return t * self.freqs_cos + _rotate_pairs(t) * self.freqs_sin


# ----------------------------------------------------------------------------------------------------
# Attention and MLPs
# ----------------------------------------------------------------------------------------------------


class DiTAttention(nn.Module):
    """Multi-head self-attention of DiT-DH: fused ``qkv`` (v1) or separate ``q``/``k``/``v`` (v2) Linear with
    bias, optional per-head QK-RMSNorm (``q_norm.weight``, ``k_norm.weight``), 2-D RoPE on the first grid²
    tokens, non-causal softmax attention, ``proj``."""

    def __init__(self, dim: int, num_heads: int, *, fused_qkv: bool = True, qk_norm: bool = False,
                 backend: str = "raekern"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"raekern.models: argument 'num_heads' ({num_heads}) must divide the width {dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(dim, dim)
            self.v = nn.Linear(dim, dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, backend=backend)
            self.k_norm = RMSNorm(self.head_dim, backend=backend)
        self.proj = nn.Linear(dim, dim)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, rope: Optional[Rope2D] = None, key_padding_mask=None) -> torch.Tensor:
        B, N, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        if self.backend == "raekern":
            ops = _ops()
            kw = dict(q_norm_weight=self.q_norm.weight if self.qk_norm else None,
                      k_norm_weight=self.k_norm.weight if self.qk_norm else None,
                      norm_eps=self.q_norm.eps if self.qk_norm else 1e-6,
                      rope_grid=(rope.grid, rope.grid) if rope is not None else None,
                      rope_theta=rope.theta if rope is not None else 10000.0,
                      key_padding_mask=key_padding_mask)
            if self.fused_qkv:
                out = ops.attention_packed(dense(x, self.qkv), H, **kw)
            else:
                q = dense(x, self.q).view(B, N, H, Dh)
                k = dense(x, self.k).view(B, N, H, Dh)
                v = dense(x, self.v).view(B, N, H, Dh)
                out = ops.attention(q, k, v, layout="bnhd", **kw).reshape(B, N, D)
            return dense(out, self.proj)
        if self.fused_qkv:
            q, k, v = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q(x).reshape(B, N, H, Dh).transpose(1, 2)
            k = self.k(x).reshape(B, N, H, Dh).transpose(1, 2)
            v = self.v(x).reshape(B, N, H, Dh).transpose(1, 2)
        if self.qk_norm:
            q = _torch_rms(q, self.q_norm.weight, self.q_norm.eps)
            k = _torch_rms(k, self.k_norm.weight, self.k_norm.eps)
        if rope is not None:
            q, k = rope.rotate(q).to(v.dtype), rope.rotate(k).to(v.dtype)
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    """``w3(silu(a)·b)``; ``fused``: one ``w12`` Linear giving [a | b] (RAE v1), else ``w1``/``w2`` (RAEv2)."""

    def __init__(self, dim: int, hidden: int, *, fused: bool = True, backend: str = "raekern"):
        super().__init__()
        self.fused = fused
        self.backend = check_backend(backend)
        if fused:
            self.w12 = nn.Linear(dim, 2 * hidden)
        else:
            self.w1 = nn.Linear(dim, hidden)
            self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        if self.backend == "raekern":
            ops = _ops()
            h = ops.swiglu_packed(dense(x, self.w12)) if self.fused else ops.swiglu(dense(x, self.w1), dense(x, self.w2))
            return dense(h, self.w3)
        if self.fused:
            a, b = self.w12(x).chunk(2, dim=-1)
        else:
            a, b = self.w1(x), self.w2(x)
        return self.w3(F.silu(a) * b)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    return int(2 / 3 * dim * mlp_ratio)


class ViTSelfAttention(nn.Module):
    """Attention of the ViT encoders/decoder with separate q/k/v projections; RoPE (if any) is applied by
    the caller-supplied ``rotate`` (DINOv3's convention differs from RAE's, so it stays in torch)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "raekern"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.backend = check_backend(backend)

    def attend(self, q, k, v):
        """q, k, v ``[B, N, H*Dh]`` → ``[B, N, H*Dh]``."""
        B, N, D = q.shape
        H, Dh = self.num_heads, self.head_dim
        if self.backend == "raekern":
            out = _ops().attention(q.view(B, N, H, Dh), k.view(B, N, H, Dh), v.view(B, N, H, Dh), layout="bnhd")
            return out.reshape(B, N, D)
        q, k, v = (t.view(B, N, H, Dh).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)


def sincos_2d(dim: int, grid: int, cls_token: bool = False) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table ``[grid² (+1), dim]``: first half encodes the column (w), second half
    the row (h) — the layout RAE's ``pos_embed``/``decoder_pos_embed`` were built with (computed in fp64)."""
    if dim % 4:
        raise ValueError(f"raekern.models: sin-cos position table needs a width divisible by 4, got {dim}")

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = torch.outer(pos.reshape(-1), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    g = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(g, g, indexing="xy")  # gw[i, j] = j (column), gh[i, j] = i (row)
    emb = torch.cat([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb.float()


def gaussian_fourier(t: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``[sin(2π t W), cos(2π t W)]``, t ``[B]`` in [0, 1]."""
    dt = torch.promote_types(W.dtype, torch.float32)  # the angle in fp32 at least, as released
    a = t[:, None].to(dt) * W[None, :].to(dt) * 2 * math.pi
    return torch.cat([a.sin(), a.cos()], dim=-1)
