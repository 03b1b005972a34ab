"""DiT-DH transformer blocks (RAE v1 and RAEv2) and the block-sequence runner that fuses across blocks.

Module and parameter names follow the released checkpoints exactly (reference/rae-family.md §1.4, §2.2):
v1 ``LightningDDTBlock`` (``adaLN_modulation``, fused ``qkv``, ``w12``), v2 ``DDTEncoderBlock`` (no adaLN,
separate ``q``/``k``/``v`` with QK-RMSNorm, ``w1``/``w2``) and ``DDTDecoderBlock`` (``adaln_modulation``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raekern.models.layers import (DiTAttention, NormSpec, RMSNorm, Rope2D, SwiGLU, apply_norm, check_backend, dense,
                                   linear_for, residual_norm, swiglu_hidden)


class DiTBlock(nn.Module):
    """Pre-RMSNorm transformer block with SwiGLU; with ``adaln`` the adaLN condition gives
    ``(shift1, scale1, gate1, shift2, scale2, gate2)`` (condition ``[B,1,D]`` per sample or ``[B,N,D]`` per
    token), without it the block is a plain residual block (RAEv2 body).

    ``version=1``: RAE's ``LightningDDTBlock``; ``version=2``: RAEv2's ``DDTEncoderBlock`` /
    ``DDTDecoderBlock``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, version: int = 1, adaln: bool = True,
                 qk_norm: Optional[bool] = None, backend: str = "raekern"):
        super().__init__()
        self.version, self.adaln = version, adaln
        if qk_norm is None:
            qk_norm = version == 2
        self.norm1 = RMSNorm(dim, backend=backend)
        self.norm2 = RMSNorm(dim, backend=backend)
        self.attn = DiTAttention(dim, num_heads, fused_qkv=version == 1, qk_norm=qk_norm, backend=backend)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio), fused=version == 1, backend=backend)
        self.mod_name = "adaLN_modulation" if version == 1 else "adaln_modulation"
        if adaln:
            setattr(self, self.mod_name, nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)))
        self.backend = check_backend(backend)

    # --- pieces used by the fused runner -------------------------------------------------------------
    def modulation(self, c: Optional[torch.Tensor], c_silu: Optional[torch.Tensor] = None):
        """The six adaLN chunks as views of one GEMM output (None for a plain block). ``c_silu``:
        ``SiLU(c)`` computed once by the caller and shared by every consumer of the same condition."""
        if not self.adaln:
            return None
        mod = getattr(self, self.mod_name)
        out = mod(c) if c_silu is None else dense(c_silu, mod[1])
        return out.chunk(6, dim=-1)

    def norm_spec(self, which: int, mods) -> NormSpec:
        norm = self.norm1 if which == 1 else self.norm2
        if mods is None:
            return norm.spec()
        o = 0 if which == 1 else 3
        return norm.spec(mods[o], mods[o + 1])

    @staticmethod
    def gate(which: int, mods):
        return None if mods is None else mods[2 if which == 1 else 5]

    # --- plain forward (torch backend: the released computation) --------------------------------------
    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None, rope: Optional[Rope2D] = None):
        if self.backend == "raekern":
            x, _ = run_blocks([self], x, c, rope, backend="raekern")
            return x
        mods = self.modulation(c)
        h = apply_norm(x, self.norm_spec(1, mods), "torch")
        y = self.attn(h, rope)
        x = x + y if mods is None else x + mods[2] * y
        h = apply_norm(x, self.norm_spec(2, mods), "torch")
        y = self.mlp(h)
        return x + y if mods is None else x + mods[5] * y


def run_blocks(blocks: Sequence[DiTBlock], x: torch.Tensor, c: Optional[torch.Tensor], rope: Optional[Rope2D],
               *, backend: str, final: Optional[NormSpec] = None, taps: Sequence[int] = (),
               c_silu: Optional[torch.Tensor] = None):
    """Run ``blocks`` on ``x`` with condition ``c``. Returns ``(x, h)`` with ``h = final(x)`` (None without
    ``final``); with ``taps`` (1-based depths) returns ``(x, h, {depth: residual stream after it})``.

    raekern backend: each residual add is fused with the norm (and modulation) that consumes it, also
    across block boundaries and into ``final``; ``SiLU(c)`` is computed once for all blocks (pass it as
    ``c_silu`` to share it with ``final`` too).
    """
    tapped = {}
    if backend == "torch":
        for i, b in enumerate(blocks):
            x = b(x, c, rope)
            if i + 1 in taps:
                tapped[i + 1] = x
        h = None if final is None else apply_norm(x, final, "torch")
        return (x, h, tapped) if taps else (x, h)
    if not blocks:  # a zero-depth stack (e.g. DiTDH depth=(0, k)): nothing to fuse, only `final`
        h = None if final is None else apply_norm(x, final, backend)
        return (x, h, tapped) if taps else (x, h)
    if c is not None and c_silu is None:
        c_silu = F.silu(c)
    mods = [b.modulation(c, c_silu) for b in blocks]
    h = apply_norm(x, blocks[0].norm_spec(1, mods[0]), backend)
    for i, b in enumerate(blocks):
        y = b.attn(h, rope)
        x, h = residual_norm(x, b.gate(1, mods[i]), y, b.norm_spec(2, mods[i]), backend)
        y = b.mlp(h)
        nxt = blocks[i + 1].norm_spec(1, mods[i + 1]) if i + 1 < len(blocks) else final
        x, h = residual_norm(x, b.gate(2, mods[i]), y, nxt, backend)
        if i + 1 in taps:
            tapped[i + 1] = x
    return (x, h, tapped) if taps else (x, h)


class FinalLayer(nn.Module):
    """RMSNorm → per-token modulate (shift, scale from ``Linear(SiLU(c))``) → Linear (no gate).

    v1 names: ``norm_final``, ``adaLN_modulation``; v2: ``norm``, ``adaln_modulation``."""

    def __init__(self, dim: int, out_channels: int, *, version: int = 1, backend: str = "raekern"):
        super().__init__()
        self.norm_name = "norm_final" if version == 1 else "norm"
        self.mod_name = "adaLN_modulation" if version == 1 else "adaln_modulation"
        setattr(self, self.norm_name, RMSNorm(dim, backend=backend))
        self.linear = nn.Linear(dim, out_channels)
        setattr(self, self.mod_name, nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)))
        self.backend = check_backend(backend)

    def spec(self, c: torch.Tensor, c_silu: Optional[torch.Tensor] = None) -> NormSpec:
        mod = getattr(self, self.mod_name)
        shift, scale = (mod(c) if c_silu is None else dense(c_silu, mod[1])).chunk(2, dim=-1)
        return getattr(self, self.norm_name).spec(shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.dim() < x.dim():
            c = c.unsqueeze(1)
        return linear_for(self.backend, self.linear, apply_norm(x, self.spec(c), self.backend))
