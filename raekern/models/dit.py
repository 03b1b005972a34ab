"""DiT-DH: RAE's diffusion transformer with a wide shallow head (v1, ``DiTwDDTHead``) and RAEv2's variant
with in-context condition tokens and a depth-8 base head (v2, ``DiTwDDTHeadIG``).

State dicts are key-for-key and shape-for-shape those of the released checkpoints
(reference/rae-family.md §1.4, §2.2), so ``load_state_dict(strict=True)`` loads them.
Forward signatures are the released ones: v1 ``forward(x, t, y) -> velocity``; v2
``forward(x, t, y) -> (x_full, x_base)`` (x-prediction). x is ``[B, C, H, W]``, t ``[B]`` in [0, 1]
(t = 1 noise), y ``[B]`` int64 labels with ``num_classes`` (1000) the null label.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from raekern.models.blocks import DiTBlock, FinalLayer, run_blocks
from raekern.models.layers import Rope2D, check_backend, gaussian_fourier, linear_for, sincos_2d


def _pair(v, name):
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"raekern.models: argument '{name}' must be an int or a [body, head] pair, got {v!r}")
        return tuple(v)
    return (v, v)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed with patch size 1 (key ``proj``: Conv2d ``[D, C, 1, 1]``): a per-token Linear."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)

    def forward(self, x):  # [B, C, H, W] -> [B, H*W, D]
        w = self.proj.weight.view(self.proj.out_channels, -1)
        return F.linear(x.flatten(2).transpose(1, 2), w, self.proj.bias)


class GaussianFourierEmbedder(nn.Module):
    """``t -> MLP([sin 2πtW, cos 2πtW])``, W ``[256]`` frozen; RAEv2 adds ``learnable_tokens`` ``[n, D]``."""

    def __init__(self, dim: int, embedding_size: int = 256, n_tokens: int = 0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))
        if n_tokens:
            self.learnable_tokens = nn.Parameter(torch.randn(n_tokens, dim) / dim**0.5)

    def forward(self, t):
        return self.mlp(gaussian_fourier(t, self.W.detach()).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """``embedding_table`` ``[num_classes + 1, D]``; row ``num_classes`` is the null label. In training mode,
    labels are replaced by the null label with probability ``dropout_prob`` (classifier-free guidance)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.0, n_tokens: int = 0):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        if n_tokens:
            self.learnable_tokens = nn.Parameter(torch.randn(n_tokens, dim) / dim**0.5)

    def forward(self, y, force_drop_ids: Optional[torch.Tensor] = None):
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            drop = (torch.rand(y.shape[0], device=y.device) < self.dropout_prob) if force_drop_ids is None \
                else force_drop_ids == 1
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


def _check_inputs(model, x, t, y):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"raekern.models: argument 'x' must be a [B, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, C, H, W = x.shape
    if C != model.in_channels or H != model.input_size or W != model.input_size:
        raise ValueError(f"raekern.models: argument 'x' must have shape [B, {model.in_channels}, {model.input_size}, "
                         f"{model.input_size}], got {tuple(x.shape)}")
    if not isinstance(t, torch.Tensor) or t.shape != (B,):
        raise ValueError(f"raekern.models: argument 't' must be a [B] = [{B}] tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(y, torch.Tensor) or y.shape != (B,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"raekern.models: argument 'y' must be a [B] = [{B}] integer tensor of labels, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    # dtype/device mismatches would otherwise surface as a GEMM error that names no argument
    p = next(model.parameters(), None)
    if not x.is_floating_point():
        raise TypeError(f"raekern.models: argument 'x' must be a floating-point latent, got {x.dtype}")
    if p is not None and x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"raekern.models: argument 'x' must have the model's dtype {p.dtype} (or run under "
                        f"torch.autocast), got {x.dtype}")
    if p is not None and x.device != p.device:
        raise ValueError(f"raekern.models: argument 'x' must be on the model's device {p.device}, got {x.device}")
    for name, v in (("t", t), ("y", y)):
        if v.device != x.device:
            raise ValueError(f"raekern.models: argument '{name}' must be on {x.device} like x, got {v.device}")
    # an out-of-range label would index past the embedding table (checked where it costs no device sync)
    if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi > model.num_classes:
            raise ValueError(f"raekern.models: argument 'y' must hold labels in [0, {model.num_classes}] "
                             f"({model.num_classes} = null label), got values in [{lo}, {hi}]")


def _unpatchify(x, C, H, W):  # [B, N, C] -> [B, C, H, W] (patch size 1)
    return x.transpose(1, 2).reshape(x.shape[0], C, H, W)


class _DiTBase(nn.Module):
    backend: str

    def set_backend(self, backend: str):
        from raekern.models.layers import set_backend
        return set_backend(self, backend)

    def _zero_init(self, blocks, finals):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.x_embedder, self.s_embedder):
            nn.init.xavier_uniform_(emb.proj.weight.view(emb.proj.out_channels, -1))
            nn.init.zeros_(emb.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for b in blocks:
            if b.adaln:
                lin = getattr(b, b.mod_name)[1]
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        for f in finals:
            lin = getattr(f, f.mod_name)[1]
            for p in (lin.weight, lin.bias, f.linear.weight, f.linear.bias):
                nn.init.zeros_(p)


class DiTDH(_DiTBase):
    """RAE v1's DiT^DH (``DiTwDDTHead`` with the released flags: RMSNorm, SwiGLU, 2-D RoPE, shift, no QK-norm).

    Body: ``depth[0]`` adaLN blocks of width ``hidden_size[0]`` on ``s_embedder(x) + pos_embed`` with the
    per-sample condition ``c = SiLU(t_emb + y_emb)``; bridge ``s = s_projector(SiLU(t_emb + s))``; head:
    ``depth[1]`` blocks of width ``hidden_size[1]`` on ``x_embedder(x)`` with per-token condition s; final
    layer modulated by s. Output: velocity ``[B, C, H, W]``.
    """

    version = 1

    def __init__(self, *, input_size: int = 16, in_channels: int = 768, hidden_size=(1152, 2048),
                 depth=(28, 2), num_heads=(16, 16), mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, use_qknorm: bool = False, use_pos_embed: bool = True,
                 backend: str = "raekern"):
        super().__init__()
        self.backend = check_backend(backend)
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        Ds, Dx = _pair(hidden_size, "hidden_size")
        ds, dx = _pair(depth, "depth")
        hs, hx = _pair(num_heads, "num_heads")
        self.hidden_size, self.depth, self.num_heads = (Ds, Dx), (ds, dx), (hs, hx)
        self.x_embedder = PatchEmbed(in_channels, Dx)
        self.s_embedder = PatchEmbed(in_channels, Ds)
        self.s_projector = nn.Linear(Ds, Dx) if Ds != Dx else nn.Identity()
        self.t_embedder = GaussianFourierEmbedder(Ds)
        self.y_embedder = LabelEmbedder(num_classes, Ds, class_dropout_prob)
        self.final_layer = FinalLayer(Dx, in_channels, version=1, backend=backend)
        self.use_pos_embed = use_pos_embed
        if use_pos_embed:
            self.pos_embed = nn.Parameter(sincos_2d(Ds, input_size)[None], requires_grad=False)
        self.enc_feat_rope = Rope2D(Ds // hs, input_size)
        self.dec_feat_rope = Rope2D(Dx // hx, input_size)
        self.blocks = nn.ModuleList(
            [DiTBlock(Ds, hs, mlp_ratio, version=1, qk_norm=use_qknorm, backend=backend) for _ in range(ds)]
            + [DiTBlock(Dx, hx, mlp_ratio, version=1, qk_norm=use_qknorm, backend=backend) for _ in range(dx)])
        self._zero_init(self.blocks, [self.final_layer])
        # as released (DiTwDDTHead.initialize_weights), not nn.Embedding's N(0, 1)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_inputs(self, x, t, y)
        B, C, H, W = x.shape
        ds = self.depth[0]
        t_emb = self.t_embedder(t)
        c = F.silu(t_emb + self.y_embedder(y))[:, None]  # [B, 1, Ds]
        s = self.s_embedder(x)
        if self.use_pos_embed:
            s = s + self.pos_embed
        s, _ = run_blocks(self.blocks[:ds], s, c, self.enc_feat_rope, backend=self.backend)
        s = linear_for(self.backend, self.s_projector, F.silu(t_emb[:, None] + s))
        h = self.x_embedder(x)
        s_silu = F.silu(s) if self.backend == "raekern" else None  # shared by the head's three adaLN GEMMs
        h, hn = run_blocks(self.blocks[ds:], h, s, self.dec_feat_rope, backend=self.backend,
                           final=self.final_layer.spec(s, s_silu), c_silu=s_silu)
        return _unpatchify(linear_for(self.backend, self.final_layer.linear, hn), C, H, W)

    @staticmethod
    def _in_interval(t, interval, like):
        lo, hi = interval
        if not lo < hi:
            raise ValueError(f"raekern.models: argument 'cfg_interval' must be (min, max) with min < max, got {interval}")
        return ((t >= lo) & (t <= hi)).view(-1, *([1] * (like.dim() - 1)))

    def forward_with_cfg(self, x, t, y, cfg_scale: float, cfg_interval=(0.0, 1.0)):
        """The released classifier-free-guidance entry point: the batch is ``[cond; uncond]`` (the second half
        labelled 1000); both halves get ``v_u + s·(v_c − v_u)`` where t lies in ``cfg_interval``, else
        ``v_c``. Drop-in for RAE's sampler; raekern.sampling has the fused guidance step."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        cond, uncond = out.chunk(2)
        th = t[: len(t) // 2]
        guided = torch.where(self._in_interval(th, cfg_interval, cond), uncond + cfg_scale * (cond - uncond), cond)
        return torch.cat([guided, guided])

    def forward_with_autoguidance(self, x, t, y, cfg_scale: float, additional_model_forward, cfg_interval=(0.0, 1.0)):
        """The released AutoGuidance entry point: ``v_weak + s·(v − v_weak)`` (weak model e.g. DiT^DH-S,
        s = 1.42 at 256 px) where t lies in ``cfg_interval``."""
        out = self.forward(x, t, y)
        weak = additional_model_forward(x, t, y)
        return torch.where(self._in_interval(t, cfg_interval, out), weak + cfg_scale * (out - weak), out)


class DiTDHv2(_DiTBase):
    """RAEv2's DiT^DH (``DiTwDDTHeadIG``): body of plain blocks (QK-RMSNorm, RoPE on image tokens only) on
    ``[image tokens | num_t_tokens time tokens | num_c_tokens class tokens]``; bridge
    ``s = s_projector(SiLU(t_emb + h[:, :N]))``; adaLN head as v1; base head after body block
    ``base_model_depth`` (``x_base = Linear(RMSNorm(u)·(1+scale)+shift)``, ``u = SiLU(t_emb + h8[:, :N])``,
    modulated by itself). Returns ``(x_full, x_base)`` (x-prediction), or ``x_full`` when
    ``base_model_depth`` is None.
    """

    version = 2

    def __init__(self, *, input_size: int = 16, in_channels: int = 1024, hidden_size=(1440, 2048),
                 depth=(28, 2), num_heads=(20, 16), mlp_ratio: float = 4.0, num_classes: int = 1000,
                 num_t_tokens: int = 4, num_c_tokens: int = 8, base_model_depth: Optional[int] = 8,
                 class_dropout_prob: float = 0.0, backend: str = "raekern"):
        super().__init__()
        self.backend = check_backend(backend)
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        Ds, Dx = _pair(hidden_size, "hidden_size")
        ds, dx = _pair(depth, "depth")
        hs, hx = _pair(num_heads, "num_heads")
        if base_model_depth is not None and not 1 <= base_model_depth <= ds:
            raise ValueError(f"raekern.models: argument 'base_model_depth' must be in [1, {ds}], got {base_model_depth}")
        self.hidden_size, self.depth, self.num_heads = (Ds, Dx), (ds, dx), (hs, hx)
        self.base_model_depth = base_model_depth
        self.s_embedder = PatchEmbed(in_channels, Ds)
        self.x_embedder = PatchEmbed(in_channels, Dx)
        self.s_projector = nn.Linear(Ds, Dx) if Ds != Dx else nn.Identity()
        self.t_embedder = GaussianFourierEmbedder(Ds, n_tokens=num_t_tokens)
        self.ctx_embedder = LabelEmbedder(num_classes, Ds, class_dropout_prob, n_tokens=num_c_tokens)
        self.blocks = nn.ModuleList(
            [DiTBlock(Ds, hs, mlp_ratio, version=2, adaln=False, backend=backend) for _ in range(ds)]
            + [DiTBlock(Dx, hx, mlp_ratio, version=2, adaln=True, backend=backend) for _ in range(dx)])
        self.final_layer = FinalLayer(Dx, in_channels, version=2, backend=backend)
        self.enc_rope = Rope2D(Ds // hs, input_size, extra_tokens=num_t_tokens + num_c_tokens)
        self.dec_rope = Rope2D(Dx // hx, input_size)
        finals = [self.final_layer]
        if base_model_depth is not None:
            self.base_final_layer = FinalLayer(Ds, in_channels, version=2, backend=backend)
            finals.append(self.base_final_layer)
        self._zero_init(self.blocks, finals)
        nn.init.normal_(self.ctx_embedder.embedding_table.weight, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        _check_inputs(self, x, t, y)
        B, C, H, W = x.shape
        N = H * W
        ds = self.depth[0]
        t_emb = self.t_embedder(t)[:, None]  # [B, 1, Ds]
        t_tok = self.t_embedder.learnable_tokens + t_emb
        c_tok = self.ctx_embedder.learnable_tokens + self.ctx_embedder(y)[:, None]
        seq = torch.cat([self.s_embedder(x), t_tok, c_tok], dim=1)
        taps = (self.base_model_depth,) if self.base_model_depth is not None else ()
        out = run_blocks(self.blocks[:ds], seq, None, self.enc_rope, backend=self.backend, taps=taps)
        seq = out[0]
        s = linear_for(self.backend, self.s_projector, F.silu(t_emb + seq[:, :N]))
        h = self.x_embedder(x)
        s_silu = F.silu(s) if self.backend == "raekern" else None
        h, hn = run_blocks(self.blocks[ds:], h, s, self.dec_rope, backend=self.backend,
                           final=self.final_layer.spec(s, s_silu), c_silu=s_silu)
        x_full = _unpatchify(linear_for(self.backend, self.final_layer.linear, hn), C, H, W)
        if self.base_model_depth is None:
            return x_full
        u = F.silu(t_emb + out[2][self.base_model_depth][:, :N])
        x_base = _unpatchify(self.base_final_layer(u, u), C, H, W)
        return x_full, x_base

    def forward_with_internal_guidance(self, x, t, y, scale: float = 1.78, interval=(0.1, 1.0)):
        """RAEv2's guidance from its own base head: ``x_base + s·(x_full − x_base)`` where t lies in
        ``interval`` (released ImageNet setting: s = 1.78, t ∈ [0.1, 1]), else ``x_full``. One forward."""
        if self.base_model_depth is None:
            raise ValueError("raekern.models: forward_with_internal_guidance needs a base head "
                             "(argument 'base_model_depth' was None)")
        x_full, x_base = self.forward(x, t, y)
        mask = DiTDH._in_interval(t, interval, x_full)
        return torch.where(mask, x_base + scale * (x_full - x_base), x_full)
