"""Named sampling configurations: which networks, latent shape, grid and default guidance.

A preset turns the CLI's options (checkpoint paths, steps, device …) into a :class:`Pipeline` with no
guidance; the CLI then attaches the policy built from ``--guidance`` (or the preset's default). Other
modules register their own presets with :func:`register_preset` — e.g. an embedded model that needs
no checkpoint becomes the CLI's default by registering the name in ``DEFAULT_PRESET``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from raekern.sampling import pipelines as P

DEFAULT_PRESET = "digits"  # an embedded small model (registered by its own module when present)


@dataclass
class Preset:
    name: str
    description: str
    build: Callable[[dict], "P.Pipeline"]
    guidance: tuple[str, ...] = ("none",)
    needs_checkpoint: bool = True
    num_classes: int = 1000
    # Builds the GFCG classifier from the options and the pipeline (None: the preset has none).
    classifier: Callable[[dict, "P.Pipeline"], Callable] | None = None
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        hint = (" (the embedded default model is not part of this build; pass --preset and checkpoint "
                "paths)" if name == DEFAULT_PRESET else "")
        raise ValueError(f"raekern sample: argument '--preset' {name!r} is not known{hint}; known: {known}")
    return PRESETS[name]


def _common(o: dict) -> dict:
    return dict(device=o.get("device", "cpu"), solver=o.get("solver", "euler"),
                cuda_graph=o.get("cuda_graph", False), progress=o.get("progress", True),
                model_dtype=o.get("model_dtype"))


def _need(o: dict, key: str, flag: str, preset: str):
    if not o.get(key):
        raise ValueError(f"raekern sample: argument '{flag}' is required by preset {preset!r}")
    return o[key]


def _steps(o: dict, default: int, grid: str) -> int:
    """--steps for ``grid``: None means the preset's default; 0 or a negative count is an error (it
    used to fall back to the default silently)."""
    steps = o.get("steps")
    if steps is None:
        return default
    least = 2 if grid in ("rae", "rae_v1") else 1  # grid 'rae' counts points: 2 points = 1 step
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < least:
        raise ValueError(f"raekern sample: argument '--steps' must be an int >= {least} for grid {grid!r}, "
                         f"got {steps!r}")
    return steps


def _load_classifier(o: dict, pipe: "P.Pipeline"):
    path = o.get("classifier_ckpt")
    if not path:
        return None
    clf = P._load(o.get("classifier_model") or "classifier", path, pipe.device, torch.float32)
    if o.get("classifier_space", "latent") == "pixel":
        return P.PixelClassifier(clf, pipe)
    return clf


def _names(o: dict, dit: str, decoder: str, weak: str | None = None) -> dict:
    """Registry names: the preset's, unless --dit-model/--weak-model/--decoder-model override them."""
    out = {"dit_name": o.get("dit_model") or dit, "decoder_name": o.get("decoder_model") or decoder}
    if weak is not None:
        out["weak_name"] = o.get("weak_model") or weak
    return out


def _rae_v1(dit: str, weak: str, decoder: str):
    def build(o: dict) -> "P.Pipeline":
        from raekern.sampling.guidance import NoGuidance

        return P.rae_v1_from_checkpoints(
            _need(o, "ckpt", "--ckpt", "rae-v1"), o.get("decoder_ckpt"), o.get("stats"),
            weak=o.get("weak_ckpt"), policy=NoGuidance(), num_points=_steps(o, 50, o.get("grid") or "rae"),
            grid=o.get("grid") or "rae",
            dtype=o.get("dtype", torch.float32), **_names(o, dit, decoder, weak), **_common(o))
    return build


def _raev2(o: dict) -> "P.Pipeline":
    from raekern.sampling.guidance import NoGuidance

    return P.raev2_from_checkpoints(
        _need(o, "ckpt", "--ckpt", "raev2-256"), o.get("decoder_ckpt"), o.get("stats"),
        policy=NoGuidance(), num_steps=_steps(o, 100, o.get("grid") or "raev2"), grid=o.get("grid") or "raev2",
        dtype=o.get("dtype", torch.float32), **_names(o, "ditdh-xl-v2", "decoder-vit-xl-v2"), **_common(o))


def _tiny(o: dict) -> "P.Pipeline":
    from raekern.sampling import _tiny as T
    from raekern.sampling.guidance import NoGuidance

    C, S = 8, 4
    grid = o.get("grid") or "uniform"
    steps = _steps(o, 8, grid)
    md = o.get("model_dtype") or o.get("dtype", torch.float32)  # the networks' dtype
    return P.Pipeline(
        T.TinyFlowNet(C, 10, seed=0).to(md), NoGuidance(),
        P.make_grid(grid, steps, latent_shape=(C, S, S)), latent_shape=(C, S, S),
        decoder=T.TinyDecoder(C, patch=4).to(md), decoder_output="unit",
        models={"weak": T.TinyFlowNet(C, 10, seed=7).to(md)},
        num_classes=10, dtype=o.get("dtype", torch.float32), **_common(o))


def _tiny_classifier(o: dict, pipe: "P.Pipeline"):
    from raekern.sampling import _tiny as T

    if o.get("classifier_space", "latent") == "pixel":
        return P.PixelClassifier(T.TinyPixelClassifier(10), pipe)
    return T.TinyLatentClassifier(8, 10)


register_preset(Preset("rae-v1-256", "RAE v1, ImageNet 256: DiT-DH-XL on DINOv2-B latents [768,16,16], "
                       "ViT-XL decoder, 49 Euler steps (grid 'rae', 50 points), AutoGuidance 1.42 with "
                       "DiT-DH-S when --weak-ckpt is given", _rae_v1("ditdh-xl", "ditdh-s", "decoder-vit-xl"),
                       guidance=("ag:1.42",), classifier=_load_classifier))
register_preset(Preset("rae-v1-512", "RAE v1, ImageNet 512: latents [768,32,32], AutoGuidance 1.5",
                       _rae_v1("ditdh-xl-512", "ditdh-s-512", "decoder-vit-xl-512"), guidance=("ag:1.5",), classifier=_load_classifier))
register_preset(Preset("raev2-256", "RAEv2, ImageNet 256: x-predicting DiT-DH-XL on DINOv3-L K=7 latents "
                       "[1024,16,16], 100 Euler steps (grid 'raev2'), internal guidance 1.78 on t in "
                       "[0.1, 1]", _raev2, guidance=("internal:1.78",), classifier=_load_classifier))
register_preset(Preset("tiny-test", "random tiny networks (8x4x4 latents, 10 classes, a weak model, a "
                       "latent classifier): exercises the whole pipeline in seconds; images are noise",
                       _tiny, guidance=("cfg:1.5",), needs_checkpoint=False, num_classes=10,
                       classifier=_tiny_classifier))


def _register_embedded() -> None:
    try:
        from raekern.models.digits import register
    except ImportError:  # a build without the embedded model
        return
    register()


_register_embedded()
