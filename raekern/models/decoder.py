"""RAE's pixel decoder: a ViT-MAE decoder (``GeneralDecoder``) with RAE's checkpoint keys.

``decoder_embed`` (latent width → width) on the N latent tokens, a trainable CLS token
(``trainable_cls_token``, prepended), the fixed 2-D sin-cos table ``decoder_pos_embed [1, N+1, width]``
(CLS row 0), ``depth`` ViT-MAE layers (``decoder_layers.{i}...``, LayerNorm eps 1e-12, exact GELU),
``decoder_norm``, ``decoder_pred`` (width → p²·3), CLS dropped, unpatchified with (row, col, channel)
order inside a patch. Configurations (reference/rae-family.md §1.2): ViT-B 768×12 (12 heads, MLP 3072),
ViT-L 1024×24 (16, 4096), ViT-XL 1152×28 (16, 4096), patch 16.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from raekern.models.layers import check_backend, layer_norm_spec, sincos_2d
from raekern.models.vit import MAELayer, run_vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelStats(nn.Module):
    """ImageNet mean/std as non-persistent buffers `_mean`, `_std` [1, 3, 1, 1]: in no checkpoint, so
    every load_state_dict writes them again (a model built on the meta device and moved with
    to_empty() would otherwise compute with uninitialised memory)."""

    def _register_pixel_stats(self) -> None:
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        refill_pixel_stats(self)


def refill_pixel_stats(module: nn.Module, materialize: bool = False) -> None:
    """Writes the constants into `module`'s `_mean` / `_std` buffers; meta ones are replaced by real
    (CPU) tensors only when `materialize` (registry.load, after filling a meta-built model)."""
    with torch.no_grad():
        for name, val in (("_mean", IMAGENET_MEAN), ("_std", IMAGENET_STD)):
            b = module._buffers.get(name)
            if b is None:
                continue
            if not b.is_meta:
                b.copy_(torch.tensor(val, dtype=b.dtype).view(1, 3, 1, 1))
            elif materialize:
                module._buffers[name] = torch.tensor(val).view(1, 3, 1, 1)


DECODER_CONFIGS = {
    "ViT-B": dict(hidden_size=768, depth=12, num_heads=12, intermediate_size=3072),
    "ViT-L": dict(hidden_size=1024, depth=24, num_heads=16, intermediate_size=4096),
    "ViT-XL": dict(hidden_size=1152, depth=28, num_heads=16, intermediate_size=4096),
}


class ViTMAEDecoder(PixelStats):
    """Latent tokens ``[B, N, latent_dim]`` → pixels ``[B, 3, √N·p, √N·p]``.

    ``output_space``: ``"imagenet"`` (RAE v1's decoders predict ImageNet-normalised pixels) or ``"pixel"``
    (RAEv2's predict [0, 1] pixels). :meth:`forward` returns the decoder's own space; :meth:`to_unit` maps
    it to [0, 1] pixels (``x·std + mean`` for ``"imagenet"``).
    """

    def __init__(self, *, latent_dim: int = 768, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 intermediate_size: int = 4096, patch_size: int = 16, num_patches: int = 256, num_channels: int = 3,
                 layer_norm_eps: float = 1e-12, output_space: str = "imagenet", backend: str = "raekern"):
        super().__init__()
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"raekern.models: argument 'num_patches' must be a square, got {num_patches}")
        if output_space not in ("imagenet", "pixel"):
            raise ValueError(f"raekern.models: argument 'output_space' must be 'imagenet' or 'pixel', "
                             f"got {output_space!r}")
        self.backend = check_backend(backend)
        self.latent_dim, self.hidden_size, self.patch_size = latent_dim, hidden_size, patch_size
        self.num_patches, self.grid, self.num_channels = num_patches, grid, num_channels
        self.output_space = output_space
        self.decoder_embed = nn.Linear(latent_dim, hidden_size)
        self.decoder_pos_embed = nn.Parameter(sincos_2d(hidden_size, grid, cls_token=True)[None],
                                              requires_grad=False)
        self.decoder_layers = nn.ModuleList(
            [MAELayer(hidden_size, num_heads, intermediate_size, layer_norm_eps, backend=backend)
             for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder_pred = nn.Linear(hidden_size, patch_size ** 2 * num_channels)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self._register_pixel_stats()

    def set_backend(self, backend: str):
        from raekern.models.layers import set_backend
        return set_backend(self, backend)

    def forward_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, latent_dim]`` → per-patch predictions ``[B, N, p²·3]`` (CLS dropped)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[1:] != (
                self.num_patches, self.latent_dim):
            raise ValueError(f"raekern.models: argument 'tokens' must have shape [B, {self.num_patches}, "
                             f"{self.latent_dim}], got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        w = self.decoder_embed.weight
        if tokens.dtype != w.dtype and not torch.is_autocast_enabled(tokens.device.type):
            raise TypeError(f"raekern.models: argument 'tokens' must have the decoder's dtype {w.dtype} (or run "
                            f"under torch.autocast), got {tokens.dtype}")
        if tokens.device != w.device:
            raise ValueError(f"raekern.models: argument 'tokens' must be on the decoder's device {w.device}, got "
                             f"{tokens.device}")
        x = self.decoder_embed(tokens)
        x = torch.cat([self.trainable_cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.decoder_pos_embed
        _, h, _ = run_vit(self.decoder_layers, x, backend=self.backend, final=layer_norm_spec(self.decoder_norm))
        return self.decoder_pred(h)[:, 1:]

    def unpatchify(self, logits: torch.Tensor) -> torch.Tensor:
        B, g, p, c = logits.shape[0], self.grid, self.patch_size, self.num_channels
        x = logits.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, c, g * p, g * p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Latent tokens ``[B, N, latent_dim]`` → image ``[B, 3, H, W]`` in ``output_space``."""
        return self.unpatchify(self.forward_logits(tokens))

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output → [0, 1] pixel space (not clamped)."""
        if self.output_space == "imagenet":
            return x * self._std.to(x.dtype) + self._mean.to(x.dtype)
        return x
