"""The representation autoencoder: frozen encoder → fusion → (noise) → standardised latent, and back.

``RAE(encoder, fusion, decoder, stats)``:
- :meth:`RAE.encode`: images ``[B, 3, h, w]`` in [0, 1] → encoder blocks ``layers`` (prefix tokens
  included) → ``fusion`` → tokens ``[B, N, C]`` → in training mode with ``noise_tau > 0`` the
  noise-augmented ``z + σ·ε`` (σ per sample) → standardised channels-first latent ``[B, C, H, W]``,
  ``(z − mean) / sqrt(var + eps)`` with the ``stat.pt`` mean/var ``[C, H, W]``.
- :meth:`RAE.decode`: the exact inverse of the standardisation → decoder → pixels in [0, 1] (RAE v1's
  ImageNet-normalised decoder output is mapped back with ImageNet mean/std; RAEv2's is already [0, 1]).

RAE v1: DINOv2-B-reg at 224 px, fusion = last block, non-affine LayerNorm (eps 1e-6), ViT-XL decoder.
RAEv2: DINOv3-L/16 at 256 px, fusion = mean of the non-affine LayerNorm (eps 1e-5) of blocks
{11,13,...,23} + token-mean of the last one, ViT-XL decoder predicting [0, 1] pixels.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from raekern.models.layers import check_backend

NOISE_DISTS = ("uniform", "half_normal")


def noise_augment(z: torch.Tensor, tau: float, dist: str = "uniform",
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``z + σ·ε`` with one σ per sample: ``σ = τ·U(0, 1)`` (``"uniform"``, RAE's released code) or
    ``σ = |N(0, τ²)|`` (``"half_normal"``, the paper); ε ~ N(0, 1) like z."""
    if dist not in NOISE_DISTS:
        raise ValueError(f"raekern.models: argument 'dist' must be one of {list(NOISE_DISTS)}, got {dist!r}")
    shape = (z.shape[0],) + (1,) * (z.dim() - 1)
    if dist == "uniform":
        sigma = tau * torch.rand(shape, device=z.device, generator=generator)
    else:
        sigma = tau * torch.randn(shape, device=z.device, generator=generator).abs()
    eps = torch.randn(z.shape, device=z.device, generator=generator, dtype=z.dtype)
    return z + sigma.to(z.dtype) * eps


def _ops_latent():
    import raekern.ops as ops
    if hasattr(ops, "latent_normalize") and hasattr(ops, "latent_denormalize"):
        return ops
    return None


def latent_normalize_torch(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """tokens ``[B, N, C]`` → ``[B, C, H, W]`` standardised (plain PyTorch, RAE's formula)."""
    B, N, C = z.shape
    H = math.isqrt(N)
    z = z.transpose(1, 2).reshape(B, C, H, N // H)
    return (z - mean) / torch.sqrt(var + eps)


def latent_denormalize_torch(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """``[B, C, H, W]`` standardised → tokens ``[B, N, C]``."""
    z = z * torch.sqrt(var + eps) + mean
    B, C, H, W = z.shape
    return z.reshape(B, C, H * W).transpose(1, 2)


def _check_prefix_tokens(encoder, fusion) -> None:
    """The fusion drops ``skip_tokens`` leading tokens; they must be exactly the encoder's prefix tokens,
    or patch tokens go missing (a plain DINOv2 has 1, DINOv2-reg and DINOv3 have 5)."""
    skip, prefix = getattr(fusion, "skip_tokens", None), getattr(encoder, "num_prefix_tokens", None)
    if skip is not None and prefix is not None and skip != prefix:
        raise ValueError(f"raekern.models: argument 'fusion' drops skip_tokens={skip} leading tokens but the "
                         f"encoder has num_prefix_tokens={prefix} (CLS + registers); build the fusion with "
                         f"skip_tokens={prefix}")


class RAE(nn.Module):
    """Encoder + fusion + decoder + latent statistics; see the module docstring.

    Args:
        encoder: a frozen encoder (:class:`~raekern.models.encoder.Dinov2Encoder` /
            :class:`~raekern.models.encoder.Dinov3Encoder`): ``encoder(images, layers) -> list[[B, T, D]]``.
        fusion: ``fusion(list_of_hidden_states) -> [B, N, C]`` (drops the prefix tokens; e.g.
            :class:`raekern.models.fusion.LayerMeanFusion`).
        decoder: :class:`~raekern.models.decoder.ViTMAEDecoder`.
        stats: ``(mean, var)`` ``[C, H, W]`` tensors, a ``{'mean', 'var'}`` dict (``stat.pt``), or None
            (no standardisation).
        layers: the encoder blocks handed to ``fusion`` (0-based; default: the last block).
        noise_tau, noise_dist: noise augmentation applied in training mode (see :func:`noise_augment`).
        eps: the standardisation epsilon (1e-5 in RAE and RAEv2).
    """

    def __init__(self, encoder: nn.Module, fusion: Callable, decoder: nn.Module, stats=None, *,
                 layers: Optional[Sequence[int]] = None, noise_tau: float = 0.0, noise_dist: str = "uniform",
                 eps: float = 1e-5, backend: str = "raekern"):
        super().__init__()
        if noise_dist not in NOISE_DISTS:
            raise ValueError(f"raekern.models: argument 'noise_dist' must be one of {list(NOISE_DISTS)}, "
                             f"got {noise_dist!r}")
        _check_prefix_tokens(encoder, fusion)
        self.encoder, self.fusion, self.decoder = encoder, fusion, decoder
        self.layers = list(layers) if layers is not None else [encoder.depth - 1]
        self.noise_tau, self.noise_dist, self.eps = float(noise_tau), noise_dist, eps
        self.backend = check_backend(backend)
        self.register_buffer("latent_mean", None)
        self.register_buffer("latent_var", None)
        if stats is not None:
            self.set_stats(stats)

    def latent_shape(self) -> Optional[tuple[int, int, int]]:
        """``(C, H, W)`` of the standardised latent: what the decoder takes (``latent_dim``, its token
        grid), else what the encoder gives (width, ``input_size // patch_size``); None if neither says."""
        dec, enc = self.decoder, self.encoder
        if all(hasattr(dec, a) for a in ("latent_dim", "grid")):
            return (dec.latent_dim, dec.grid, dec.grid)
        if all(hasattr(enc, a) for a in ("hidden_size", "input_size", "patch_size")):
            g = enc.input_size // enc.patch_size
            return (enc.hidden_size, g, g)
        return None

    def set_stats(self, stats) -> None:
        """Set the latent statistics: ``(mean, var)`` or ``{'mean', 'var'}``, each ``[C, H, W]`` =
        :meth:`latent_shape` (a mis-shaped pair would broadcast silently to a wrong latent)."""
        self._set_stats(stats, "argument 'stats'")

    def _set_stats(self, stats, what: str) -> None:
        # `what` names the source in errors: the argument, or the stats file it was read from
        if isinstance(stats, dict):
            missing = [k for k in ("mean", "var") if k not in stats]
            if missing:
                raise ValueError(f"raekern.models: {what} lacks {missing} (expected stat.pt's {{'mean', 'var'}})")
            mean, var = stats["mean"], stats["var"]
        else:
            mean, var = stats
        mean, var = torch.as_tensor(mean), torch.as_tensor(var)
        want = self.latent_shape()
        shape = "[C, H, W]" if want is None else f"[C, H, W] = {list(want)} (this RAE's latent)"
        if (mean.dim() != 3 or mean.shape != var.shape
                or (want is not None and tuple(mean.shape) != tuple(want))):
            raise ValueError(f"raekern.models: {what} must hold mean and var of shape {shape}, got "
                             f"{tuple(mean.shape)} and {tuple(var.shape)}")
        self.latent_mean, self.latent_var = mean.float(), var.float()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint saved after set_stats carries the statistics; a model built without them has
        # empty (None) slots, which load_state_dict would report as unexpected keys: take them here.
        keys = (prefix + "latent_mean", prefix + "latent_var")
        if self.latent_mean is None and all(k in state_dict for k in keys):
            ref = next(self.parameters(), None)
            self._set_stats(tuple(state_dict[k] for k in keys), f"state_dict entries {list(keys)}")
            if ref is not None:
                self.latent_mean = self.latent_mean.to(ref.device)
                self.latent_var = self.latent_var.to(ref.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def load_stats(self, path: str) -> None:
        """Load RAE's ``stat.pt`` / RAEv2's ``stats.pt`` (``{'mean', 'var'}``; torch.load weights_only)."""
        from raekern.models.checkpoints import read_stats
        self._set_stats(read_stats(path), f"stats file {path}")

    def load_decoder(self, path: str) -> None:
        """Load a released decoder checkpoint (``model.pt`` / ``decoder.pt``) into :attr:`decoder` (strict)."""
        from raekern.models.checkpoints import load_state_dict_into, read_checkpoint
        load_state_dict_into(self.decoder, read_checkpoint(path), what=f"decoder checkpoint {path}")

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images → fused latent tokens ``[B, N, C]`` (no noise, no standardisation)."""
        with torch.no_grad():
            hs = self.encoder(images, self.layers)
        return self.fusion(hs)

    def _stats(self, like: torch.Tensor):
        return self.latent_mean.to(like), self.latent_var.to(like)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, C]`` → standardised ``[B, C, H, W]``."""
        if self.latent_mean is None:
            B, N, C = z.shape
            H = math.isqrt(N)
            return z.transpose(1, 2).reshape(B, C, H, N // H)
        mean, var = self._stats(z)
        ops = _ops_latent() if self.backend == "raekern" else None
        if ops is not None:
            return ops.latent_normalize(z, mean, var, eps=self.eps)
        return latent_normalize_torch(z, mean, var, self.eps)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised ``[B, C, H, W]`` → tokens ``[B, N, C]`` (exact inverse of :meth:`normalize`)."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError("raekern.models: argument 'z' must be a [B, C, H, W] latent, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        if self.latent_mean is None:
            B, C, H, W = z.shape
            return z.reshape(B, C, H * W).transpose(1, 2)
        mean, var = self._stats(z)
        ops = _ops_latent() if self.backend == "raekern" else None
        if ops is not None:
            return ops.latent_denormalize(z, mean, var, eps=self.eps)
        return latent_denormalize_torch(z, mean, var, self.eps)

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [0, 1] → standardised latent ``[B, C, H, W]`` (noise-augmented in training mode)."""
        z = self.tokens(images)
        if self.training and self.noise_tau > 0:
            z = noise_augment(z, self.noise_tau, self.noise_dist, generator)
        return self.normalize(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised latent ``[B, C, H, W]`` → images ``[B, 3, H·p, W·p]`` in [0, 1] (not clamped)."""
        tokens = self.denormalize(z)
        return self.decoder.to_unit(self.decoder(tokens.to(self.decoder.decoder_embed.weight.dtype)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))
