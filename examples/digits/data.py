"""scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes), upsampled and split.

Nothing is downloaded: ``sklearn.datasets.load_digits`` reads a file shipped inside scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Digits:
    train_x: torch.Tensor  # [N, 1, S, S] in [0, 1]
    train_y: torch.Tensor  # [N] int64
    test_x: torch.Tensor
    test_y: torch.Tensor


def load(size: int = 32, test_fraction: float = 1 / 6, seed: int = 0) -> Digits:
    """Images in [0, 1] upsampled bicubically from 8×8 to ``size``×``size``; a class-stratified split
    (the same for every seed-0 run)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        test[rng.choice(idx, int(round(len(idx) * test_fraction)), replace=False)] = True
    test_t = torch.from_numpy(test)
    return Digits(x[~test_t], y[~test_t], x[test_t], y[test_t])


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] → [B, 3, H, W] (the encoder and decoder work on 3-channel images, as RAE's do)."""
    return x.expand(-1, 3, -1, -1)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    return x.mean(1, keepdim=True)


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero fill): the only augmentation used."""
    B, _, H, W = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p))
    dx = torch.randint(0, 2 * p + 1, (B,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (B,), generator=gen)
    rows = (dy[:, None] + torch.arange(H)[None])  # [B, H]
    cols = (dx[:, None] + torch.arange(W)[None])
    return xp[torch.arange(B)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]
