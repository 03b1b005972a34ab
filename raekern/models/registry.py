"""Every released configuration by name: ``build(name, **overrides)`` and ``load(name, path)``.

Build on any device, including ``'meta'`` (shapes and keys without memory)::

    raekern.models.build("ditdh-xl", device="meta")
    model = raekern.models.load("ditdh-xl", "models/DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt")
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    factory: Callable[..., nn.Module]
    kwargs: dict
    doc: str
    released: bool = True
    extra: dict = field(default_factory=dict)


def _dit(**kw):
    from raekern.models.dit import DiTDH
    return DiTDH(**kw)


def _dit2(**kw):
    from raekern.models.dit import DiTDHv2
    return DiTDHv2(**kw)


def _dec(**kw):
    from raekern.models.decoder import ViTMAEDecoder
    return ViTMAEDecoder(**kw)


def _dino2(**kw):
    from raekern.models.encoder import Dinov2Encoder
    return Dinov2Encoder(**kw)


def _dino3(**kw):
    from raekern.models.encoder import Dinov3Encoder
    return Dinov3Encoder(**kw)


_V1_XL = dict(in_channels=768, hidden_size=(1152, 2048), depth=(28, 2), num_heads=(16, 16))
_V1_S = dict(in_channels=768, hidden_size=(384, 2048), depth=(12, 2), num_heads=(6, 16))
_V2_XL = dict(in_channels=1024, hidden_size=(1440, 2048), depth=(28, 2), num_heads=(20, 16), base_model_depth=8)
_DEC = {
    "b": dict(hidden_size=768, depth=12, num_heads=12, intermediate_size=3072),
    "l": dict(hidden_size=1024, depth=24, num_heads=16, intermediate_size=4096),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16, intermediate_size=4096),
}
_DINO2 = {
    "s": dict(hidden_size=384, depth=12, num_heads=6),
    "b": dict(hidden_size=768, depth=12, num_heads=12),
    "l": dict(hidden_size=1024, depth=24, num_heads=16),
}

MODELS: dict[str, ModelSpec] = {
    "ditdh-xl": ModelSpec(_dit, dict(input_size=16, **_V1_XL), "RAE v1 DiT^DH-XL, DINOv2-B latent, 256 px"),
    "ditdh-s": ModelSpec(_dit, dict(input_size=16, **_V1_S), "RAE v1 DiT^DH-S (AutoGuidance weak model), 256 px"),
    "ditdh-xl-512": ModelSpec(_dit, dict(input_size=32, **_V1_XL), "RAE v1 DiT^DH-XL, 512 px (32x32 latent)"),
    "ditdh-s-512": ModelSpec(_dit, dict(input_size=32, **_V1_S), "RAE v1 DiT^DH-S, 512 px"),
    "ditdh-xl-v2": ModelSpec(_dit2, dict(input_size=16, **_V2_XL),
                             "RAEv2 ImageNet DiT^DH-XL with the depth-8 base head, DINOv3-L K=7 latent"),
    "decoder-vit-b": ModelSpec(_dec, dict(latent_dim=768, output_space="imagenet", **_DEC["b"]),
                               "RAE v1 ViT-B decoder for DINOv2-B"),
    "decoder-vit-l": ModelSpec(_dec, dict(latent_dim=768, output_space="imagenet", **_DEC["l"]),
                               "RAE v1 ViT-L decoder for DINOv2-B"),
    "decoder-vit-xl": ModelSpec(_dec, dict(latent_dim=768, output_space="imagenet", **_DEC["xl"]),
                                "RAE v1 ViT-XL decoder for DINOv2-B (ViTXL_n08)"),
    "decoder-vit-xl-512": ModelSpec(_dec, dict(latent_dim=768, output_space="imagenet", num_patches=1024,
                                               **_DEC["xl"]), "RAE v1 ViT-XL decoder, 512 px"),
    "decoder-vit-xl-v2": ModelSpec(_dec, dict(latent_dim=1024, output_space="pixel", **_DEC["xl"]),
                                   "RAEv2 ViT-XL decoder for DINOv3-L (predicts [0, 1] pixels)"),
    "dinov2-s-reg": ModelSpec(_dino2, dict(input_size=224, **_DINO2["s"]), "DINOv2-S with 4 registers"),
    "dinov2-b-reg": ModelSpec(_dino2, dict(input_size=224, **_DINO2["b"]), "DINOv2-B with 4 registers (RAE v1)"),
    "dinov2-l-reg": ModelSpec(_dino2, dict(input_size=224, **_DINO2["l"]), "DINOv2-L with 4 registers"),
    "dinov3-l16": ModelSpec(_dino3, dict(input_size=256), "DINOv3 ViT-L/16, 4 storage tokens (RAEv2)"),
    # small configurations for tests and smoke runs (not released)
    "ditdh-tiny": ModelSpec(_dit, dict(input_size=4, in_channels=16, hidden_size=(32, 48), depth=(2, 2),
                                       num_heads=(2, 2)), "tiny v1 DiT-DH for tests", released=False),
    "ditdh-tiny-v2": ModelSpec(_dit2, dict(input_size=4, in_channels=16, hidden_size=(32, 48), depth=(3, 2),
                                           num_heads=(2, 2), base_model_depth=2), "tiny v2 DiT-DH for tests",
                               released=False),
    "decoder-tiny": ModelSpec(_dec, dict(latent_dim=16, hidden_size=32, depth=2, num_heads=2, intermediate_size=64,
                                         patch_size=4, num_patches=16), "tiny decoder for tests", released=False),
    "dinov2-tiny-reg": ModelSpec(_dino2, dict(hidden_size=16, depth=3, num_heads=2, patch_size=14, image_size=70,
                                              input_size=56), "tiny DINOv2-reg for tests", released=False),
    "dinov3-tiny": ModelSpec(_dino3, dict(hidden_size=32, depth=3, num_heads=2, patch_size=16, input_size=64),
                             "tiny DINOv3 for tests", released=False),
}


# Autoencoders: encoder config, the encoder blocks fused, fusion arguments, decoder config. The fusion's
# skip_tokens is not listed: build_rae takes it from the encoder built (a plain DINOv2 folder has 1 prefix
# token, DINOv2-reg and DINOv3 have 5).
AUTOENCODERS = {
    "rae-dinov2-b": dict(encoder="dinov2-b-reg", layers=(11,), decoder="decoder-vit-xl",
                         fusion=dict(eps=1e-6, add_last_token_mean=False),
                         doc="RAE v1: DINOv2-B-reg last block (non-affine LN), ViT-XL decoder (ImageNet-normalised)"),
    "raev2-dinov3l-k7": dict(encoder="dinov3-l16", layers=(11, 13, 15, 17, 19, 21, 23), decoder="decoder-vit-xl-v2",
                             fusion=dict(eps=1e-5, add_last_token_mean=True),
                             doc="RAEv2 K=7: DINOv3-L blocks 11..23 step 2, LN mean + last-layer token mean"),
    "drorae-dinov2-b": dict(encoder="dinov2-b-reg", layers=tuple(range(12)), decoder="decoder-vit-xl",
                            fusion_cls="DepthRoutedFusion",
                            fusion=dict(dim=768, num_layers=12, hidden=1536, eps=1e-6),
                            doc="DRoRAE (inferred formulation): all 12 DINOv2-B blocks, expert MLPs, signed "
                                "L2-energy depth routing, tanh-bounded correction of the last-layer latent"),
    "rae-tiny": dict(encoder="dinov2-tiny-reg", layers=(2,), decoder="decoder-tiny",
                     fusion=dict(eps=1e-6, add_last_token_mean=False), doc="tiny, for tests"),
    "drorae-tiny": dict(encoder="dinov2-tiny-reg", layers=(0, 1, 2), decoder="decoder-tiny",
                        fusion_cls="DepthRoutedFusion",
                        fusion=dict(dim=16, num_layers=3, hidden=32, eps=1e-6), doc="tiny, for tests"),
}


def build_rae(name: str, *, encoder_path: Optional[str] = None, decoder_path: Optional[str] = None,
              stats_path: Optional[str] = None, backend: str = "raekern", noise_tau: float = 0.0,
              noise_dist: str = "uniform", device=None, dtype: Optional[torch.dtype] = None):
    """Build an autoencoder (``'rae-dinov2-b'``, ``'raev2-dinov3l-k7'``, ``'drorae-dinov2-b'``) and load
    whatever paths are given:
    ``encoder_path`` (DINOv2: Hugging Face folder; DINOv3: the released ``.pth``), ``decoder_path``
    (``model.pt`` / ``decoder.pt``), ``stats_path`` (``stat.pt`` / ``stats.pt``)."""
    from raekern.models import fusion as fusion_mod
    from raekern.models.rae import RAE
    if name not in AUTOENCODERS:
        raise ValueError(f"raekern.models: argument 'name' must be one of {sorted(AUTOENCODERS)}, got {name!r}")
    spec = AUTOENCODERS[name]
    if encoder_path is not None:
        encoder = load(spec["encoder"], encoder_path, backend=backend)
    else:
        encoder = build(spec["encoder"], backend=backend)
    decoder = (load(spec["decoder"], decoder_path, backend=backend) if decoder_path is not None
               else build(spec["decoder"], backend=backend))
    cls = getattr(fusion_mod, spec.get("fusion_cls", "LayerMeanFusion"))
    args = () if spec.get("fusion_cls") else (None,)  # LayerMeanFusion fuses every block RAE hands it
    # the encoder actually loaded decides how many prefix tokens to drop, not the registry entry
    fusion = cls(*args, **spec["fusion"], skip_tokens=encoder.num_prefix_tokens,
                 use_raekern=backend == "raekern")
    rae = RAE(encoder, fusion, decoder, layers=spec["layers"], noise_tau=noise_tau, noise_dist=noise_dist,
              backend=backend)
    if stats_path is not None:
        rae.load_stats(stats_path)
    return rae.to(device=device, dtype=dtype)


def list_models(released_only: bool = False) -> list[str]:
    return sorted(k for k, v in MODELS.items() if v.released or not released_only)


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"raekern.models: argument 'name' must be one of {list_models()}, got {name!r}")
    return MODELS[name]


def build(name: str, *, device=None, dtype: Optional[torch.dtype] = None, **overrides) -> nn.Module:
    """Build configuration ``name`` (see :func:`list_models`) with keyword ``overrides`` of its constructor
    (e.g. ``backend="torch"``, ``depth=(4, 2)``) on ``device`` (``'meta'`` allocates nothing)."""
    spec = _spec(name)
    kwargs = {**spec.kwargs, **overrides}
    dev = torch.device(device) if device is not None else None
    if dev is not None:
        with dev:
            model = spec.factory(**kwargs)
    else:
        model = spec.factory(**kwargs)
    if dtype is not None:
        model = model.to(dtype)
    return model


# What load() can still choose for a DINOv2 Hugging Face folder (the rest is the folder's config.json).
_HF_FOLDER_OVERRIDES = ("input_size", "backend")


def load(name: str, path: str, *, device=None, dtype: Optional[torch.dtype] = None, **overrides) -> nn.Module:
    """Build ``name`` and load the checkpoint at ``path`` strictly (a plain state dict, ``{'ema': ...}``,
    a safetensors file, or — for encoders — a Hugging Face folder). Mismatches raise
    :class:`~raekern.models.checkpoints.CheckpointMismatchError` naming every key."""
    from raekern.models.checkpoints import read_checkpoint, load_state_dict_into
    _spec(name)
    if MODELS[name].factory is _dino2 and os.path.isdir(path):
        from raekern.models.encoder import Dinov2Encoder
        # the architecture comes from the folder's config.json; an override of it would be dropped unseen
        ignored = sorted(k for k in overrides if k not in _HF_FOLDER_OVERRIDES)
        if ignored:
            raise ValueError(f"raekern.models: argument(s) {ignored} cannot be applied when loading {name!r} from "
                             f"the Hugging Face folder {path} (its config.json sets the architecture); only "
                             f"{list(_HF_FOLDER_OVERRIDES)}, device and dtype can be given")
        return Dinov2Encoder.from_pretrained(path, device=device, dtype=dtype,
                                             **{"input_size": MODELS[name].kwargs["input_size"], **overrides})
    sd = read_checkpoint(path)
    model = build(name, device="meta", **overrides)
    optional = ("bias_mask",) if name.startswith("dinov3") else ()
    if name.startswith("dinov3") and not any(k.endswith("bias_mask") for k in sd):
        # keep the buffer's default (key bias masked) when the file omits it
        model = build(name, **overrides)
    if dtype is not None:  # the checkpoint's tensors are converted once, straight to this dtype
        model = model.to(dtype)
    load_state_dict_into(model, sd, what=f"checkpoint {path}", optional=optional)
    if any(t.is_meta for t in model.state_dict().values()):
        raise RuntimeError(f"raekern.models: {path} left some tensors of {name} unset")
    _rebuild_nonpersistent(model)
    return model.to(device=device, dtype=dtype)


def _rebuild_nonpersistent(model: nn.Module) -> None:
    """Non-persistent buffers (ImageNet mean/std) are not in checkpoints; recreate them off the meta device."""
    from raekern.models.decoder import refill_pixel_stats
    for m in model.modules():
        refill_pixel_stats(m, materialize=True)
