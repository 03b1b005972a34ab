"""End-to-end pipelines: labels → latents → images, for RAE v1, RAEv2 and GFCG.

A :class:`Pipeline` holds the diffusion model(s), a guidance policy, a grid, the latent statistics
and the pixel decoder. ``pipeline(labels, seed)`` returns images in [0, 1]; ``pipeline.generate``
is the per-shard function distributed sampling calls (noise and labels derived from sample indices).

Latent handling follows the released code: the DiT works on standardised channel-first latents
``[B,C,H,W]``; decoding applies ``z·sqrt(var + 1e-5) + mean`` (per element, ``stat.pt``), turns the
grid into row-major tokens ``[B,H·W,C]`` and runs the decoder ``tokens → pixels``. RAE v1's decoder
predicts ImageNet-normalised pixels (``decoder_output="imagenet"`` undoes that); RAEv2's predicts
[0, 1] directly (``"unit"``).

Constructors from local checkpoint files (``rae_v1_from_checkpoints`` …) build the networks with
``raekern.models.load`` (nothing is downloaded).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from raekern.sampling.distributed import class_labels
from raekern.sampling.grids import TimeGrid, make_grid
from raekern.sampling.sampler import Sampler, indexed_noise

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAT_EPS = 1e-5


def _fail(arg: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"raekern.sampling.pipelines: argument '{arg}' {msg}")


def load_latent_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read RAE's ``stat.pt`` / RAEv2's ``stats.pt``: a dict with 'mean' and 'var' ([C,H,W])."""
    from raekern.models.checkpoints import read_stats
    obj = read_stats(path)
    return obj["mean"].float(), obj["var"].float()


@dataclass
class Pipeline:
    """Diffusion model + policy + grid + decoder. See the module docstring.

    Args:
        model: the main diffusion model ``(x, t, y) -> out`` (or a tuple of outputs).
        policy: a guidance policy (``raekern.sampling.guidance``), None for no guidance.
        grid: a TimeGrid or a grid name.
        latent_shape: ``(C, H, W)`` of one latent.
        decoder: ``tokens [B,H·W,C] -> pixels [B,3,h,w]`` (None: the pipeline returns latents only).
        latent_mean, latent_var: ``[C,H,W]`` statistics (None: latents are not standardised; one
            of them alone counts the other as mean 0 / variance 1).
        decoder_output: "imagenet" (undo ImageNet mean/std, RAE v1) or "unit" (RAEv2).
        param, models, solver, x0_t_eps, null_label, cuda_graph, progress, model_dtype: see Sampler.
        num_classes: for label sampling.
    """

    model: Callable
    policy: object = None
    grid: TimeGrid | str = "rae"
    latent_shape: Sequence[int] = (768, 16, 16)
    decoder: Callable | None = None
    latent_mean: torch.Tensor | None = None
    latent_var: torch.Tensor | None = None
    decoder_output: str = "imagenet"
    param: str | Mapping[str, str] = "velocity"
    models: Mapping[str, Callable] = field(default_factory=dict)
    solver: str = "euler"
    x0_t_eps: float = 0.0
    null_label: int | None = None
    num_classes: int = 1000
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    model_dtype: torch.dtype | None = None
    cuda_graph: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.decoder_output not in ("imagenet", "unit"):
            _fail("decoder_output", f"must be 'imagenet' or 'unit', got {self.decoder_output!r}")
        if isinstance(self.grid, str):
            self.grid = make_grid(self.grid, latent_shape=self.latent_shape)
        self.latent_shape = tuple(int(s) for s in self.latent_shape)
        self.device = torch.device(self.device)
        self.sampler = Sampler(self.model, self.policy, self.grid, param=self.param, models=self.models,
                               solver=self.solver, null_label=self.null_label, x0_t_eps=self.x0_t_eps,
                               model_dtype=self.model_dtype, cuda_graph=self.cuda_graph,
                               progress=self.progress)
        self._on_device = {}  # constants of decode() per (name, device, dtype)

    def _const(self, name: str, make: Callable[[], torch.Tensor], device, dtype) -> torch.Tensor:
        """A decode() constant on `device`, copied there once: a host-to-device copy per call is a sync
        per step when a pixel-space classifier decodes inside the sampling loop, and is illegal while
        a CUDA graph is being captured."""
        key = (name, str(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = make().to(device=device, dtype=dtype)
        return self._on_device[key]

    def with_policy(self, policy) -> "Pipeline":
        """The same networks and settings with another guidance policy."""
        return dataclasses.replace(self, policy=policy)

    # -- stages ----------------------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Standardised latents ``[B,C,H,W]`` from noise at t = 1."""
        return self.sampler(noise.to(self.device, self.dtype), labels.to(self.device))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised latents ``[B,C,H,W]`` → images ``[B,3,h,w]`` in [0, 1] (float32)."""
        if self.decoder is None:
            _fail("decoder", "is None: this pipeline only produces latents")
        if self.latent_mean is not None or self.latent_var is not None:
            # a missing statistic counts as mean 0 / variance 1, as the released RAE.decode does
            if self.latent_var is not None:
                z = z * self._const("std", lambda: torch.sqrt(self.latent_var.float() + STAT_EPS), z.device, z.dtype)
            if self.latent_mean is not None:
                z = z + self._const("mean", lambda: self.latent_mean, z.device, z.dtype)
        tokens = z.flatten(2).transpose(1, 2)  # [B, H·W, C], row-major tokens
        dec_dtype = _module_dtype(self.decoder) or self.model_dtype  # the decoder's own dtype first
        if dec_dtype is not None:
            tokens = tokens.to(dec_dtype)
        px = self.decoder(tokens)
        px = px[0] if isinstance(px, (tuple, list)) else px
        px = px.float()
        if self.decoder_output == "imagenet":
            m = self._const("imagenet_mean", lambda: torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), px.device, px.dtype)
            s = self._const("imagenet_std", lambda: torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), px.device, px.dtype)
            px = px * s + m
        return px.clamp(0.0, 1.0)

    # -- front doors -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, labels: torch.Tensor | Sequence[int], seed: int = 0) -> torch.Tensor:
        """Images ``[B,3,h,w]`` in [0, 1] for ``labels``; noise for sample b from (seed, b)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        noise = indexed_noise(range(labels.shape[0]), self.latent_shape, seed)
        z = self.latents(labels, noise)
        return self.decode(z) if self.decoder is not None else z

    @torch.no_grad()
    def generate(self, indices: Sequence[int], seed: int = 0, label_mode: str = "equal",
                 labels: torch.Tensor | None = None) -> dict:
        """Samples for global indices (the distributed job's unit): uint8 images ``[n,h,w,3]``,
        labels, latents. ``labels`` overrides ``label_mode`` (one per index)."""
        if labels is None:
            labels = class_labels(indices, self.num_classes, seed, label_mode)
        noise = indexed_noise(indices, self.latent_shape, seed)
        z = self.latents(labels, noise)
        out = {"labels": labels.cpu().numpy(), "latents": z.float().cpu().numpy()}
        if self.decoder is not None:
            out["images"] = to_uint8(self.decode(z))
        else:
            out["images"] = latents_preview(z)
        return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B,3,h,w]`` in [0, 1] → ``[B,h,w,3]`` uint8 (round half up, as torchvision's save_image)."""
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def latents_preview(z: torch.Tensor) -> np.ndarray:
    """A viewable stand-in when there is no decoder: the first 3 channels, min-max scaled."""
    x = z[:, :3].float()
    if x.shape[1] < 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return to_uint8((x - lo) / (hi - lo).clamp_min(1e-12))


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``[n,h,w,3]`` uint8 images into one ``[H,W,3]`` image (white padding)."""
    n, h, w, c = images.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = -(-n // nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return out


# -- released configurations -------------------------------------------------------------------------
def _latent_shape(dit, given, default):
    """The latent shape: given, else read off a raekern.models DiT (in_channels, input_size)."""
    if given is not None:
        return tuple(given)
    c, n = getattr(dit, "in_channels", None), getattr(dit, "input_size", None)
    if isinstance(c, int) and isinstance(n, int):
        return (c, n, n)
    return default


def _module_dtype(m) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter or buffer (None for plain callables)."""
    if isinstance(m, torch.nn.Module):
        for t in itertools.chain(m.parameters(), m.buffers()):
            if t.is_floating_point():
                return t.dtype
    return None


def _named_grid(grid: TimeGrid | str, steps: int, latent_shape) -> TimeGrid:
    return make_grid(grid, steps, latent_shape=latent_shape) if isinstance(grid, str) else grid


def rae_v1_pipeline(dit: Callable, decoder: Callable | None, *, weak: Callable | None = None,
                    stats: tuple[torch.Tensor, torch.Tensor] | None = None, policy=None,
                    num_points: int = 50, latent_shape: Sequence[int] | None = None,
                    grid: TimeGrid | str = "rae", **kw) -> Pipeline:
    """RAE v1: DiT-DH (velocity), optional AutoGuidance with a weak DiT-DH, RAE's 49-step Euler grid
    (``grid``: another grid, or a grid name built with ``num_points`` and the latent's shift).

    ``policy`` defaults to AutoGuidance(1.42) when ``weak`` is given (the released 256-px setting),
    otherwise no guidance.
    """
    from raekern.sampling import guidance as G

    if policy is None:
        policy = G.AutoGuidance(1.42) if weak is not None else G.NoGuidance()
    latent_shape = _latent_shape(dit, latent_shape, (768, 16, 16))
    mean, var = stats if stats is not None else (None, None)
    models = {"weak": weak} if weak is not None else {}
    return Pipeline(dit, policy, _named_grid(grid, num_points, latent_shape),
                    latent_shape=latent_shape, decoder=decoder, latent_mean=mean, latent_var=var,
                    decoder_output="imagenet", param="velocity", models=models, **kw)


def raev2_pipeline(dit: Callable, decoder: Callable | None, *, stats=None, policy=None,
                   num_steps: int = 100, latent_shape: Sequence[int] | None = None,
                   grid: TimeGrid | str = "raev2", **kw) -> Pipeline:
    """RAEv2: x-predicting DiT-DH returning (x_full, x_base); internal guidance 1.78 on t ∈ [0.1, 1]
    by default; Euler on shift(linspace(1, 0, 101)) (``grid``: another grid or grid name);
    velocity (x − x̂)/max(t, 0.05)."""
    from raekern.sampling import guidance as G

    if policy is None:
        policy = G.InternalGuidance(1.78, interval=(0.1, 1.0))
    latent_shape = _latent_shape(dit, latent_shape, (1024, 16, 16))
    mean, var = stats if stats is not None else (None, None)
    return Pipeline(dit, policy, _named_grid(grid, num_steps, latent_shape),
                    latent_shape=latent_shape, decoder=decoder, latent_mean=mean, latent_var=var,
                    decoder_output="unit", param="x0", x0_t_eps=0.05, **kw)


class PixelClassifier(torch.nn.Module):
    """Classify x0 latents by decoding them first: ``classifier(decode(x0))`` (GFCG on pixels).
    ``pipeline`` supplies the decoder and statistics; ``preprocess`` maps [0,1] images to the
    classifier's input (resize, normalisation)."""

    def __init__(self, classifier: Callable, pipeline: Pipeline, preprocess: Callable | None = None):
        super().__init__()
        self.classifier, self.pipeline, self.preprocess = classifier, pipeline, preprocess

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        img = self.pipeline.decode(x0)
        if self.preprocess is not None:
            img = self.preprocess(img)
        return self.classifier(img)


def gfcg_pipeline(base: Pipeline, classifier: Callable, *, space: str = "latent", w_max: float = 2.0,
                  kappa: float = 10.0, mode: str = "alone", preprocess: Callable | None = None,
                  **policy_kw) -> Pipeline:
    """GFCG on top of an RAE pipeline: the classifier sees the x0 estimate as latents
    (``space="latent"``: a classifier head on latent tokens) or as decoded images (``"pixel"``).
    ``mode``: 'alone' | 'cfg3' | 'cfg_substitute' | 'autoguidance' (see raekern.sampling.guidance.GFCG).
    """
    from raekern.sampling import guidance as G

    if space not in ("latent", "pixel"):
        _fail("space", f"must be 'latent' or 'pixel', got {space!r}")
    clf = classifier if space == "latent" else PixelClassifier(classifier, base, preprocess)
    policy = G.GFCG(clf, w_max=w_max, kappa=kappa, mode=mode, **policy_kw)
    return Pipeline(base.model, policy, base.grid, latent_shape=base.latent_shape, decoder=base.decoder,
                    latent_mean=base.latent_mean, latent_var=base.latent_var,
                    decoder_output=base.decoder_output, param=base.param, models=base.models,
                    solver=base.solver, x0_t_eps=base.x0_t_eps, null_label=base.null_label,
                    num_classes=base.num_classes, device=base.device, dtype=base.dtype,
                    model_dtype=base.model_dtype, cuda_graph=base.cuda_graph, progress=base.progress)


def _load(name: str, path: str | Path | None, device, dtype, **overrides):
    if path is None:
        return None
    try:
        from raekern import models as M
    except ImportError as e:  # pragma: no cover - the models package ships with raekern
        raise ImportError("raekern.models is needed to load checkpoints: " + str(e)) from e
    m = M.load(name, str(path), **overrides)
    return m.to(device=device, dtype=dtype).eval()


def _over(backend: str | None, extra: Mapping | None) -> dict:
    out = {} if backend is None else {"backend": backend}
    out.update(extra or {})
    return out


def rae_v1_from_checkpoints(dit: str | Path, decoder: str | Path | None, stats: str | Path | None, *,
                            weak: str | Path | None = None, dit_name: str = "ditdh-xl",
                            weak_name: str = "ditdh-s", decoder_name: str = "decoder-vit-xl",
                            device="cpu", dtype=torch.float32, model_dtype: torch.dtype | None = None,
                            backend: str | None = None, dit_overrides: Mapping | None = None,
                            weak_overrides: Mapping | None = None, decoder_overrides: Mapping | None = None,
                            **kw) -> Pipeline:
    """RAE v1 from local files (DiT ``stage2_model.pt``, decoder ``model.pt``, ``stat.pt``); the
    networks are ``raekern.models`` configurations (``*_name``, constructor ``*_overrides``;
    ``backend`` "raekern" or "torch" for all of them). ``dtype``: sampler state; ``model_dtype``:
    the networks (default: ``dtype``), e.g. bf16 networks with an fp32 state."""
    md = model_dtype or dtype
    return rae_v1_pipeline(
        _load(dit_name, dit, device, md, **_over(backend, dit_overrides)),
        _load(decoder_name, decoder, device, md, **_over(backend, decoder_overrides)),
        weak=_load(weak_name, weak, device, md, **_over(backend, weak_overrides)),
        stats=load_latent_stats(stats) if stats else None, device=device, dtype=dtype,
        model_dtype=model_dtype, **kw)


def raev2_from_checkpoints(dit: str | Path, decoder: str | Path | None, stats: str | Path | None, *,
                           dit_name: str = "ditdh-xl-v2", decoder_name: str = "decoder-vit-xl-v2",
                           device="cpu", dtype=torch.float32, model_dtype: torch.dtype | None = None,
                           backend: str | None = None, dit_overrides: Mapping | None = None,
                           decoder_overrides: Mapping | None = None, **kw) -> Pipeline:
    """RAEv2 from local files (``checkpoint.pt``, ``decoder.pt``, ``stats.pt``); arguments as
    :func:`rae_v1_from_checkpoints`."""
    md = model_dtype or dtype
    return raev2_pipeline(
        _load(dit_name, dit, device, md, **_over(backend, dit_overrides)),
        _load(decoder_name, decoder, device, md, **_over(backend, decoder_overrides)),
        stats=load_latent_stats(stats) if stats else None, device=device, dtype=dtype,
        model_dtype=model_dtype, **kw)
