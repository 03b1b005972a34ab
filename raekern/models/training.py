"""Flow-matching training helpers for RAE (v1, velocity) and RAEv2 (x-prediction + base head).

Conventions (reference/rae-family.md §1.5, §2.3): ``x_t = (1 − t)·x + t·ε``, t = 1 is noise.
- time: logit-normal ``t = sigmoid(N(0, 1))`` (v1 truncated to ≤ 0.999), then the dimension-dependent
  shift ``t' = α·t / (1 + (α − 1)·t)`` with ``α = sqrt(N·C / 4096)``;
- v1 loss: ``mean((v̂ − (ε − x))²)``;
- v2 loss: ``mean((x̂ − x)²) / max(t, 0.05)²`` per sample, for the full and the base output
  (``L = L_full + base_coeff·L_base``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def shift_alpha(num_tokens: int, channels: int, base: int = 4096) -> float:
    """α = sqrt(N·C / base): 6.928 for 256×768 (RAE), 8 for 256×1024 (RAEv2), 13.856 for 1024×768."""
    return math.sqrt(num_tokens * channels / base)


def shift_time(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·t / (1 + (α − 1)·t)`` (t = 1 stays 1, t = 0 stays 0; α > 1 pushes t towards noise)."""
    return alpha * t / (1 + (alpha - 1) * t)


def sample_time(batch: int, *, alpha: float = 1.0, truncate: Optional[float] = 0.999, device=None,
                generator: Optional[torch.Generator] = None, dtype=torch.float32) -> torch.Tensor:
    """Logit-normal ``t = sigmoid(N(0, 1))`` ``[batch]``, clamped to ``[0, truncate]`` (v1: 0.999; v2: None),
    then shifted by ``alpha``."""
    t = torch.sigmoid(torch.randn(batch, device=device, generator=generator, dtype=dtype))
    if truncate is not None:
        t = t.clamp(0.0, truncate)
    return shift_time(t, alpha) if alpha != 1.0 else t


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x + t·ε`` with t ``[B]`` broadcast over the other dims."""
    tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (1 - tt) * x + tt * noise


def drop_labels(y: torch.Tensor, prob: float, null_label: int = 1000,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``prob`` (classifier-free guidance training)."""
    if prob <= 0:
        return y
    drop = torch.rand(y.shape[0], device=y.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(y, null_label), y)


def _per_sample_mean(e: torch.Tensor) -> torch.Tensor:
    return e.flatten(1).mean(1)


def velocity_loss(model, x: torch.Tensor, y: torch.Tensor, *, alpha: Optional[float] = None,
                  t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> dict:
    """RAE v1 training loss: ``mean((model(x_t, t, y) − (ε − x))²)``. ``alpha`` defaults to
    ``shift_alpha(H·W, C)``. Returns ``{'loss', 't', 'x_t', 'target', 'pred'}``."""
    B, C, H, W = x.shape
    if alpha is None:
        alpha = shift_alpha(H * W, C)
    if t is None:
        t = sample_time(B, alpha=alpha, truncate=0.999, device=x.device, generator=generator)
    if noise is None:
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    x_t = interpolate(x, noise, t)
    target = noise - x
    pred = model(x_t, t.to(x.dtype), y)
    loss = _per_sample_mean((pred.float() - target.float()) ** 2).mean()
    return {"loss": loss, "t": t, "x_t": x_t, "target": target, "pred": pred}


def _drops_labels_itself(model) -> bool:
    emb = getattr(model, "ctx_embedder", None) or getattr(model, "y_embedder", None)
    return bool(getattr(emb, "dropout_prob", 0.0)) and bool(getattr(model, "training", False))


def xpred_loss(model, x: torch.Tensor, y: torch.Tensor, *, alpha: Optional[float] = None,
               t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None, t_eps: float = 0.05,
               base_coeff: float = 1.0, cfg_dropout_prob: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> dict:
    """RAEv2 training loss: per sample ``mean((x̂ − x)²)/max(t, t_eps)²`` for the full output and, with
    weight ``base_coeff``, the base head (``model`` returns ``(x_full, x_base)`` or ``x_full``).

    Labels are dropped to the null label (``model.num_classes``) with probability ``cfg_dropout_prob``
    here, as RAEv2's transport does (the v2 model itself keeps every label): default 0.1, or 0 when the
    model already drops labels in training mode (a ``class_dropout_prob`` given to DiTDHv2), so they are
    never dropped twice. Returns ``{'loss', 'loss_full', 'loss_base', 't', 'x_t', 'pred'}``."""
    B, C, H, W = x.shape
    if cfg_dropout_prob is None:
        cfg_dropout_prob = 0.0 if _drops_labels_itself(model) else 0.1
    if y is not None and cfg_dropout_prob > 0:
        y = drop_labels(y, cfg_dropout_prob, null_label=getattr(model, "num_classes", 1000), generator=generator)
    if alpha is None:
        alpha = shift_alpha(H * W, C)
    if t is None:
        t = sample_time(B, alpha=alpha, truncate=None, device=x.device, generator=generator)
    if noise is None:
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    x_t = interpolate(x, noise, t)
    out = model(x_t, t.to(x.dtype), y)
    x_full, x_base = out if isinstance(out, tuple) else (out, None)
    w = 1.0 / t.float().clamp_min(t_eps) ** 2
    loss_full = (_per_sample_mean((x_full.float() - x.float()) ** 2) * w).mean()
    loss = loss_full
    loss_base = None
    if x_base is not None:
        loss_base = (_per_sample_mean((x_base.float() - x.float()) ** 2) * w).mean()
        loss = loss + base_coeff * loss_base
    return {"loss": loss, "loss_full": loss_full, "loss_base": loss_base, "t": t, "x_t": x_t, "pred": out}
