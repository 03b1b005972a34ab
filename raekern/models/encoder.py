"""Frozen ViT encoders whose features are RAE latents.

- :class:`Dinov2Encoder`: DINOv2 with registers (S/B/L) in the Hugging Face layout (a local folder with
  ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``), RAE v1's encoder.
- :class:`Dinov3Encoder`: DINOv3 ViT-L/16 in its released layout (``dinov3_vitl16_pretrain_*.pth``: RoPE,
  4 storage tokens, masked key bias, layer scale), RAEv2's encoder.

Both take images in [0, 1], resize them (bicubic) to ``input_size`` and ImageNet-normalise them as RAE
does, and return the outputs of the requested blocks **with the prefix tokens** (CLS + registers/storage,
``num_prefix_tokens`` of them) — the form the fusion modules take. Parameters are frozen
(``requires_grad=False``); ``.to(torch.bfloat16)`` gives a bf16 encoder. Nothing is downloaded: weights come
from local files only, and a missing file raises ``FileNotFoundError`` naming the path.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raekern.models.decoder import PixelStats
from raekern.models.layers import check_backend
from raekern.models.vit import Dinov2Layer, Dinov3Layer, run_vit


class _FrozenEncoder(PixelStats):
    input_size: int
    depth: int

    def _freeze(self):
        self.requires_grad_(False)
        self.eval()
        self._register_pixel_stats()

    def train(self, mode: bool = True):
        # frozen: dropout-free already, but keep eval semantics whatever the parent does
        return super().train(False)

    def set_backend(self, backend: str):
        from raekern.models.layers import set_backend
        return set_backend(self, backend)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, h, w]`` in [0, 1] → bicubic resize to ``input_size`` → ImageNet mean/std."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("raekern.models: argument 'images' must be a [B, 3, H, W] tensor in [0, 1], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if not images.is_floating_point():  # uint8 [0, 255] read as [0, 1] would be silently wrong
            raise TypeError(f"raekern.models: argument 'images' must be a floating-point tensor in [0, 1], got "
                            f"{images.dtype} (divide uint8 images by 255)")
        dtype = images.dtype
        x = images.to(dtype)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        return (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)

    def _layer_indices(self, layers) -> list[int]:
        if layers is None:
            layers = (self.depth - 1,)
        if isinstance(layers, int):
            layers = (layers,)
        idx = []
        for i in layers:
            j = i + self.depth if i < 0 else i
            if not 0 <= j < self.depth:
                raise ValueError(f"raekern.models: argument 'layers' holds block index {i}, outside "
                                 f"[-{self.depth}, {self.depth - 1}]")
            idx.append(j)
        return idx

    def forward(self, images: torch.Tensor, layers: Optional[Sequence[int] | int] = None) -> list[torch.Tensor]:
        """Images in [0, 1] → outputs of blocks ``layers`` (0-based, negatives from the end; default: last),
        each ``[B, num_prefix_tokens + N, D]`` (before the final norm)."""
        return self.forward_features(self.preprocess(images), layers)


def _load_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"raekern.models: encoder config not found: {cfg_path} (expected a local Hugging "
                                "Face folder with config.json and model.safetensors or pytorch_model.bin)")
    with open(cfg_path) as f:
        return json.load(f)


class Dinov2Encoder(_FrozenEncoder):
    """DINOv2(-with-registers) ViT in the Hugging Face key layout (``embeddings.*``, ``encoder.layer.{i}.*``,
    ``layernorm.*``); a plain DINOv2 folder (``model_type`` "dinov2") loads with no register tokens. Patch 14; the position table (``image_size/14`` squared + CLS) is bicubically resized
    (antialiased, in fp32) to the input grid as transformers does; tokens are ``[CLS, registers, patches]``.
    RAE v1: ``input_size=224`` → 16×16 patches."""

    def __init__(self, *, hidden_size: int = 768, depth: int = 12, num_heads: int = 12, patch_size: int = 14,
                 image_size: int = 518, num_register_tokens: int = 4, mlp_ratio: float = 4.0,
                 layer_norm_eps: float = 1e-6, layerscale: float = 1.0, input_size: int = 224,
                 backend: str = "raekern"):
        super().__init__()
        self.backend = check_backend(backend)
        self.hidden_size, self.depth, self.patch_size = hidden_size, depth, patch_size
        self.input_size, self.num_register_tokens = input_size, num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens
        self.pos_grid = image_size // patch_size
        self.embeddings = _Dinov2Embeddings(hidden_size, patch_size, self.pos_grid, num_register_tokens)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            [Dinov2Layer(hidden_size, num_heads, mlp_ratio, layer_norm_eps, layerscale, backend=backend)
             for _ in range(depth)])
        self.layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self._freeze()

    @classmethod
    def config_from_hf(cls, cfg: dict) -> dict:
        if cfg.get("use_swiglu_ffn", False) or cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError("raekern.models: only DINOv2 checkpoints with a GELU MLP (S/B/L) are supported")
        return dict(hidden_size=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
                    num_heads=cfg["num_attention_heads"], patch_size=cfg.get("patch_size", 14),
                    image_size=cfg.get("image_size", 518),
                    # plain DINOv2 ("model_type": "dinov2") has no registers and no such config key
                    num_register_tokens=cfg.get("num_register_tokens",
                                                0 if cfg.get("model_type") == "dinov2" else 4),
                    mlp_ratio=cfg.get("mlp_ratio", 4), layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
                    layerscale=cfg.get("layerscale_value", 1.0))

    @classmethod
    def from_pretrained(cls, path: str, *, input_size: int = 224, backend: str = "raekern",
                        device=None, dtype=None) -> "Dinov2Encoder":
        """Build from a local Hugging Face folder (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``) and load its weights (strict)."""
        from raekern.models.checkpoints import find_weights, load_state_dict_into, read_checkpoint
        cfg = cls.config_from_hf(_load_hf_config(path))
        weights = find_weights(path)
        model = cls(**cfg, input_size=input_size, backend=backend)
        load_state_dict_into(model, read_checkpoint(weights), what=f"DINOv2 encoder from {weights}")
        return model.to(device=device, dtype=dtype)

    def _pos_embed(self, h: int, w: int, dtype) -> torch.Tensor:
        pe = self.embeddings.position_embeddings
        if h == self.pos_grid and w == self.pos_grid:
            return pe.to(dtype)
        D = pe.shape[-1]
        grid = pe[:, 1:].reshape(1, self.pos_grid, self.pos_grid, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        grid = grid.to(pe.dtype).permute(0, 2, 3, 1).reshape(1, h * w, D)
        return torch.cat([pe[:, :1], grid], dim=1).to(dtype)

    def forward_features(self, pixel_values: torch.Tensor, layers=None) -> list[torch.Tensor]:
        """ImageNet-normalised pixels → outputs of blocks ``layers`` ``[B, 1+R+N, D]``."""
        idx = self._layer_indices(layers)
        e = self.embeddings
        proj = e.patch_embeddings.projection
        x = proj(pixel_values.to(proj.weight.dtype))
        B, D, h, w = x.shape
        x = torch.cat([e.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + self._pos_embed(h, w, x.dtype)
        if self.num_register_tokens > 0:
            x = torch.cat([x[:, :1], e.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        _, _, outs = run_vit(self.encoder.layer[:max(idx) + 1], x, backend=self.backend, collect=idx)
        return [outs[i] for i in idx]

    def last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The final (affine) ``layernorm`` of the last block — transformers' ``last_hidden_state``."""
        x = self.forward_features(pixel_values, [self.depth - 1])[0]
        return self.layernorm(x)


class _Dinov2Embeddings(nn.Module):
    def __init__(self, dim: int, patch: int, pos_grid: int, registers: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, dim))
        if registers > 0:  # plain DINOv2 checkpoints have no register_tokens key
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


def _rotate_halves(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Dinov3Encoder(_FrozenEncoder):
    """DINOv3 ViT in facebookresearch/dinov3's key layout (``cls_token``, ``storage_tokens``, ``mask_token``,
    ``patch_embed.proj``, ``rope_embed.periods``, ``blocks.{i}.*``, ``norm.*``). ViT-L/16: width 1024, 24
    blocks, 16 heads, LayerNorm eps 1e-5, layer scale, key bias masked, 4 storage tokens, axial RoPE (base
    100, coordinates normalised per side to [-1, 1], half-split rotation, prefix tokens unrotated) computed
    in fp32. RAEv2: ``input_size=256`` → 16×16 patches."""

    def __init__(self, *, hidden_size: int = 1024, depth: int = 24, num_heads: int = 16, patch_size: int = 16,
                 num_storage_tokens: int = 4, mlp_ratio: float = 4.0, layer_norm_eps: float = 1e-5,
                 layerscale: float = 1e-5, rope_base: float = 100.0, mask_k_bias: bool = True,
                 input_size: int = 256, backend: str = "raekern"):
        super().__init__()
        self.backend = check_backend(backend)
        self.hidden_size, self.depth, self.patch_size = hidden_size, depth, patch_size
        self.num_heads, self.input_size = num_heads, input_size
        self.num_prefix_tokens = 1 + num_storage_tokens
        head_dim = hidden_size // num_heads
        if head_dim % 4:
            raise ValueError(f"raekern.models: DINOv3 RoPE needs head_dim divisible by 4, got {head_dim}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.storage_tokens = nn.Parameter(torch.zeros(1, num_storage_tokens, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, hidden_size))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.rope_embed = nn.Module()
        periods = rope_base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
        self.rope_embed.register_buffer("periods", periods)
        self.blocks = nn.ModuleList(
            [Dinov3Layer(hidden_size, num_heads, mlp_ratio, layer_norm_eps, layerscale, mask_k_bias,
                         backend=backend) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self._freeze()

    @classmethod
    def from_pretrained(cls, path: str, *, input_size: int = 256, backend: str = "raekern", device=None,
                        dtype=None, **config) -> "Dinov3Encoder":
        """Build (ViT-L/16 unless ``config`` says otherwise) and load a released ``.pth`` (or safetensors)."""
        from raekern.models.checkpoints import load_state_dict_into, read_checkpoint
        model = cls(input_size=input_size, backend=backend, **config)
        load_state_dict_into(model, read_checkpoint(path), what=f"DINOv3 encoder from {path}",
                             optional=("bias_mask",))
        return model.to(device=device, dtype=dtype)

    def rope_tables(self, h: int, w: int):
        periods = self.rope_embed.periods.float()
        dev = periods.device
        ch = torch.arange(0.5, h, device=dev, dtype=torch.float32) / h
        cw = torch.arange(0.5, w, device=dev, dtype=torch.float32) / w
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
        ang = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)  # [hw, Dh]
        return ang.sin(), ang.cos()

    def forward_features(self, pixel_values: torch.Tensor, layers=None) -> list[torch.Tensor]:
        """ImageNet-normalised pixels → outputs of blocks ``layers`` ``[B, 1+S+N, D]``."""
        idx = self._layer_indices(layers)
        proj = self.patch_embed.proj
        x = proj(pixel_values.to(proj.weight.dtype))
        B, D, h, w = x.shape
        cls = self.cls_token + 0 * self.mask_token  # as released (keeps mask_token in the graph)
        x = torch.cat([cls.expand(B, -1, -1), self.storage_tokens.expand(B, -1, -1),
                       x.flatten(2).transpose(1, 2)], dim=1)
        sin, cos = self.rope_tables(h, w)
        P, H = self.num_prefix_tokens, self.num_heads

        def rotate(q, k):
            def one(t):
                tt = t.unflatten(-1, (H, -1))
                rot = tt[:, P:].float() * cos[:, None] + _rotate_halves(tt[:, P:].float()) * sin[:, None]
                return torch.cat([tt[:, :P], rot.to(t.dtype)], dim=1).flatten(-2)
            return one(q), one(k)

        _, _, outs = run_vit(self.blocks[:max(idx) + 1], x, backend=self.backend, collect=idx, rotate=rotate)
        return [outs[i] for i in idx]

    def last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_features(pixel_values, [self.depth - 1])[0])
