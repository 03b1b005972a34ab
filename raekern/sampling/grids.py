"""Time grids for rectified-flow sampling, with the dimension-dependent shift.

Convention (as in RAE and RAEv2): ``x_t = (1 - t)·x0 + t·ε``, t = 1 is noise, t = 0 is data, the
sampler walks a decreasing grid ``t_0 = 1 > t_1 > … > t_K``. A grid of K+1 points is K solver steps.

The released grids are reproduced bit for bit: both repositories build the unshifted grid in float32
and apply the shift in float32 with a Python-float α, so we do the same (``exact=True``). The shift

    shift(t) = α·t / (1 + (α − 1)·t),   α = sqrt(m / 4096),  m = latent elements per sample

pushes steps towards the noise end for high-dimensional latents (m = 768·16·16 → α = √48 ≈ 6.93).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

SHIFT_BASE_DIM = 4096  # SD3's base resolution (64·64 latent elements), used by RAE and RAEv2


def shift_alpha(latent_shape: int | Sequence[int], base_dim: int = SHIFT_BASE_DIM) -> float:
    """α = sqrt(m / base_dim) for a latent of m elements per sample (an int, or the shape [C, H, W])."""
    m = latent_shape if isinstance(latent_shape, int) else math.prod(latent_shape)
    if m <= 0 or base_dim <= 0:
        raise ValueError(f"raekern.sampling.shift_alpha: argument 'latent_shape' must have a positive "
                         f"size, got {latent_shape!r}")
    return math.sqrt(m / base_dim)


def time_shift(t, alpha: float):
    """shift(t) = α·t / (1 + (α − 1)·t); a float or a tensor (computed in the tensor's dtype)."""
    return alpha * t / (1 + (alpha - 1) * t)


@dataclass(frozen=True)
class TimeGrid:
    """A decreasing grid of K+1 time points (K solver steps).

    ``points`` is kept in the dtype the released sampler used (float32 for both RAE grids), so the
    per-step times and step sizes our sampler feeds the model equal the released ones exactly.
    """

    points: torch.Tensor  # [K+1], decreasing
    name: str = "custom"
    alpha: float = 1.0

    def __post_init__(self):
        p = self.points
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() < 2:
            raise ValueError("raekern.sampling.TimeGrid: argument 'points' must be a 1-D tensor of at "
                             f"least 2 time points, got {getattr(p, 'shape', type(p).__name__)}")
        if not bool((p[1:] < p[:-1]).all()):
            raise ValueError("raekern.sampling.TimeGrid: argument 'points' must be strictly decreasing "
                             "(t = 1 is noise, t = 0 is data)")

    @property
    def num_steps(self) -> int:
        return self.points.numel() - 1

    def times(self) -> list[float]:
        """The grid as Python floats (exactly the float32 values, widened)."""
        return [float(v) for v in self.points.tolist()]

    def __len__(self) -> int:
        return self.num_steps


def rae_v1_grid(num_points: int = 50, alpha: float | None = None, *, t_min: float = 0.001,
                latent_shape: Sequence[int] = (768, 16, 16)) -> TimeGrid:
    """RAE v1's ODE grid: ``shift(1 − linspace(0, 1 − t_min, num_points))``.

    ``num_points`` is RAE's ``num_steps`` config value: 50 points → **49 Euler steps**, from t = 1 down
    to shift(0.001) ≈ 0.0069 (the released sampler never reaches t = 0; the decoder sees that state).
    α defaults to sqrt(prod(latent_shape)/4096) = √48 for the 256-px DINOv2-B latent.
    """
    if num_points < 2:
        raise ValueError(f"raekern.sampling.rae_v1_grid: argument 'num_points' must be >= 2, got {num_points}")
    a = shift_alpha(latent_shape) if alpha is None else float(alpha)
    t = 1 - torch.linspace(0, 1 - t_min, num_points)  # float32, as the released code
    return TimeGrid(time_shift(t, a), name=f"rae_v1[{num_points}]", alpha=a)


def raev2_grid(num_steps: int = 100, alpha: float | None = None, *,
               latent_shape: Sequence[int] = (1024, 16, 16)) -> TimeGrid:
    """RAEv2's Euler grid: ``shift(linspace(1, 0, num_steps + 1))`` — K steps ending exactly at t = 0.

    α defaults to sqrt(1024·16·16/4096) = 8 (DINOv3-L latent). K = 100 in the released ImageNet config.
    """
    if num_steps < 1:
        raise ValueError(f"raekern.sampling.raev2_grid: argument 'num_steps' must be >= 1, got {num_steps}")
    a = shift_alpha(latent_shape) if alpha is None else float(alpha)
    t = torch.linspace(1.0, 0.0, num_steps + 1)
    return TimeGrid(time_shift(t, a), name=f"raev2[{num_steps}]", alpha=a)


def uniform_grid(num_steps: int, alpha: float = 1.0, *, t_end: float = 0.0) -> TimeGrid:
    """A plain shifted uniform grid from 1 to ``t_end`` in float64 (for new models and tests)."""
    if num_steps < 1:
        raise ValueError(f"raekern.sampling.uniform_grid: argument 'num_steps' must be >= 1, got {num_steps}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"raekern.sampling.uniform_grid: argument 't_end' must be in [0, 1), got {t_end}")
    t = torch.linspace(1.0, t_end, num_steps + 1, dtype=torch.float64)
    return TimeGrid(time_shift(t, float(alpha)), name=f"uniform[{num_steps}]", alpha=float(alpha))


GRIDS = {"rae": rae_v1_grid, "rae_v1": rae_v1_grid, "raev2": raev2_grid, "uniform": uniform_grid}


def make_grid(kind: str, steps: int | None = None, *, alpha: float | None = None,
              latent_shape: Sequence[int] | None = None) -> TimeGrid:
    """Grid by name: 'rae' (RAE v1; ``steps`` = number of points, 50 → 49 steps), 'raev2' (``steps``
    Euler steps), 'uniform' (``steps`` steps). α defaults to the latent-shape rule."""
    if kind not in GRIDS:
        raise ValueError(f"raekern.sampling.make_grid: argument 'kind' must be one of {sorted(GRIDS)}, "
                         f"got {kind!r}")
    kw = {}
    if latent_shape is not None and kind != "uniform":
        kw["latent_shape"] = tuple(latent_shape)
    if kind in ("rae", "rae_v1"):
        return rae_v1_grid(50 if steps is None else steps, alpha, **kw)
    if kind == "raev2":
        return raev2_grid(100 if steps is None else steps, alpha, **kw)
    if alpha is None:
        alpha = shift_alpha(latent_shape) if latent_shape is not None else 1.0
    return uniform_grid(50 if steps is None else steps, alpha)
