"""Tiny random networks with the released call signatures, for tests, smoke runs and the
``tiny-test`` preset (their images are meaningless; they exercise every code path in seconds)."""
from __future__ import annotations

import torch
from torch import nn


class TinyFlowNet(nn.Module):
    """``(x [B,C,H,W], t [B], y [B]) -> out [B,C,H,W]`` (or ``(out, base)`` with ``two_outputs``,
    like RAEv2's DiT). Label 1000-style null labels index the last embedding row."""

    def __init__(self, channels: int = 8, num_classes: int = 10, hidden: int = 32, two_outputs: bool = False,
                 seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Conv2d(channels, hidden, 1)
        self.out = nn.Conv2d(hidden, channels, 1)
        self.base = nn.Conv2d(hidden, channels, 1) if two_outputs else None
        self.y_emb = nn.Embedding(num_classes + 1, hidden)
        self.t_w = nn.Parameter(torch.zeros(hidden))
        self.num_classes = num_classes
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t, y=None):
        tt = t.to(x.dtype).view(-1, 1, 1, 1)
        h = self.inp(x) + torch.sin(6.0 * tt + self.t_w.to(x.dtype).view(1, -1, 1, 1))
        if y is not None:
            y = torch.where(y >= self.num_classes, torch.full_like(y, self.num_classes), y)
            h = h + self.y_emb(y).to(x.dtype)[:, :, None, None]
        h = torch.tanh(h)
        o = self.out(h) + 0.5 * x
        if self.base is not None:
            return o, self.base(h) + 0.5 * x
        return o


class TinyDecoder(nn.Module):
    """``tokens [B,N,C] -> pixels [B,3,p·h,p·w]`` in [0, 1] via a linear patch decoder."""

    def __init__(self, channels: int = 8, patch: int = 4, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.patch = patch
        self.proj = nn.Linear(channels, patch * patch * 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, tokens):
        B, N, _ = tokens.shape
        h = w = int(round(N ** 0.5))
        p = self.patch
        x = torch.sigmoid(self.proj(tokens)).view(B, h, w, p, p, 3)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, h * p, w * p)


class TinyLatentClassifier(nn.Module):
    """``x0 [B,C,H,W] -> logits [B,num_classes]``: mean-pooled linear head (GFCG in latent space)."""

    def __init__(self, channels: int = 8, num_classes: int = 10, seed: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(channels, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x0):
        return self.head(x0.float().mean(dim=(2, 3)))


class TinyPixelClassifier(nn.Module):
    """``images [B,3,h,w] -> logits``: a mean-pooled linear head on pixels."""

    def __init__(self, num_classes: int = 10, seed: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(3, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 4)

    def forward(self, img):
        return self.head(img.float().mean(dim=(2, 3)))
