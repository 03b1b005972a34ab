"""The embedded default model: a small RAE + DiT-DH trained on scikit-learn's handwritten digits.

``raekern sample`` with no checkpoint arguments uses it (preset ``digits``): 32×32 digit images from
the RAEv2 layer mean of a small ViT trained on the digits ([64, 4, 4] per image), an x-predicting
DiT-DH v2 with the depth-8 base head (internal guidance), a smaller DiT for AutoGuidance, the ViT-MAE
pixel decoder, the latent statistics and a linear probe on latent tokens (GFCG's classifier) — all in
one safetensors file under ``raekern/assets/digits/``. ``examples/digits/run.py`` trains and writes
it; the file's metadata holds the configurations, so this module holds no sizes of its own.

The DiT does not model the [64, 4, 4] latent itself but its top-K principal coordinates
(:class:`PrincipalLatent`, K = 64 → a [4, 4, 4] latent): the encoder sees 8×8 = 64 pixel values per
digit, so its 1,024 numbers lie close to a ~60-dimensional subspace, and a DiT trained for ~1k steps
leaves noise in the ~950 directions the data never uses, which the decoder turns into blobs.
:class:`DigitsModel` hides this: its ``decoder`` and ``probe`` take the DiT's latent and map it back.

    from raekern.models.digits import load_digits_model
    m = load_digits_model()                      # DigitsModel: dit, weak, decoder, probe, codec, mean, var
    pipe = m.pipeline(steps=32)                  # raekern.sampling.pipelines.Pipeline, no guidance
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits" / "digits.safetensors"
NUM_CLASSES = 10
DEFAULT_GUIDANCE = ("gfcg:w_max=2,kappa=10,mode=autoguidance,ag=1.5",)


class LatentProbe(nn.Module):
    """GFCG's classifier: a linear head on the token mean of a standardised latent x0 ``[B, C, H, W]``
    (the latent is the encoder's representation, so no decoding is needed)."""

    def __init__(self, channels: int, classes: int = NUM_CLASSES):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.fc(x0.to(self.fc.weight.dtype).mean(dim=(2, 3)))


class PrincipalLatent(nn.Module):
    """Standardised RAE latent ``z [B, C, H, W]`` ↔ its top-K principal coordinates, laid out as the
    DiT's latent ``[B, K/(g·g), g, g]`` (coordinate i → channel i // g², position i % g²).

    ``components`` ``[K, C·H·W]`` (orthonormal rows), ``center`` ``[C·H·W]``; the coordinates are divided
    by one global ``scale`` so that they have unit variance on average (no per-axis whitening: the
    class axes keep their larger variance, so the class is decided early in sampling, as before)."""

    def __init__(self, components: torch.Tensor, center: torch.Tensor, scale: torch.Tensor,
                 latent_shape: tuple[int, int, int], grid: int):
        super().__init__()
        K = components.shape[0]
        if K % (grid * grid):
            raise ValueError(f"raekern.models.digits: argument 'grid' must divide K = {K} into g·g positions, "
                             f"got g = {grid}")
        self.register_buffer("components", components.float())
        self.register_buffer("center", center.float())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(()))
        self.latent_shape, self.grid = tuple(int(v) for v in latent_shape), int(grid)

    @property
    def shape(self) -> tuple[int, int, int]:
        g = self.grid
        return (self.components.shape[0] // (g * g), g, g)

    @classmethod
    def fit(cls, z: torch.Tensor, k: int, grid: int) -> "PrincipalLatent":
        """Principal axes of standardised latents ``z [N, C, H, W]``."""
        x = z.flatten(1).double()
        center = x.mean(0)
        _, S, V = torch.linalg.svd(x - center, full_matrices=False)
        var = (S[:k] ** 2) / (len(x) - 1)
        return cls(V[:k].float(), center.float(), var.mean().sqrt().float(), tuple(z.shape[1:]), grid)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        p = (z.flatten(1).float() - self.center) @ self.components.T / self.scale
        return p.view(len(z), *self.shape).to(z.dtype)

    def decode(self, p: torch.Tensor) -> torch.Tensor:
        z = (p.flatten(1).float() * self.scale) @ self.components + self.center
        return z.view(len(p), *self.latent_shape).to(p.dtype)


class ProjectedDecoder(nn.Module):
    """The pipeline's decoder for principal-coordinate latents: tokens ``[B, g·g, K/g²]`` (the pipeline
    flattens ``[B, K/g², g, g]`` row-major) → standardised RAE latent → ``z·sqrt(var + 1e-5) + mean`` →
    RAE tokens ``[B, H·W, C]`` → pixels."""

    def __init__(self, codec: PrincipalLatent, decoder: nn.Module, latent_mean: torch.Tensor,
                 latent_var: torch.Tensor):
        super().__init__()
        self.codec, self.decoder = codec, decoder
        self.register_buffer("std", torch.sqrt(latent_var.float() + 1e-5))
        self.register_buffer("mean", latent_mean.float())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, k = tokens.shape
        g = self.codec.grid
        p = tokens.transpose(1, 2).reshape(B, k, g, g)
        z = self.codec.decode(p) * self.std + self.mean
        return self.decoder(z.flatten(2).transpose(1, 2))


class ProjectedProbe(nn.Module):
    """GFCG's classifier on principal-coordinate latents: the :class:`LatentProbe` of the standardised
    RAE latent they map back to."""

    def __init__(self, codec: PrincipalLatent, probe: "LatentProbe"):
        super().__init__()
        self.codec, self.probe = codec, probe

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.probe(self.codec.decode(x0))


@dataclass
class DigitsModel:
    config: dict
    dit: nn.Module
    weak: nn.Module
    decoder: nn.Module  # DiT latent tokens -> pixels (a ProjectedDecoder when ``codec`` is set)
    probe: nn.Module  # DiT latent -> logits
    latent_mean: torch.Tensor  # [C, H, W] of the RAE latent
    latent_var: torch.Tensor
    codec: PrincipalLatent | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The DiT's latent shape."""
        return self.codec.shape if self.codec is not None else tuple(self.latent_mean.shape)

    def pipeline(self, *, steps: int | None = None, grid: str | None = None, policy=None, device="cpu",
                 **kw):
        """A :class:`raekern.sampling.pipelines.Pipeline` over these networks (x-prediction, RAEv2 grid,
        decoder output in [0, 1], null label 10, the weak model registered for AutoGuidance)."""
        from raekern.sampling import pipelines as P
        from raekern.sampling.guidance import NoGuidance

        for m in (self.dit, self.weak, self.decoder, self.probe):
            m.to(device)
        # The diffusion networks run in the requested dtype (copies: the cached model stays float32);
        # the decoder keeps float32 (its principal-coordinate codec computes in float32 anyway).
        dit, weak = self.dit, self.weak
        md = kw.get("model_dtype") or kw.get("dtype") or torch.float32
        if md != torch.float32:
            dit, weak = (copy.deepcopy(m).to(md) for m in (dit, weak))
        decoder = self.decoder
        shape = self.latent_shape
        # principal-coordinate latents are de-standardised inside the ProjectedDecoder
        stats = (None, None) if self.codec is not None else (self.latent_mean, self.latent_var)
        return P.Pipeline(
            dit, policy or NoGuidance(),
            P.make_grid(grid or self.config.get("grid", "raev2"),
                        self.config.get("steps", 32) if steps is None else steps,
                        alpha=self.config.get("alpha"), latent_shape=shape),
            latent_shape=shape, decoder=decoder, latent_mean=stats[0], latent_var=stats[1],
            decoder_output="unit", param="x0", x0_t_eps=0.05, models={"weak": weak},
            null_label=NUM_CLASSES, num_classes=NUM_CLASSES, device=device, **kw)


def save_digits_model(path, config: dict, dit: nn.Module, weak: nn.Module, decoder: nn.Module,
                      probe: nn.Module, latent_mean: torch.Tensor, latent_var: torch.Tensor,
                      codec: PrincipalLatent | None = None, dtype: torch.dtype = torch.float16) -> None:
    """Write everything into one safetensors file (weights in ``dtype`` to keep it a few MB; the
    statistics and the principal axes in fp32); ``config`` (JSON) goes into the metadata. ``decoder``
    and ``probe`` are the plain RAE-latent networks (not the Projected wrappers)."""
    from safetensors.torch import save_file

    tensors = {}
    for prefix, mod in (("dit", dit), ("weak", weak), ("decoder", decoder), ("probe", probe)):
        for k, v in mod.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().to("cpu", dtype).contiguous()
    tensors["stats.mean"] = latent_mean.detach().float().cpu().contiguous()
    tensors["stats.var"] = latent_var.detach().float().cpu().contiguous()
    if codec is not None:
        config = dict(config, codec=dict(latent_shape=list(codec.latent_shape), grid=codec.grid))
        for k in ("components", "center", "scale"):
            tensors[f"codec.{k}"] = getattr(codec, k).detach().float().cpu().contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"config": json.dumps(config)})


def read_config(path=ASSET) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["config"])


def load_digits_model(path=None, *, backend: str = "raekern") -> DigitsModel:
    """Load the embedded model (or another file written by :func:`save_digits_model`) in fp32, eval mode."""
    from safetensors.torch import load_file

    from raekern.models.checkpoints import load_state_dict_into
    from raekern.models.decoder import ViTMAEDecoder
    from raekern.models.dit import DiTDHv2

    path = Path(path) if path is not None else ASSET
    if not path.is_file():
        raise FileNotFoundError(f"raekern.models.digits: argument 'path': model file not found: {path}")
    cfg = read_config(path)
    sd = load_file(str(path))
    part = lambda p: {k[len(p) + 1:]: v.float() for k, v in sd.items() if k.startswith(p + ".")}  # noqa: E731
    dit = DiTDHv2(**cfg["dit"], backend=backend)
    weak = DiTDHv2(**cfg["weak"], backend=backend)
    dec = ViTMAEDecoder(**cfg["decoder"], backend=backend)
    mean, var = sd["stats.mean"].float(), sd["stats.var"].float()
    probe = LatentProbe(mean.shape[0])
    for name, mod in (("dit", dit), ("weak", weak), ("decoder", dec), ("probe", probe)):
        load_state_dict_into(mod, part(name), what=f"{path} [{name}]")
        mod.eval().requires_grad_(False)
    codec = None
    if "codec" in cfg:
        codec = PrincipalLatent(sd["codec.components"], sd["codec.center"], sd["codec.scale"],
                                tuple(cfg["codec"]["latent_shape"]), cfg["codec"]["grid"])
        dec = ProjectedDecoder(codec, dec, mean, var).eval()
        probe = ProjectedProbe(codec, probe).eval()
    return DigitsModel(cfg, dit, weak, dec, probe, mean, var, codec)


# -- the `raekern sample` preset -----------------------------------------------------------------------
_CACHE: dict = {}


def _cached(backend: str = "raekern") -> DigitsModel:
    if backend not in _CACHE:
        _CACHE[backend] = load_digits_model(backend=backend)
    return _CACHE[backend]


def _build(o: dict):
    if torch.device(o.get("device", "cpu")).type == "cpu" and torch.get_num_threads() > 1:
        # This model's matrices are a few dozen rows wide: a second OpenMP thread only adds a barrier
        # per op, and on a busy machine those waits cost more than the work (20 samples: 1.5 CPU-s
        # on one thread, 37 CPU-s on two while other jobs were running).
        torch.set_num_threads(1)
    m = _cached()
    kw = {k: o[k] for k in ("solver", "cuda_graph", "progress", "model_dtype") if o.get(k) is not None}
    return m.pipeline(steps=o.get("steps"), grid=o.get("grid"), device=o.get("device", "cpu"),
                      dtype=o.get("dtype", torch.float32), **kw)


def _classifier(o: dict, pipe):
    return _cached().probe.to(pipe.device)


def register() -> None:
    """Register preset ``digits`` (the CLI's default) when the embedded file is installed."""
    if not ASSET.is_file():
        return
    from raekern.sampling.presets import Preset, register_preset

    try:
        guidance = tuple(read_config().get("guidance", DEFAULT_GUIDANCE))
    except Exception:  # an unreadable file surfaces when the preset is built
        guidance = DEFAULT_GUIDANCE
    register_preset(Preset(
        "digits", "embedded small RAE + DiT-DH v2 trained on scikit-learn's digits: 32x32 images, latent "
        "[64,4,4] modelled in its top-64 principal coordinates, depth-8 base head, a weak model and a latent "
        "probe (GFCG); no checkpoint needed",
        _build, guidance=guidance, needs_checkpoint=False, num_classes=NUM_CLASSES, classifier=_classifier))
