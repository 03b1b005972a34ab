"""Pre-LayerNorm ViT layers in the three checkpoint layouts raekern loads, and one runner for them.

- ``Dinov2Layer``: Hugging Face DINOv2(-with-registers) (``norm1``, ``attention.attention.{query,key,value}``,
  ``attention.output.dense``, ``layer_scale1.lambda1``, ``norm2``, ``mlp.fc1/fc2``, ``layer_scale2.lambda1``).
- ``Dinov3Layer``: facebookresearch/dinov3 (``norm1``, ``attn.qkv`` (+ ``bias_mask``), ``attn.proj``,
  ``ls1.gamma``, ``norm2``, ``mlp.fc1/fc2``, ``ls2.gamma``).
- ``MAELayer``: RAE's ViT-MAE decoder layer (``layernorm_before``, ``attention.attention.{query,key,value}``,
  ``attention.output.dense``, ``layernorm_after``, ``intermediate.dense``, ``output.dense``).

raekern backend: attention through ``raekern.ops.attention`` and every residual (× layer scale) fused with
the LayerNorm that reads it next (``gated_residual_norm_modulate``), across layer boundaries too.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raekern.models.layers import (NormSpec, ViTSelfAttention, apply_norm, check_backend, layer_norm_spec,
                                   residual_norm)


class _Linear3(nn.Module):
    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=bias)
        self.key = nn.Linear(dim, dim, bias=bias)
        self.value = nn.Linear(dim, dim, bias=bias)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _HFAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attention = _Linear3(dim)
        self.output = _Dense(dim, dim)


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float, name: str):
        super().__init__()
        self.pname = name
        setattr(self, name, nn.Parameter(torch.full((dim,), float(init))))

    def value(self):
        return getattr(self, self.pname)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTLayerBase(nn.Module):
    """Interface the runner uses: ``ln1``/``ln2`` (nn.LayerNorm), ``qkv(h)``, ``out(o)``, ``ffn(h)``,
    ``gamma1()``/``gamma2()`` (layer scale or None)."""

    def __init__(self, dim: int, num_heads: int, backend: str):
        super().__init__()
        self.core = ViTSelfAttention(dim, num_heads, backend=backend)
        self.backend = check_backend(backend)

    def gamma1(self):
        return None

    def gamma2(self):
        return None


class Dinov2Layer(_ViTLayerBase):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6,
                 layerscale: float = 1.0, backend: str = "raekern"):
        super().__init__(dim, num_heads, backend)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attention = _HFAttention(dim)
        self.layer_scale1 = _LayerScale(dim, layerscale, "lambda1")
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale2 = _LayerScale(dim, layerscale, "lambda1")

    ln1 = property(lambda self: self.norm1)
    ln2 = property(lambda self: self.norm2)

    def qkv(self, h):
        a = self.attention.attention
        return a.query(h), a.key(h), a.value(h)

    def out(self, o):
        return self.attention.output.dense(o)

    def ffn(self, h):
        return self.mlp(h)

    def gamma1(self):
        return self.layer_scale1.value()

    def gamma2(self):
        return self.layer_scale2.value()


class _MaskedQKV(nn.Linear):
    """DINOv3's qkv Linear whose key bias is zeroed through ``bias_mask`` (1 for q and v, 0 for k), a
    buffer stored in the released checkpoints (key ``attn.qkv.bias_mask``)."""

    def __init__(self, dim: int):
        super().__init__(dim, 3 * dim)
        mask = torch.ones(3 * dim)
        mask[dim:2 * dim] = 0
        self.register_buffer("bias_mask", mask)


class _Dinov3Attn(nn.Module):
    def __init__(self, dim: int, mask_k_bias: bool):
        super().__init__()
        self.qkv = _MaskedQKV(dim) if mask_k_bias else nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Dinov3Layer(_ViTLayerBase):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5,
                 layerscale: float = 1e-5, mask_k_bias: bool = True, backend: str = "raekern"):
        super().__init__(dim, num_heads, backend)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Dinov3Attn(dim, mask_k_bias)
        self.ls1 = _LayerScale(dim, layerscale, "gamma")
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim, layerscale, "gamma")

    ln1 = property(lambda self: self.norm1)
    ln2 = property(lambda self: self.norm2)

    def qkv(self, h):
        bias = self.attn.qkv.bias
        if isinstance(self.attn.qkv, _MaskedQKV):
            bias = bias * self.attn.qkv.bias_mask.to(bias.dtype)
        return F.linear(h, self.attn.qkv.weight, bias).chunk(3, dim=-1)

    def out(self, o):
        return self.attn.proj(o)

    def ffn(self, h):
        return self.mlp(h)

    def gamma1(self):
        return self.ls1.value()

    def gamma2(self):
        return self.ls2.value()


class MAELayer(_ViTLayerBase):
    def __init__(self, dim: int, num_heads: int, intermediate: int, eps: float = 1e-12, backend: str = "raekern"):
        super().__init__(dim, num_heads, backend)
        self.attention = _HFAttention(dim)
        self.intermediate = _Dense(dim, intermediate)
        self.output = _Dense(intermediate, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)

    ln1 = property(lambda self: self.layernorm_before)
    ln2 = property(lambda self: self.layernorm_after)

    def qkv(self, h):
        a = self.attention.attention
        return a.query(h), a.key(h), a.value(h)

    def out(self, o):
        return self.attention.output.dense(o)

    def ffn(self, h):
        return self.output.dense(F.gelu(self.intermediate.dense(h)))


def _gate(g, x):
    return None if g is None else g.view(1, 1, -1).expand(x.shape[0], 1, x.shape[-1])


def run_vit(layers: Sequence[_ViTLayerBase], x: torch.Tensor, *, backend: str,
            final: Optional[NormSpec] = None, collect: Sequence[int] = (),
            rotate: Optional[Callable] = None):
    """Run pre-LN ViT ``layers`` on ``x [B, T, D]``.

    Returns ``(x, h, outs)``: the last residual stream, ``final(x)`` (None without ``final``), and the
    residual stream after each layer whose 0-based index is in ``collect`` (dict index → tensor).
    ``rotate(q, k)`` (``[B, T, D]`` each) applies a position encoding to q and k before attention.
    """
    outs = {}
    n = len(layers)
    if n == 0:
        return x, (None if final is None else apply_norm(x, final, backend)), outs
    h = apply_norm(x, layer_norm_spec(layers[0].ln1), backend)
    for i, L in enumerate(layers):
        q, k, v = L.qkv(h)
        if rotate is not None:
            q, k = rotate(q, k)
        y = L.out(L.core.attend(q, k, v))
        x, h = residual_norm(x, _gate(L.gamma1(), x), y, layer_norm_spec(L.ln2), backend)
        y = L.ffn(h)
        nxt = layer_norm_spec(layers[i + 1].ln1) if i + 1 < n else final
        x, h = residual_norm(x, _gate(L.gamma2(), x), y, nxt, backend)
        if i in collect:
            outs[i] = x
    return x, h, outs
