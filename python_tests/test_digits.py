"""The embedded digits model and the `raekern sample` default that uses it."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

from raekern.models import digits  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
needs_asset = pytest.mark.skipif(not digits.ASSET.is_file(), reason="embedded model file not present")


@needs_asset
def test_embedded_model_loads_and_is_small():
    assert digits.ASSET.stat().st_size < 8e6
    m = digits.load_digits_model()
    C, H, W = m.latent_shape
    assert (C, H, W) == (m.config["dit"]["in_channels"], m.config["dit"]["input_size"], m.config["dit"]["input_size"])
    assert m.dit.base_model_depth == 8
    x = torch.randn(2, C, H, W)
    t, y = torch.tensor([0.5, 0.9]), torch.tensor([3, 10])  # 10 = null label
    x_full, x_base = m.dit(x, t, y)
    assert x_full.shape == x_base.shape == x.shape and torch.isfinite(x_full).all()
    assert m.weak(x, t, y).shape == x.shape
    assert m.probe(x).shape == (2, 10)
    img = m.decoder(x.flatten(2).transpose(1, 2))
    assert img.shape == (2, 3, m.config["image_size"], m.config["image_size"])


@needs_asset
def test_preset_is_the_cli_default():
    from raekern.sampling.presets import DEFAULT_PRESET, get_preset

    p = get_preset(DEFAULT_PRESET)
    assert p.name == "digits" and not p.needs_checkpoint and p.num_classes == 10


def _sample(tmp_path, *extra):
    from raekern.cli import main

    out = tmp_path / "out"
    t0 = time.process_time()  # CPU seconds: wall time means little on a machine shared with other jobs
    assert main(["sample", "--out", str(out), "--no-progress", *extra]) == 0
    return out, time.process_time() - t0


@needs_asset
def test_raekern_sample_without_checkpoints_writes_a_digit_grid(tmp_path):
    out, sec = _sample(tmp_path, "--num", "20")
    assert sec < 20  # CPU seconds (a few on an idle 2-core machine)
    assert (out / "grid.png").is_file()
    with np.load(out / "samples.npz") as z:
        imgs, labels = z["arr_0"], z["labels"]
    assert imgs.shape == (20, 32, 32, 3) and imgs.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(20)]
    assert 5 < imgs.mean() < 200  # digits, not a blank or saturated image


@needs_asset
@pytest.mark.parametrize("spec", ["none", "cfg:1.5", "internal:1.5", "ag:1.5", "gfcg:w_max=2,kappa=10,mode=cfg3,cfg=1.5"])
def test_raekern_sample_guidance_choices(tmp_path, spec):
    out, _ = _sample(tmp_path, "--num", "10", "--steps", "6", "--guidance", spec, "--grid-images", "10")
    assert (out / "grid.png").is_file()


@needs_asset
def test_sampled_latents_carry_the_requested_class():
    """The DiT's samples are class-conditional in latent space: GFCG's latent probe agrees with the
    label. (Whether they decode to digits is judged by examples/digits/run.py's independent classifier,
    which is not shipped: see examples/digits/results/results.md.)"""
    m = digits.load_digits_model()
    pipe = m.pipeline(steps=16, progress=False)
    labels = torch.arange(10).repeat(2)
    z = pipe.latents(labels, torch.randn(len(labels), *m.latent_shape, generator=torch.Generator().manual_seed(0)))
    acc = (m.probe(z).argmax(1) == labels).float().mean()
    assert acc >= 0.7


def test_principal_latent_round_trip_and_decoder_layout():
    """The DiT's principal coordinates map back to the standardised latent exactly on the fitted
    subspace, and ProjectedDecoder undoes the pipeline's row-major tokenisation of [B, k, g, g]."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(32, 8, 2, 2, generator=g)
    z = (torch.randn(200, 32, generator=g) @ basis.flatten(1)).view(200, 8, 2, 2)  # rank-32 data in 32 dims
    codec = digits.PrincipalLatent.fit(z, k=16, grid=2)
    p = codec.encode(z)
    assert p.shape == (200, 4, 2, 2)
    assert abs(float(p.var()) - 1.0) < 0.05  # one global scale: unit variance on average
    full = digits.PrincipalLatent.fit(z, k=32, grid=2)
    torch.testing.assert_close(full.decode(full.encode(z)), z, atol=1e-4, rtol=1e-4)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, tokens):
            seen["tokens"] = tokens
            return tokens

    mean, var = torch.randn(8, 2, 2, generator=g), torch.rand(8, 2, 2, generator=g) + 0.5
    dec = digits.ProjectedDecoder(codec, Spy(), mean, var)
    dec(p[:3].flatten(2).transpose(1, 2))
    want = (codec.decode(p[:3]) * torch.sqrt(var + 1e-5) + mean).flatten(2).transpose(1, 2)
    torch.testing.assert_close(seen["tokens"], want)
    with pytest.raises(ValueError, match="'grid'"):
        digits.PrincipalLatent.fit(z, k=6, grid=2)


def test_missing_model_file_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="'path'"):
        digits.load_digits_model(tmp_path / "nope.safetensors")


@pytest.mark.slow
def test_quick_pipeline_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples/digits/run.py"), "--quick", "--work", str(tmp_path / "w"),
                        "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (tmp_path / "r" / "results.md").read_text()
    assert "GFCG + AutoGuidance" in md and "DRoRAE" in md
    assert (tmp_path / "r" / "reconstructions.png").is_file()
