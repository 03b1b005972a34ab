"""Reading released checkpoints and loading them with errors that name every mismatched key.

safetensors files are read with safetensors; ``.pt``/``.pth``/``.bin`` only through
``torch.load(weights_only=True)`` (no pickled code runs). A checkpoint may be a plain state dict or a dict
holding one under ``'ema'`` (preferred, as RAE's sampler loads it), ``'model'`` or ``'state_dict'``.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

import torch
import torch.nn as nn

WRAPPER_KEYS = ("ema", "model", "state_dict", "module")


class CheckpointMismatchError(ValueError):
    """A state dict does not fit a model; the message lists missing, unexpected and mis-shaped keys."""


def _check_exists(path: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"raekern.models: checkpoint not found: {path}")
    return path


def find_weights(folder: str) -> str:
    """The weights file of a Hugging Face folder: ``model.safetensors`` first, then ``pytorch_model.bin``."""
    _check_exists(folder)
    for name in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"raekern.models: no weights in {folder}: expected {os.path.join(folder, 'model.safetensors')} "
                            f"or {os.path.join(folder, 'pytorch_model.bin')}")


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (or a Hugging Face folder) into a flat ``{key: tensor}`` state dict on the CPU."""
    path = _check_exists(path)
    if os.path.isdir(path):
        path = find_weights(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # truncated or foreign file: say which one
            raise ValueError(f"raekern.models: could not read {path} as safetensors: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles that need code execution are refused on purpose
        raise ValueError(f"raekern.models: could not read {path} with torch.load(weights_only=True): {e}") from e
    return unwrap_state_dict(obj, source=path)


def read_stats(path) -> dict[str, torch.Tensor]:
    """Read latent statistics (RAE's ``stat.pt``, RAEv2's ``stats.pt``, :meth:`LatentStats.save`):
    ``{'mean': [C, H, W], 'var': [C, H, W]}`` (``'std'`` instead of ``'var'`` is accepted). Like
    :func:`read_checkpoint`: weights_only, and a missing, damaged or foreign file raises naming the path."""
    path = _check_exists(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles that need code execution are refused on purpose
        raise ValueError(f"raekern.models: could not read {path} with torch.load(weights_only=True): {e}") from e
    if (not isinstance(obj, Mapping) or not isinstance(obj.get("mean"), torch.Tensor)
            or not isinstance(obj.get("var", obj.get("std")), torch.Tensor)):
        raise ValueError(f"raekern.models: {path} holds no latent statistics (expected a dict with 'mean' and "
                         "'var' tensors)")
    var = obj["var"] if "var" in obj else obj["std"] ** 2
    if var.shape != obj["mean"].shape:
        raise ValueError(f"raekern.models: {path} holds 'mean' {tuple(obj['mean'].shape)} and "
                         f"{'var' if 'var' in obj else 'std'} {tuple(var.shape)} of different shapes")
    return {"mean": obj["mean"], "var": var}


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for k in WRAPPER_KEYS:
            if k in obj and isinstance(obj[k], Mapping):
                return unwrap_state_dict(obj[k], source)
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(f"raekern.models: {source} holds no state dict (expected a {{name: tensor}} mapping, "
                     f"possibly under one of {list(WRAPPER_KEYS)})")


_HF_V5_RENAMES = (
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
)


def normalize_keys(sd: Mapping[str, torch.Tensor], model_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Map harmless spelling differences onto the model's keys: a ``module.``/``_orig_mod.`` prefix
    (DDP / torch.compile), a leading model-name prefix (e.g. ``dinov2.``), and transformers-5 attention
    names (``q_proj``...) onto the released Hugging Face names (``attention.attention.query``...)."""
    model_keys = set(model_keys)
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod."):
            while k.startswith(pre):
                k = k[len(pre):]
        for pat, rep in _HF_V5_RENAMES:
            k = pat.sub(rep, k)
        out[k] = v
    if out and not (set(out) & model_keys):
        # a single wrapping prefix shared by every key (e.g. "dinov2.", "encoder.")
        first = next(iter(out)).split(".", 1)[0] + "."
        if all(k.startswith(first) for k in out):
            stripped = {k[len(first):]: v for k, v in out.items()}
            if set(stripped) & model_keys:
                out = stripped
    return out


def load_state_dict_into(model: nn.Module, sd: Mapping[str, torch.Tensor], *, what: str = "checkpoint",
                         optional: Iterable[str] = ()) -> None:
    """Strict load: every model key present with its shape, no extra key. Keys whose last name component
    is in ``optional`` may be missing. Raises :class:`CheckpointMismatchError` listing all problems."""
    own = model.state_dict()
    sd = normalize_keys(sd, own.keys())
    optional = set(optional)
    missing = [k for k in own if k not in sd and k.rsplit(".", 1)[-1] not in optional]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"raekern.models: {what} does not match {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes)}")
        raise CheckpointMismatchError("\n  ".join(parts))
    assign = _is_meta(model)
    if assign:  # assign=True keeps the checkpoint's tensors as they are: give them the model's dtypes,
        # as load_state_dict's copy would (a bf16 or mixed-dtype file must not make a mixed model)
        sd = {k: (v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v)
              for k, v in sd.items()}
    model.load_state_dict(dict(sd), strict=False, assign=assign)


def _is_meta(model: nn.Module) -> bool:
    p = next(iter(model.state_dict().values()), None)
    return p is not None and p.is_meta
