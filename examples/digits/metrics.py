"""Image metrics of the digits experiment, all in the independent classifier's feature space."""
from __future__ import annotations

import numpy as np
import torch


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of 10·log10(1 / MSE) for images in [0, 1]."""
    mse = ((x.clamp(0, 1) - ref) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[n, d]``."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as the FID reference code does
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def class_diversity(feats: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the mean pairwise L2 distance between features of samples of that class
    (high: varied samples; collapse to one mode per class gives 0)."""
    out = []
    for c in np.unique(labels):
        f = torch.as_tensor(feats[labels == c], dtype=torch.float64)
        if len(f) < 2:
            continue
        d = torch.cdist(f, f)
        n = len(f)
        out.append(float(d.sum() / (n * (n - 1))))
    return float(np.mean(out))
