"""Pipelines on raekern.models' tiny DiT-DH v1/v2 and decoder configurations, loaded from local
checkpoint files: labels → latents → images, against the released samplers' transcriptions."""
import pytest
import torch

from raekern import models as M
from raekern.sampling import AutoGuidance, CFG, InternalGuidance
from raekern.sampling.pipelines import (load_latent_stats, rae_v1_from_checkpoints, raev2_from_checkpoints,
                                        gfcg_pipeline)
from raekern.sampling.reference import rae_v1_reference_sample, raev2_reference_sample
from raekern.sampling.sampler import indexed_noise, sample
from raekern.sampling.grids import rae_v1_grid

SHAPE = (16, 4, 4)
LABELS = torch.tensor([3, 999, 0])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomize(m, seed):
    """Released DiTs zero-initialise adaLN and output layers; random weights make the test bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    nets = {"main": _randomize(M.build("ditdh-tiny", backend="torch"), 0),
            "weak": _randomize(M.build("ditdh-tiny", backend="torch"), 1),
            "v2": _randomize(M.build("ditdh-tiny-v2", backend="torch"), 2),
            "dec": _randomize(M.build("decoder-tiny", backend="torch"), 3)}
    for k, m in nets.items():
        torch.save(m.state_dict(), d / f"{k}.pt")
    g = torch.Generator().manual_seed(4)
    torch.save({"mean": torch.randn(SHAPE, generator=g) * 0.1, "var": torch.rand(SHAPE, generator=g) + 0.5},
               d / "stat.pt")
    return d, nets


def test_rae_v1_from_checkpoints_with_autoguidance(ckpts):
    d, nets = ckpts
    pipe = rae_v1_from_checkpoints(d / "main.pt", d / "dec.pt", d / "stat.pt", weak=d / "weak.pt",
                                   dit_name="ditdh-tiny", weak_name="ditdh-tiny", decoder_name="decoder-tiny",
                                   num_points=10, progress=False, backend="torch")
    assert isinstance(pipe.policy, AutoGuidance)
    noise = indexed_noise(range(3), SHAPE, 0)
    z = pipe.latents(LABELS, noise)
    want = rae_v1_reference_sample(nets["main"], noise, LABELS, num_steps=10, cfg_scale=1.42,
                                   method="autoguidance", weak_model=nets["weak"])
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4)
    imgs = pipe(LABELS, seed=0)
    mean, var = load_latent_stats(d / "stat.pt")
    tokens = (want * torch.sqrt(var + 1e-5) + mean).flatten(2).transpose(1, 2)
    px = nets["dec"].to_unit(nets["dec"](tokens)).clamp(0, 1)
    torch.testing.assert_close(imgs, px, rtol=1e-4, atol=1e-4)
    assert imgs.shape == (3, 3, 16, 16)


def test_raev2_from_checkpoints_internal_guidance(ckpts):
    d, nets = ckpts
    pipe = raev2_from_checkpoints(d / "v2.pt", d / "dec.pt", d / "stat.pt", dit_name="ditdh-tiny-v2",
                                  decoder_name="decoder-tiny", num_steps=12, latent_shape=SHAPE,
                                  progress=False, backend="torch")
    assert isinstance(pipe.policy, InternalGuidance)
    noise = indexed_noise(range(3), SHAPE, 0)
    z = pipe.latents(LABELS, noise)
    want = raev2_reference_sample(nets["v2"], noise, LABELS, num_steps=12, ig_scale=1.78)
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4)
    pipe_cfg = pipe.with_policy(InternalGuidance(1.78, cfg_scale=1.5))
    want = raev2_reference_sample(nets["v2"], noise, LABELS, num_steps=12, ig_scale=1.78, cfg_scale=1.5)
    torch.testing.assert_close(pipe_cfg.latents(LABELS, noise), want, rtol=1e-4, atol=1e-4)


def test_gfcg_on_tiny_dit(ckpts):
    d, nets = ckpts
    pipe = rae_v1_from_checkpoints(d / "main.pt", d / "dec.pt", d / "stat.pt", dit_name="ditdh-tiny",
                                   decoder_name="decoder-tiny", num_points=6, latent_shape=SHAPE,
                                   progress=False, backend="torch")
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 1000))
    for space, clf in (("latent", head), ("pixel", torch.nn.Sequential(torch.nn.Flatten(),
                                                                       torch.nn.Linear(3 * 16 * 16, 1000)))):
        g = gfcg_pipeline(pipe, clf, space=space, w_max=2.0, kappa=5.0, mode="cfg3", cfg_scale=1.5)
        imgs = g(LABELS, seed=0)
        assert imgs.shape == (3, 3, 16, 16) and torch.isfinite(imgs).all()


@pytest.mark.skipif(not M.raekern_backend_available(), reason="raekern ops not built")
def test_raekern_backend_sampler_matches_plain_pytorch(ckpts):
    d, nets = ckpts
    fast = M.build("ditdh-tiny", backend="raekern").eval()
    fast.load_state_dict(nets["main"].state_dict())
    noise = indexed_noise(range(3), SHAPE, 0)
    got = sample(fast, noise, LABELS, CFG(1.5), rae_v1_grid(8, latent_shape=SHAPE), progress=False)
    want = rae_v1_reference_sample(nets["main"], noise, LABELS, num_steps=8, cfg_scale=1.5)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("preset", ["rae-v1-256", "raev2-256"])
def test_cli_from_checkpoint_paths(ckpts, tmp_path, preset):
    import numpy as np

    from raekern.sampling import cli

    d, nets = ckpts
    if preset == "rae-v1-256":
        extra = ["--ckpt", str(d / "main.pt"), "--dit-model", "ditdh-tiny", "--weak-ckpt", str(d / "weak.pt"),
                 "--weak-model", "ditdh-tiny", "--steps", "6"]
    else:
        extra = ["--ckpt", str(d / "v2.pt"), "--dit-model", "ditdh-tiny-v2", "--steps", "6"]
    argv = [*extra, "--preset", preset, "--decoder-ckpt", str(d / "dec.pt"), "--decoder-model", "decoder-tiny",
            "--stats", str(d / "stat.pt"), "--labels", "3,999,0", "--num", "3", "--batch-size", "3",
            "--no-progress", "--device", "cpu", "--keep-latents", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    with np.load(tmp_path / "samples.npz") as z:
        latents, images = torch.from_numpy(z["latents"]), z["arr_0"]
    noise = indexed_noise(range(3), SHAPE, 0)
    if preset == "rae-v1-256":  # default guidance with a weak model: AutoGuidance 1.42
        want = rae_v1_reference_sample(nets["main"], noise, LABELS, num_steps=6, cfg_scale=1.42,
                                       method="autoguidance", weak_model=nets["weak"])
    else:  # default: internal guidance 1.78 on [0.1, 1]
        want = raev2_reference_sample(nets["v2"], noise, LABELS, num_steps=6, ig_scale=1.78)
    torch.testing.assert_close(latents, want, rtol=1e-3, atol=1e-3)
    assert images.shape == (3, 16, 16, 3) and (tmp_path / "grid.png").exists()
