"""Multi-layer fusion modules for RAE latents (DESIGN §4.1; reference/rae-family.md §2.1, §3).

- :class:`LayerMeanFusion` — RAEv2's encoder head as released: per-layer non-affine LayerNorm over the
  selected block outputs, mean, plus the token-mean of the last selected layer; optional latent
  standardisation to channels-first. K = 1 without the mean term is RAE v1.
- :class:`DepthRoutedFusion` — DRoRAE: per-layer expert MLPs (one batched GEMM over all layers), a
  router on the last layer, energy-constrained per-token depth weights and a bounded incremental
  correction of the last-layer latent. With ``bound="tanh"`` (the default) the correction is
  ``γ·tanh(f)`` with γ zero-initialised, so training starts exactly at the RAE latent; ``"norm_cap"``
  and ``"none"`` have no γ and start away from it (see :class:`DepthRoutedFusion`).
- :class:`LatentStats` — streaming per-element mean / population variance (Chan merge, fp64),
  mergeable across processes; saved as RAE's ``stat.pt`` ``{'mean', 'var'}``.
- :func:`set_training_phase` — the three-phase schedule (decoder → fusion → both).

Every module has ``use_raekern``: True runs the raekern ops, False the plain-PyTorch references.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raekern.models.layers import baddbmm_dense
from raekern.ops import fusion as _f

__all__ = ["LayerMeanFusion", "DepthRoutedFusion", "LatentStats", "set_training_phase"]

# Released block choices (0-based block indices), reference §2.1.
DINOV3L_K7 = (11, 13, 15, 17, 19, 21, 23)
DINOV3L_K23 = tuple(range(1, 24))


def _select(hidden_states, indices: Sequence[int] | None, offset: int) -> list[torch.Tensor]:
    if isinstance(hidden_states, torch.Tensor):
        hidden_states = list(hidden_states.unbind(0))
    hidden_states = list(hidden_states)
    if indices is None:
        return hidden_states
    n = len(hidden_states)
    for i in indices:
        if not 0 <= i + offset < n:
            raise ValueError(f"raekern.LayerMeanFusion: argument 'hidden_states' has {n} entries; block {i} "
                             f"(entry {i + offset}) is not among them")
    return [hidden_states[i + offset] for i in indices]


class LayerMeanFusion(nn.Module):
    """RAEv2 multi-layer encoder head (``DINOv3MultiLayerSimpleAddEncoder`` semantics).

    ``forward(hidden_states)`` takes the encoder's block outputs ``[B, T, D]`` (prefix tokens
    included) as a list, tuple or ``[L, B, T, D]`` tensor; ``layer_indices`` picks blocks from it,
    with ``hidden_states[i + index_offset]`` being block i (``index_offset=1`` for Hugging Face's
    ``output_hidden_states``, whose entry 0 is the embedding output). ``layer_indices=None`` uses every
    entry given. Returns ``[B, N, D]`` tokens, or ``[B, D, H, W]`` standardised latents when
    ``channels_first`` (with ``latent_mean``/``latent_var`` buffers if set).
    """

    def __init__(
        self,
        layer_indices: Sequence[int] | None = DINOV3L_K7,
        *,
        skip_tokens: int = 5,
        eps: float = 1e-5,
        add_last_token_mean: bool = True,
        index_offset: int = 0,
        channels_first: bool = False,
        grid: tuple[int, int] | None = None,
        latent_mean: torch.Tensor | None = None,
        latent_var: torch.Tensor | None = None,
        latent_eps: float = 1e-5,
        use_raekern: bool = True,
    ):
        super().__init__()
        self.layer_indices = tuple(layer_indices) if layer_indices is not None else None
        self.skip_tokens = skip_tokens
        self.eps = eps
        self.add_last_token_mean = add_last_token_mean
        self.index_offset = index_offset
        self.channels_first = channels_first
        self.grid = grid
        self.latent_eps = latent_eps
        self.use_raekern = use_raekern
        self.register_buffer("latent_mean", latent_mean, persistent=latent_mean is not None)
        self.register_buffer("latent_var", latent_var, persistent=latent_var is not None)

    @classmethod
    def raev2_dinov3l(cls, k: int = 7, **kw) -> "LayerMeanFusion":
        """RAEv2's released DINOv3-L heads: K = 7 (blocks 11, 13, …, 23), 23 (blocks 1…23) or 1."""
        released = {7: DINOV3L_K7, 23: DINOV3L_K23, 1: (23,)}
        if k not in released:
            raise ValueError(f"raekern.models.LayerMeanFusion.raev2_dinov3l: argument 'k' must be one of the "
                             f"released heads {sorted(released)}, got {k!r} (pass layer_indices to the "
                             "constructor for another selection)")
        indices = released[k]
        kw.setdefault("add_last_token_mean", k != 1)
        return cls(indices, skip_tokens=5, eps=1e-5, **kw)

    @classmethod
    def rae_dinov2b(cls, **kw) -> "LayerMeanFusion":
        """RAE v1: last block of DINOv2-B with 4 registers, LayerNorm eps 1e-6, no mean term."""
        return cls((11,), skip_tokens=5, eps=1e-6, add_last_token_mean=False, **kw)

    def forward(self, hidden_states) -> torch.Tensor:
        layers = _select(hidden_states, self.layer_indices, self.index_offset)
        fn = _f.layer_stack_fuse if self.use_raekern else _f.layer_stack_fuse_reference
        return fn(layers, skip_tokens=self.skip_tokens, eps=self.eps,
                  add_last_token_mean=self.add_last_token_mean, channels_first=self.channels_first,
                  grid=self.grid if self.channels_first else None,
                  latent_mean=self.latent_mean if self.channels_first else None,
                  latent_var=self.latent_var if self.channels_first else None, latent_eps=self.latent_eps)

    def extra_repr(self) -> str:
        return (f"layers={self.layer_indices}, skip_tokens={self.skip_tokens}, eps={self.eps}, "
                f"add_last_token_mean={self.add_last_token_mean}, use_raekern={self.use_raekern}")


def _check_route_config(energy, bound, gate, cap) -> None:
    """The constructor's options, checked when the module is built rather than at its first forward."""
    where = "raekern.models.DepthRoutedFusion"
    for arg, value, choices in (("energy", energy, ("l2", "softmax", "none")),
                                ("bound", bound, ("tanh", "norm_cap", "none")),
                                ("gate", gate, ("channel", "scalar"))):
        if value not in choices:
            raise ValueError(f"{where}: argument '{arg}' must be one of {list(choices)}, got {value!r}")
    if bound == "norm_cap":
        if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0:
            raise ValueError(f"{where}: argument 'cap' must be a positive ratio c (‖Δ‖ ≤ c·‖base‖) for "
                             f"bound='norm_cap', got {cap!r}")
    elif cap is not None:
        raise ValueError(f"{where}: argument 'cap' is only used with bound='norm_cap', got {cap!r}")


class DepthRoutedFusion(nn.Module):
    """DRoRAE fusion (reference §3.2, the inferred formulation; the paper's code is not public).

    ``forward(layers)``: L block outputs ``[B, T, D]`` (list or ``[L, B, T, D]``), prefix tokens
    included; the last one is the RAE latent the Phase-1 decoder was trained on. Each layer gets a
    non-affine LayerNorm, its own expert MLP ``D → hidden → D`` (GELU; all L experts as one batched
    GEMM), a router ``Linear(D, L)`` on the last normalised layer gives per-token depth weights
    (``energy``), and ``base + bound(Σ_l w_l e_l)`` is returned, ``[B, N, D]``.

    ``hidden`` is the "fusion capacity" knob: DINOv2-B (D = 768, L = 12, hidden = 1536) gives ≈28.3M
    parameters. ``bound`` chooses the correction Δ added to ``base``: ``"tanh"`` → ``γ·tanh(f)``,
    ``"norm_cap"`` → ``f`` rescaled to ``‖Δ‖ ≤ cap·‖base‖`` per token, ``"none"`` → ``f``.

    Only ``bound="tanh"`` starts at the RAE latent: its γ (``gate="channel"`` → [D], ``"scalar"`` → [])
    is zero-initialised (also by :meth:`reset_parameters`), so Δ = 0 and the module outputs the plain
    last-layer latent until training moves γ. ``"norm_cap"`` and ``"none"`` have no γ: with the
    default-initialised experts Δ = f is already nonzero at initialisation (for ``"norm_cap"`` at most
    ``cap·‖base‖`` per token).
    """

    def __init__(
        self,
        dim: int = 768,
        num_layers: int = 12,
        hidden: int = 1536,
        *,
        skip_tokens: int = 5,
        eps: float = 1e-6,
        energy: str = "l2",
        bound: str = "tanh",
        gate: str = "channel",
        cap: float | None = None,
        use_raekern: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_route_config(energy, bound, gate, cap)
        fk = dict(device=device, dtype=dtype)
        self.dim, self.num_layers, self.hidden = dim, num_layers, hidden
        self.skip_tokens, self.eps = skip_tokens, eps
        self.energy, self.bound, self.cap = energy, bound, cap
        self.use_raekern = use_raekern
        self.w1 = nn.Parameter(torch.empty(num_layers, dim, hidden, **fk))
        self.b1 = nn.Parameter(torch.zeros(num_layers, 1, hidden, **fk))
        self.w2 = nn.Parameter(torch.empty(num_layers, hidden, dim, **fk))
        self.b2 = nn.Parameter(torch.zeros(num_layers, 1, dim, **fk))
        self.router = nn.Linear(dim, num_layers, **fk)
        if bound == "tanh":
            self.gamma = nn.Parameter(torch.zeros((dim,) if gate == "channel" else (), **fk))
        else:
            self.register_parameter("gamma", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init, per expert.
        for w, fan_in in ((self.w1, self.dim), (self.w2, self.hidden)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)
        if self.gamma is not None:
            nn.init.zeros_(self.gamma)

    def experts(self, x: torch.Tensor) -> torch.Tensor:
        """All L expert MLPs as two batched GEMMs: ``[L, M, D] → [L, M, D]`` (on the raekern backend's
        fp32 CPU path on AMD, L oneDNN GEMMs each: ``raekern.models.layers.baddbmm_dense``)."""
        if self.use_raekern:
            h = F.gelu(baddbmm_dense(self.b1, x, self.w1))
            return baddbmm_dense(self.b2, h, self.w2)
        h = F.gelu(torch.baddbmm(self.b1, x, self.w1))
        return torch.baddbmm(self.b2, h, self.w2)

    def forward(self, layers) -> torch.Tensor:
        if isinstance(layers, torch.Tensor):
            layers = list(layers.unbind(0))
        if len(layers) != self.num_layers:
            raise ValueError(f"raekern.DepthRoutedFusion: argument 'layers' must hold num_layers = "
                             f"{self.num_layers} tensors, got {len(layers)}")
        P = self.skip_tokens
        B, T, D = layers[0].shape
        N = T - P
        # The experts' GEMM reads a stacked, normalised input; it is the GEMM operand, not a copy
        # kept for the fusion (which reads the expert outputs in place).
        x = F.layer_norm(torch.stack([h[:, P:] for h in layers]), (D,), eps=self.eps)
        e = self.experts(x.reshape(self.num_layers, B * N, D)).reshape(self.num_layers, B, N, D)
        base = x[-1]
        logits = self.router(base)
        fn = _f.depth_route if self.use_raekern else _f.depth_route_reference
        return fn(e, logits, base, energy=self.energy, bound=self.bound, gamma=self.gamma, cap=self.cap)


class _Welford:
    """count, mean and M2 (Σ squared deviations) of a stream, fp64; merged by Chan et al.'s formula."""

    def __init__(self, shape, device):
        self.count = 0
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(shape, dtype=torch.float64, device=device)

    def combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if n_b == 0:
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.square() * (n_a * n_b / n)
        self.count = n


_OP = "raekern.LatentStats"
_MAX_NDIM = 8  # of the shape exchanged in all_reduce's handshake


class LatentStats:
    """Streaming per-element mean and population variance of latents ``[D, H, W]``.

    ``update(z)`` takes a batch ``[B, D, H, W]`` (or tokens ``[B, N, D]`` once the shape is known);
    accumulators are fp64 and batches merge with Chan et al.'s parallel formula, so the result does
    not depend on how the dataset was split. ``merge(other)`` combines two streams;
    ``all_reduce()`` combines the streams of every rank of a ``torch.distributed`` group, and may be
    called again after more updates (each rank's data is counted once: the statistics already reduced
    are kept apart from what a rank added since). ``mean``/``var`` are fp32; ``save(path)`` writes
    RAE's ``stat.pt`` (``{'mean', 'var'}``).
    """

    def __init__(self, shape: Sequence[int] | None = None, device: torch.device | str = "cpu"):
        self.shape = tuple(shape) if shape is not None else None
        self.device = torch.device(device)
        self._base = self._new = None
        if self.shape is not None:
            self._reset()

    def _reset(self):
        # The statistics are base ⊕ new: base, the last all_reduce's result (identical on every rank),
        # and new, what this rank added since (all that the next all_reduce gathers from it).
        self._base = _Welford(self.shape, self.device)
        self._new = _Welford(self.shape, self.device)

    @property
    def count(self) -> int:
        return self._base.count + self._new.count if self._base is not None else 0

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> "LatentStats":
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"{_OP}.update: argument 'z' must be a floating tensor")
        if self.shape is None:
            if z.dim() != 4:
                raise ValueError(f"{_OP}.update: argument 'z' must be [B, D, H, W] to fix the "
                                 f"statistics' shape, got {tuple(z.shape)}")
            self.shape = tuple(z.shape[1:])
            self.device = z.device
            self._reset()
        if z.dim() == 3 and len(self.shape) == 3:
            B, N, D = z.shape
            if D != self.shape[0] or N != self.shape[1] * self.shape[2]:
                raise ValueError(f"{_OP}.update: argument 'z' of shape {tuple(z.shape)} does not "
                                 f"match statistics of shape {self.shape}")
            z = z.transpose(1, 2).reshape(B, *self.shape)
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"{_OP}.update: argument 'z' must be [B, *{list(self.shape)}], got "
                             f"{tuple(z.shape)}")
        z = z.to(self.device, torch.float64)
        mean_b = z.mean(0)
        self._new.combine(z.shape[0], mean_b, (z - mean_b).square().sum(0))
        return self

    def merge(self, other: "LatentStats") -> "LatentStats":
        """Add another stream's data to this rank's (it counts as this rank's in a later all_reduce)."""
        if other.count == 0:
            return self
        if self.shape is None:
            self.shape, self.device = other.shape, other.device
            self._reset()
        if other.shape != self.shape:
            raise ValueError(f"{_OP}.merge: argument 'other' has shape {other.shape}, expected {self.shape}")
        t = other._totals("merge")
        self._new.combine(t.count, t.mean.to(self.device), t.m2.to(self.device))
        return self

    @torch.no_grad()
    def all_reduce(self, group=None) -> "LatentStats":
        """Merge the statistics of every rank (each rank ends with the global result). The ranks'
        partial results are gathered and merged in rank order, so every rank gets identical bits.
        Ranks first exchange their shapes: a rank with no data yet takes the others' shape, and
        different shapes raise the same error on every rank (none is left waiting)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        world = dist.get_world_size(group)
        dev = self.device if self.shape is not None else torch.device("cpu")
        if dist.get_backend(group) == "nccl" and dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        shapes = self._exchange_shapes(dist, world, group, dev)
        known = {s for s in shapes if s is not None}
        if len(known) > 1:
            raise ValueError(f"{_OP}.all_reduce: the ranks hold statistics of different shapes "
                             f"{shapes}")
        if not known:
            return self  # no rank has any data
        if self.shape is None:
            self.shape = known.pop()
            self._reset()
        new = self._new
        packed = torch.cat([torch.tensor([float(new.count)], dtype=torch.float64), new.mean.flatten().cpu(),
                            new.m2.flatten().cpu()]).to(dev)
        parts = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(parts, packed, group=group)
        numel = new.mean.numel()
        for p in parts:
            p = p.to(self.device)
            self._base.combine(int(p[0].item()), p[1:1 + numel].view(self.shape), p[1 + numel:].view(self.shape))
        self._new = _Welford(self.shape, self.device)
        return self

    def _exchange_shapes(self, dist, world, group, dev) -> list:
        head = torch.full((1 + _MAX_NDIM,), -1, dtype=torch.int64)
        if self.shape is not None:
            if len(self.shape) > _MAX_NDIM:
                raise ValueError(f"{_OP}.all_reduce: statistics of more than {_MAX_NDIM} dims")
            head[0] = len(self.shape)
            head[1:1 + len(self.shape)] = torch.tensor(self.shape)
        heads = [torch.empty_like(head, device=dev) for _ in range(world)]
        dist.all_gather(heads, head.to(dev), group=group)
        out = []
        for h in heads:
            h = h.cpu()
            out.append(None if h[0] < 0 else tuple(int(v) for v in h[1:1 + int(h[0])]))
        return out

    def _totals(self, what: str) -> _Welford:
        """base ⊕ new (before any all_reduce, base is empty and this is new itself)."""
        if self._base is None:
            raise ValueError(f"{_OP}.{what}: no statistics yet (call update() first, or give the shape)")
        if self._base.count == 0:
            return self._new
        t = _Welford(self.shape, self.device)
        t.combine(self._base.count, self._base.mean, self._base.m2)
        t.combine(self._new.count, self._new.mean, self._new.m2)
        return t

    @property
    def mean(self) -> torch.Tensor:
        return self._totals("mean").mean.float()

    @property
    def var(self) -> torch.Tensor:
        """Population variance (divides by the number of samples)."""
        t = self._totals("var")
        return (t.m2 / max(t.count, 1)).float()

    def save(self, path) -> None:
        self._totals("save")
        torch.save({"mean": self.mean.cpu(), "var": self.var.cpu()}, path)

    @staticmethod
    def load(path, map_location="cpu") -> dict[str, torch.Tensor]:
        """Read a ``stat.pt``: ``{'mean': [D, H, W], 'var': [D, H, W]}`` (errors name the path)."""
        from raekern.models.checkpoints import read_stats
        return {k: v.to(map_location) for k, v in read_stats(path).items()}


def _set_trainable(module: nn.Module | None, flag: bool) -> list[nn.Parameter]:
    if module is None:
        return []
    for p in module.parameters():
        p.requires_grad_(flag)
    module.train(flag)
    return list(module.parameters()) if flag else []


def set_training_phase(phase: int, *, encoder: nn.Module | None = None, fusion: nn.Module | None = None,
                       decoder: nn.Module | None = None, fusion_in_phase3: bool = True) -> list[nn.Parameter]:
    """DRoRAE's three-phase schedule (reference §3.1). The encoder is always frozen (eval mode).

    1. Decoder trained on the last-layer latent; fusion unused (frozen).
    2. Fusion trained; decoder frozen, acting as the distributional constraint.
    3. Decoder fine-tuned on the fused latent, with the fusion (``fusion_in_phase3=True``) or alone.

    Frozen modules get ``requires_grad=False`` and ``eval()``. Returns the parameters to optimise.
    """
    if phase not in (1, 2, 3):
        raise ValueError(f"raekern.set_training_phase: argument 'phase' must be 1, 2 or 3, got {phase!r}")
    _set_trainable(encoder, False)
    train_fusion = phase == 2 or (phase == 3 and fusion_in_phase3)
    train_decoder = phase in (1, 3)
    return _set_trainable(fusion, train_fusion) + _set_trainable(decoder, train_decoder)
