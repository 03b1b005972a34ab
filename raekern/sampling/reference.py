"""Plain-PyTorch transcriptions of the released samplers: the tests' ground truth and the benchmarks'
"plain PyTorch pipeline" baseline.

Written from the behaviour of RAE v1 (``Sampler.sample_ode`` through torchdiffeq's fixed-grid
Euler/Heun, ``forward_with_cfg`` / ``forward_with_autoguidance``) and RAEv2 (``Sampler.sample_ode``,
``forward_with_internalguidance`` / ``forward_with_ig_and_cfg``), keeping what changes results or
cost: the float32 grids, the doubled ``[cond; null]`` batch (which RAE v1 also feeds both models for
AutoGuidance), the arithmetic order of the update, the per-sample interval masks ``t_lo <= t <= t_hi``
and RAEv2's ``v = (x − x̂)/max(t, 0.05)``. torchdiffeq integrates a decreasing grid by negating time
and the field, which is exact in floating point, so it is written out directly here.
"""
from __future__ import annotations

from typing import Callable

import torch

from raekern.sampling.grids import raev2_grid, rae_v1_grid


def _where_interval(t, lo, hi, guided, plain):
    m = ((t >= lo) & (t <= hi)).view(-1, *[1] * (guided.dim() - 1))
    return torch.where(m, guided, plain)


def rae_v1_velocity_fn(model: Callable, *, cfg_scale: float = 1.0, method: str = "cfg",
                       weak_model: Callable | None = None, interval=(0.0, 1.0)) -> Callable:
    """The drift RAE v1's sampler integrates, for a batch doubled as ``[x; x]`` with ``[y; null]``."""
    lo, hi = interval
    if cfg_scale <= 1.0:
        return model
    if method == "autoguidance":
        def ag(x, t, y):
            v = model(x, t, y)
            v_weak = weak_model(x, t, y)
            return _where_interval(t, lo, hi, v_weak + cfg_scale * (v - v_weak), v)
        return ag

    def cfg(x, t, y):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half], 0), t, y)
        cond, uncond = torch.split(out, len(out) // 2, dim=0)
        th = t[: len(t) // 2]
        g = _where_interval(th, lo, hi, uncond + cfg_scale * (cond - uncond), cond)
        return torch.cat([g, g], 0)
    return cfg


@torch.no_grad()
def rae_v1_reference_sample(model: Callable, z: torch.Tensor, y: torch.Tensor, *, num_steps: int = 50,
                            alpha: float | None = None, cfg_scale: float = 1.0, method: str = "cfg",
                            weak_model: Callable | None = None, interval=(0.0, 1.0),
                            solver: str = "euler", null_label: int = 1000) -> torch.Tensor:
    """RAE v1 sampling of ``z [B,C,H,W]`` with labels ``y [B]``; returns the final latents ``[B,C,H,W]``.

    ``num_steps`` is RAE's config value (grid points; 50 → 49 steps). ``solver``: "euler" or "heun2"
    (torchdiffeq's names).
    """
    grid = rae_v1_grid(num_steps, alpha, latent_shape=tuple(z.shape[1:])).points.to(z.device)
    guided = cfg_scale > 1.0
    if guided:
        z = torch.cat([z, z], 0)
        y = torch.cat([y, torch.full_like(y, null_label)], 0)
    f = rae_v1_velocity_fn(model, cfg_scale=cfg_scale, method=method, weak_model=weak_model,
                           interval=interval)

    def field(t_scalar, x):  # torchdiffeq's reversed field: time −t, value −f
        t = torch.ones(x.size(0), device=x.device) * (-t_scalar)
        return -f(x, t, y)

    x = z
    s = -grid  # torchdiffeq's increasing time
    for k in range(len(s) - 1):
        dt = s[k + 1] - s[k]
        if solver == "euler":
            x = x + dt * field(s[k], x)
        elif solver == "heun2":
            k1 = field(s[k], x)
            k2 = field(s[k] + dt, x + dt * k1)
            x = x + dt * (k1 + k2) * 0.5
        else:
            raise ValueError(f"rae_v1_reference_sample: argument 'solver' must be 'euler' or 'heun2', got {solver!r}")
    if guided:
        x, _ = x.chunk(2, dim=0)
    return x


@torch.no_grad()
def raev2_reference_sample(model: Callable, z: torch.Tensor, y: torch.Tensor, *, num_steps: int = 100,
                           alpha: float | None = None, ig_scale: float | None = None, ig_interval=(0.1, 1.0),
                           cfg_scale: float | None = None, cfg_interval=(0.0, 1.0),
                           uncond_ig_scale: float | None = None, t_eps: float = 0.05,
                           null_label: int = 1000) -> torch.Tensor:
    """RAEv2 sampling with an x-predicting ``model(x, t, y) -> (x_full, x_base)``; returns latents.

    Internal guidance ``x_base + s·(x_full − x_base)`` on ``t ∈ ig_interval`` and/or CFG, Euler on
    ``shift(linspace(1, 0, K+1))``, velocity ``(x − x̂)/max(t, t_eps)``.
    """
    grid = raev2_grid(num_steps, alpha, latent_shape=tuple(z.shape[1:])).points.to(z.device)
    use_ig, use_cfg = ig_scale is not None, cfg_scale is not None
    x = torch.cat([z, z], 0)  # the released script always doubles the batch
    yy = torch.cat([y, torch.full_like(y, null_label)], 0)

    def fwd(x, t):
        if use_ig and use_cfg:
            full, base = model(x, t, yy)
            fc, fu = full.chunk(2, 0)
            bc, bu = base.chunk(2, 0)
            th = t[: len(t) // 2]
            su = ig_scale if uncond_ig_scale is None else uncond_ig_scale
            gc = _where_interval(th, *ig_interval, bc + ig_scale * (fc - bc), fc)
            gu = _where_interval(th, *ig_interval, bu + su * (fu - bu), fu)
            out = _where_interval(th, *cfg_interval, gu + cfg_scale * (gc - gu), gc)
            return torch.cat([out, out], 0)
        if use_ig:
            half, th = x[: len(x) // 2], t[: len(t) // 2]
            full, base = model(half, th, yy[: len(half)])
            out = _where_interval(th, *ig_interval, base + ig_scale * (full - base), full)
            return torch.cat([out, out], 0)
        if use_cfg:
            half = x[: len(x) // 2]
            out = model(torch.cat([half, half], 0), t, yy)
            out = out[0] if isinstance(out, tuple) else out
            c, u = out.chunk(2, 0)
            th = t[: len(t) // 2]
            g = _where_interval(th, *cfg_interval, u + cfg_scale * (c - u), c)
            return torch.cat([g, g], 0)
        out = model(x, t, yy)
        return out[0] if isinstance(out, tuple) else out

    B2 = x.shape[0]
    for i in range(num_steps):
        h = grid[i] - grid[i + 1]
        t = torch.full((B2,), grid[i].item(), device=x.device)
        xhat = fwd(x, t)
        d = (x - xhat) / t.view(-1, *[1] * (x.dim() - 1)).clamp_min(t_eps)
        x = x - h * d
    return x[: B2 // 2]
