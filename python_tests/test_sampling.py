"""Sampling (issue #8): grids, the sampler loop against plain-PyTorch transcriptions of the released
samplers on tiny random models, branch batching, GFCG reference selection, pipelines, errors."""
import math

import numpy as np
import pytest
import torch

from raekern.sampling import guidance as G
from raekern.sampling._tiny import TinyDecoder, TinyFlowNet, TinyLatentClassifier, TinyPixelClassifier
from raekern.sampling.grids import make_grid, rae_v1_grid, raev2_grid, shift_alpha, time_shift, uniform_grid
from raekern.sampling.pipelines import Pipeline, gfcg_pipeline, image_grid, rae_v1_pipeline, raev2_pipeline
from raekern.sampling.reference import rae_v1_reference_sample, raev2_reference_sample
from raekern.sampling.sampler import Sampler, indexed_noise, make_noise, sample

C, S = 8, 4
SHAPE = (C, S, S)
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 0.15}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The networks here are tiny: thread start-up and oversubscription on a shared machine would
    cost 10x the work itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Counting(torch.nn.Module):
    """Records the batch size of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, y=None):
        self.calls.append(x.shape[0])
        return self.net(x, t, y)


@pytest.fixture(scope="module")
def nets():
    return {"main": TinyFlowNet(C, 10, seed=0).eval(), "weak": TinyFlowNet(C, 10, seed=5).eval(),
            "v2": TinyFlowNet(C, 10, two_outputs=True, seed=3).eval()}


def _noise(B=3, seed=1, dtype=torch.float32):
    return make_noise((B, *SHAPE), seed, dtype=dtype)


LABELS = torch.tensor([1, 5, 7])


# -- grids -----------------------------------------------------------------------------------------------
def test_rae_v1_grid_matches_release():
    g = rae_v1_grid()
    assert g.num_steps == 49 and g.points.dtype == torch.float32
    assert g.alpha == pytest.approx(math.sqrt(48))
    expected = 1 - torch.linspace(0, 0.999, 50)
    expected = math.sqrt(768 * 16 * 16 / 4096) * expected / (1 + (math.sqrt(768 * 16 * 16 / 4096) - 1) * expected)
    assert torch.equal(g.points, expected)
    assert g.points[0].item() == 1.0
    a = math.sqrt(48)
    assert g.points[-1].item() == pytest.approx(a * 0.001 / (1 + (a - 1) * 0.001), rel=1e-4)  # float32 grid
    assert 0.0068 < g.points[-1].item() < 0.0070


def test_raev2_grid_matches_release():
    g = raev2_grid()
    assert g.num_steps == 100 and g.alpha == 8.0
    t = torch.linspace(1.0, 0.0, 101)
    assert torch.equal(g.points, 8.0 * t / (1 + 7.0 * t))
    assert g.points[-1].item() == 0.0
    assert g.points[-2].item() == pytest.approx(0.08 / 1.07, rel=1e-6)  # last evaluated t > t_eps


def test_grid_helpers():
    assert shift_alpha((1024, 16, 16)) == 8.0
    assert time_shift(0.5, 1.0) == 0.5
    u = uniform_grid(10, 3.0)
    assert u.num_steps == 10 and u.points.dtype == torch.float64 and u.points[-1] == 0
    assert make_grid("rae", 10, latent_shape=SHAPE).num_steps == 9
    with pytest.raises(ValueError, match="'kind'"):
        make_grid("karras")
    with pytest.raises(ValueError, match="'num_points'"):
        rae_v1_grid(1)


# -- the loop equals the released samplers -----------------------------------------------------------------
V1_CASES = [
    ("none", lambda: G.NoGuidance(), {}),
    ("cfg", lambda: G.CFG(1.5), dict(cfg_scale=1.5)),
    ("cfg_interval", lambda: G.CFG(2.0, interval=(0.2, 0.7)), dict(cfg_scale=2.0, interval=(0.2, 0.7))),
    ("ag", lambda: G.AutoGuidance(1.42), dict(cfg_scale=1.42, method="autoguidance")),
]


@pytest.mark.parametrize("name,policy,ref", V1_CASES, ids=[c[0] for c in V1_CASES])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_rae_v1_sampler_equals_release(nets, name, policy, ref, solver):
    num_points = 50 if solver == "euler" else 12
    grid = rae_v1_grid(num_points, latent_shape=SHAPE)
    z = _noise()
    kw = {"models": {"weak": nets["weak"]}} if name == "ag" else {}
    got = sample(nets["main"], z, LABELS, policy(), grid, solver=solver, progress=False, **kw)
    if name == "ag":
        ref = dict(ref, weak_model=nets["weak"])
    want = rae_v1_reference_sample(nets["main"], z, LABELS, num_steps=num_points,
                                   solver="euler" if solver == "euler" else "heun2", **ref)
    torch.testing.assert_close(got, want, rtol=TOL[torch.float32], atol=TOL[torch.float32])


@pytest.mark.parametrize("steps", [100, 200])  # 200: the last steps evaluate t < 0.05 (clamped)
def test_raev2_internal_guidance_equals_release(nets, steps):
    grid = raev2_grid(steps, latent_shape=SHAPE)
    z = _noise()
    got = sample(nets["v2"], z, LABELS, G.InternalGuidance(1.78, interval=(0.1, 1.0)), grid, param="x0",
                 x0_t_eps=0.05, progress=False)
    want = raev2_reference_sample(nets["v2"], z, LABELS, num_steps=steps, ig_scale=1.78)
    torch.testing.assert_close(got, want, rtol=5e-5, atol=5e-5)


def test_raev2_cfg_equals_release(nets):
    grid = raev2_grid(20, latent_shape=SHAPE)
    z = _noise()
    main0 = lambda x, t, y: nets["v2"](x, t, y)[0]  # noqa: E731
    got = sample(main0, z, LABELS, G.CFG(1.5, interval=(0.0, 0.8)), grid, param="x0", x0_t_eps=0.05,
                 progress=False)
    want = raev2_reference_sample(nets["v2"], z, LABELS, num_steps=20, cfg_scale=1.5, cfg_interval=(0.0, 0.8))
    torch.testing.assert_close(got, want, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_state_dtypes(nets, dtype):
    grid = rae_v1_grid(10, latent_shape=SHAPE)
    z = _noise()
    net = TinyFlowNet(C, 10, seed=0).to(dtype).eval()
    net.load_state_dict({k: v.to(dtype) for k, v in nets["main"].state_dict().items()})
    got = sample(net, z.to(dtype), LABELS, G.CFG(1.5), grid, progress=False)
    assert got.dtype == dtype
    want = rae_v1_reference_sample(nets["main"], z, LABELS, num_steps=10, cfg_scale=1.5)
    tol = TOL[dtype] if dtype != torch.float64 else 1e-5  # fp64 state vs the fp32 reference
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


# -- batching ----------------------------------------------------------------------------------------------
def test_branches_are_one_batched_call_per_model(nets):
    grid = rae_v1_grid(6, latent_shape=SHAPE)
    main, weak = Counting(nets["main"]), Counting(nets["weak"])
    sample(main, _noise(), LABELS, G.CFG(1.5), grid, progress=False)
    assert main.calls == [6] * 5  # [cond; null] stacked: 2B rows, one call per step
    main.calls.clear()
    sample(main, _noise(), LABELS, G.AutoGuidance(1.42), grid, models={"weak": weak}, progress=False)
    assert main.calls == [3] * 5 and weak.calls == [3] * 5  # AG needs no doubled batch
    v2 = Counting(nets["v2"])
    sample(v2, _noise(), LABELS, G.InternalGuidance(1.78), raev2_grid(5, latent_shape=SHAPE), param="x0",
           progress=False)
    assert v2.calls == [3] * 5  # both outputs of one forward
    main.calls.clear()
    sample(main, _noise(), LABELS, G.CFG(1.5), grid, solver="heun", progress=False)
    assert main.calls == [6] * 10


# -- GFCG ---------------------------------------------------------------------------------------------------
def _gfcg_transcription(net, z, y, clf, grid, w_max, kappa, previous):
    """DESIGN §4.3 written out: reference = most probable class other than the label, from the x0
    estimate (previous step's guided x0 — none at step 0: plain C —, or this step's conditional
    x0); G = C + w·(C − R) (the policy's "alone" rule)."""
    x = z.clone()
    ts = grid.times()
    x0_prev = None
    for k in range(len(ts) - 1):
        t, tn = ts[k], ts[k + 1]
        tt = torch.full((x.shape[0],), t)
        c = net(x, tt, y)
        src = x0_prev if previous else x - t * c
        if src is None:
            u = c
        else:
            p = clf(src).float().softmax(-1)
            pt = p.gather(1, y[:, None])[:, 0]
            masked = p.scatter(1, y[:, None], -1.0)
            pr, ref = masked.max(1)
            w = (w_max * torch.exp(-kappa * (pt - pr))).clamp(0, w_max).view(-1, 1, 1, 1)
            r = net(x, tt, ref)
            u = c + w * (c - r)
        x0_prev = x - t * u
        x = x + (tn - t) * u
    return x


@pytest.mark.parametrize("previous", [True, False])
def test_gfcg_reference_selection(nets, previous):
    grid = rae_v1_grid(8, latent_shape=SHAPE)
    clf = TinyLatentClassifier(C, 10)
    main = Counting(nets["main"])
    policy = G.GFCG(clf, w_max=2.0, kappa=3.0, mode="alone", reference_from_previous_step=previous)
    got = sample(main, _noise(), LABELS, policy, grid, progress=False)
    want = _gfcg_transcription(nets["main"], _noise(), LABELS, clf, grid, 2.0, 3.0, previous)
    torch.testing.assert_close(got, want, rtol=5e-5, atol=5e-5)
    if previous:  # one [cond; ref] call per step
        assert main.calls == [6] * 7
    else:
        assert main.calls == [3, 3] * 7


# -- determinism, noise, unconditional models ---------------------------------------------------------------
def test_deterministic_for_a_seed(nets):
    grid = rae_v1_grid(6, latent_shape=SHAPE)
    a = sample(nets["main"], (3, *SHAPE), LABELS, G.CFG(1.5), grid, seed=3, progress=False)
    b = sample(nets["main"], (3, *SHAPE), LABELS, G.CFG(1.5), grid, seed=3, progress=False)
    c = sample(nets["main"], (3, *SHAPE), LABELS, G.CFG(1.5), grid, seed=4, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    n1 = indexed_noise([0, 1, 2, 3], SHAPE, 5)
    n2 = torch.cat([indexed_noise([0, 1], SHAPE, 5), indexed_noise([2, 3], SHAPE, 5)])
    assert torch.equal(n1, n2)


def test_the_seed_reaches_the_noise():
    """torch's CPU generator keeps only the low 32 bits of its seed: packing (seed << 32 | i) dropped
    the seed, so every --seed sampled the same noise."""
    from raekern.sampling import seeding

    idx = [0, 1, 2, 3]
    by_seed = {s: indexed_noise(idx, SHAPE, s) for s in (0, 1, 12345, 2**32, 2**40 + 1, -1)}
    assert torch.equal(by_seed[1], indexed_noise(idx, SHAPE, 1))  # same seed, same noise
    for a in by_seed:
        for b in by_seed:
            if a != b:  # different seeds: no sample shares its noise with the same index of the other
                assert all(not torch.equal(by_seed[a][i], by_seed[b][i]) for i in range(4)), (a, b)
    # For one seed the generator seed is a bijection of the index: no two samples of a run collide.
    for s in (0, 7, 2**33 + 5):
        seeds = [seeding.noise_seed(s, i) for i in range(20000)]
        assert len(set(seeds)) == len(seeds) and all(0 <= v < 2**32 for v in seeds)
    # make_noise: seeds below 2**32 seed the generator as given; larger ones keep their high bits.
    g = torch.Generator().manual_seed(5)
    assert torch.equal(make_noise((2, 3), 5), torch.randn(2, 3, generator=g))
    assert not torch.equal(make_noise((2, 3), 5 + 2**32), make_noise((2, 3), 5))
    assert not torch.equal(make_noise((2, 3), 2**32), make_noise((2, 3), 0))
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="'seed'"):
            indexed_noise([0], SHAPE, bad)
        with pytest.raises(ValueError, match="'seed'"):
            make_noise((1,), bad)
    with pytest.raises(TypeError, match="'seed'"):
        indexed_noise([0], SHAPE, 1.5)
    with pytest.raises(ValueError, match="'indices'"):
        indexed_noise([-1], SHAPE, 0)
    with pytest.raises(ValueError, match="'indices'"):
        indexed_noise([2**32], SHAPE, 0)


def test_pipeline_seed_changes_the_samples(nets):
    pipe = rae_v1_pipeline(nets["main"], TinyDecoder(C, patch=4), num_points=4, latent_shape=SHAPE,
                           num_classes=10, progress=False)
    a, b = pipe([1, 2, 3], seed=0), pipe([1, 2, 3], seed=1)
    assert torch.equal(a, pipe([1, 2, 3], seed=0)) and not torch.equal(a, b)
    # generate: sample i depends only on (seed, i), whatever the split
    one = pipe.generate([4, 5, 6], seed=9, label_mode="random")
    two = [pipe.generate([i], seed=9, label_mode="random") for i in (4, 5, 6)]
    np.testing.assert_array_equal(one["latents"], np.concatenate([t["latents"] for t in two]))
    assert one["labels"].tolist() == [int(t["labels"][0]) for t in two]
    other = pipe.generate([4, 5, 6], seed=10, label_mode="random")
    assert not np.array_equal(one["latents"], other["latents"])


def test_reused_sampler_with_gfcg_is_deterministic(nets):
    """Outside the interval the policy gets zero weights for this batch: no weight of an earlier
    step, call or batch size reaches a Heun stage that re-enters the interval."""
    clf = TinyLatentClassifier(C, 10)
    policy = G.GFCG(clf, w_max=4.0, kappa=1.0, mode="autoguidance", ag_scale=1.5, interval=(0.0, 0.6),
                    num_classes=10)
    s = Sampler(nets["main"], policy, uniform_grid(6), models={"weak": nets["weak"]}, solver="heun",
                progress=False, null_label=10)
    a, b = s(_noise(), LABELS), s(_noise(), LABELS)
    fresh = Sampler(nets["main"], G.GFCG(clf, w_max=4.0, kappa=1.0, mode="autoguidance", ag_scale=1.5,
                                         interval=(0.0, 0.6), num_classes=10),
                    uniform_grid(6), models={"weak": nets["weak"]}, solver="heun", progress=False,
                    null_label=10)(_noise(), LABELS)
    assert torch.equal(a, b) and torch.equal(a, fresh)
    one = s(_noise(B=1), LABELS[:1])  # another batch size on the same sampler
    assert one.shape == (1, *SHAPE)


def test_grid_by_name_takes_the_latent_shift():
    net = lambda x, t, y=None: -x  # noqa: E731
    s = Sampler(net, None, "rae", progress=False)
    s(torch.randn(1, 768, 32, 32))
    assert s.grid.alpha == pytest.approx(shift_alpha((768, 32, 32)))
    assert s.grid.times() == make_grid("rae", latent_shape=(768, 32, 32)).times()
    s(torch.randn(2, *SHAPE))
    assert s.grid.alpha == pytest.approx(shift_alpha(SHAPE))
    fixed = rae_v1_grid(6, latent_shape=SHAPE)
    s = Sampler(net, None, fixed, progress=False)
    s(torch.randn(1, 768, 32, 32))
    assert s.grid is fixed  # a TimeGrid is used as given


def test_pipeline_grid_override(nets):
    p = rae_v1_pipeline(nets["main"], None, num_points=6, latent_shape=SHAPE, grid="uniform", progress=False)
    assert p.grid.name == "uniform[6]" and p.grid.alpha == pytest.approx(shift_alpha(SHAPE))
    p = raev2_pipeline(nets["v2"], None, num_steps=5, latent_shape=SHAPE, grid="rae", progress=False)
    assert p.grid.name == "rae_v1[5]"


def test_unconditional_model_and_callback():
    net = lambda x, t: -x  # noqa: E731  an unconditional model takes (x, t) only
    seen = []
    s = Sampler(net, None, uniform_grid(4), progress=False)
    out = s(_noise(), callback=lambda k, t, x, x0: seen.append((k, t)))
    assert out.shape == (3, *SHAPE) and [k for k, _ in seen] == [0, 1, 2, 3]


def test_progress_bar_can_be_switched(nets, capsys):
    sample(nets["main"], _noise(), LABELS, None, rae_v1_grid(4, latent_shape=SHAPE), progress=False)
    assert "sampling" not in capsys.readouterr().err


# -- errors ---------------------------------------------------------------------------------------------------
def test_bad_arguments_name_the_argument(nets):
    grid = rae_v1_grid(4, latent_shape=SHAPE)
    with pytest.raises(TypeError, match="'model_fn'"):
        Sampler(3, None, grid)
    with pytest.raises(ValueError, match="'solver'"):
        Sampler(nets["main"], None, grid, solver="rk4")
    with pytest.raises(ValueError, match="'param'"):
        Sampler(nets["main"], None, grid, param="score")
    with pytest.raises(ValueError, match="'models'"):
        Sampler(nets["main"], G.AutoGuidance(1.5), grid)
    with pytest.raises(TypeError, match="'grid'"):
        Sampler(nets["main"], None, [1.0, 0.0])
    s = Sampler(nets["main"], G.CFG(1.5), grid, progress=False)
    with pytest.raises(ValueError, match="'labels'"):
        s(_noise(), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="'labels'"):
        s(_noise())
    with pytest.raises(TypeError, match="'noise'"):
        s(torch.zeros(3, *SHAPE, dtype=torch.int64), LABELS)
    with pytest.raises(ValueError, match="'x0_t_eps'"):
        Sampler(nets["main"], None, grid, x0_t_eps=-1)


# -- pipelines ----------------------------------------------------------------------------------------------
def _stats():
    g = torch.Generator().manual_seed(9)
    return torch.randn(SHAPE, generator=g) * 0.1, torch.rand(SHAPE, generator=g) + 0.5


def test_rae_v1_pipeline_end_to_end(nets):
    mean, var = _stats()
    dec = TinyDecoder(C, patch=4)
    pipe = rae_v1_pipeline(nets["main"], dec, weak=nets["weak"], stats=(mean, var), num_points=6,
                           latent_shape=SHAPE, num_classes=10, progress=False)
    assert isinstance(pipe.policy, G.AutoGuidance)
    imgs = pipe([1, 2, 3], seed=0)
    assert imgs.shape == (3, 3, 16, 16) and imgs.min() >= 0 and imgs.max() <= 1
    # decode = de-standardise, tokens row-major, decoder, ImageNet de-normalisation, clamp
    z = pipe.latents(torch.tensor([1, 2, 3]), indexed_noise(range(3), SHAPE, 0))
    tokens = (z * torch.sqrt(var + 1e-5) + mean).flatten(2).transpose(1, 2)
    px = dec(tokens) * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor(
        [0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    torch.testing.assert_close(imgs, px.clamp(0, 1))
    out = pipe.generate([4, 5], seed=0)
    assert out["images"].dtype == np.uint8 and out["images"].shape == (2, 16, 16, 3)
    assert out["labels"].tolist() == [4, 5]
    assert image_grid(out["images"]).shape == (2 + 18, 2 + 2 * 18, 3)


def test_raev2_pipeline_end_to_end(nets):
    pipe = raev2_pipeline(nets["v2"], TinyDecoder(C, patch=2), stats=_stats(), num_steps=10,
                          latent_shape=SHAPE, num_classes=10, progress=False)
    z = pipe.latents(LABELS, _noise())
    want = raev2_reference_sample(nets["v2"], _noise(), LABELS, num_steps=10, ig_scale=1.78)
    torch.testing.assert_close(z, want, rtol=5e-5, atol=5e-5)
    assert pipe.decode(z).shape == (3, 3, 8, 8)


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_gfcg_pipeline(nets, space):
    base = rae_v1_pipeline(nets["main"], TinyDecoder(C, patch=4), stats=_stats(), num_points=5,
                           latent_shape=SHAPE, num_classes=10, progress=False)
    clf = TinyLatentClassifier(C, 10) if space == "latent" else TinyPixelClassifier(10)
    pipe = gfcg_pipeline(base, clf, space=space, w_max=2.0, kappa=5.0)
    imgs = pipe([0, 1, 2, 3], seed=1)
    assert imgs.shape == (4, 3, 16, 16) and torch.isfinite(imgs).all()


def test_pipeline_bad_arguments(nets):
    with pytest.raises(ValueError, match="'decoder_output'"):
        Pipeline(nets["main"], None, "rae", latent_shape=SHAPE, decoder_output="srgb")
    pipe = Pipeline(nets["main"], None, make_grid("rae", 4, latent_shape=SHAPE), latent_shape=SHAPE,
                    progress=False)
    with pytest.raises(ValueError, match="'decoder'"):
        pipe.decode(_noise())
    with pytest.raises(ValueError, match="'space'"):
        gfcg_pipeline(pipe, TinyLatentClassifier(C, 10), space="text")


# -- the CUDA-graph path's buffer chaining, on the CPU -------------------------------------------------------
@pytest.mark.parametrize("case", ["cfg_heun", "gfcg", "apg_momentum"])
def test_graph_path_chaining_matches_eager(nets, case):
    from raekern.sampling.sampler import _RerunGraphs

    grid = rae_v1_grid(7, latent_shape=SHAPE)
    if case == "cfg_heun":
        make = lambda: Sampler(nets["main"], G.CFG(1.5), grid, solver="heun", progress=False)  # noqa: E731
    elif case == "gfcg":
        make = lambda: Sampler(nets["main"], G.GFCG(TinyLatentClassifier(C, 10), w_max=2.0, kappa=3.0,  # noqa: E731
                                                    num_classes=10), grid, progress=False)
    else:
        make = lambda: Sampler(nets["main"], G.APG(2.0, eta=0.0, norm_threshold=5.0, momentum=-0.5,  # noqa: E731
                                                   num_classes=10), grid, progress=False)
    graphed = make()
    graphed.cuda_graph, graphed._graph_api = True, _RerunGraphs()
    for seed in (1, 2):  # the second call replays the captured steps with new noise
        want = make()(_noise(seed=seed), LABELS)
        got = graphed(_noise(seed=seed), LABELS)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert len(graphed._graphs) == 1
    if case == "gfcg":  # the graph path hands the callback the guided x0, as the eager path does
        seen = {}
        for name, s in (("eager", make()), ("graph", graphed)):
            s(_noise(), LABELS, callback=lambda k, t, x, x0, n=name: seen.setdefault(n, []).append(x0.clone()))
        for a, b in zip(seen["eager"], seen["graph"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_gfcg_skip_inactive_is_only_an_optimisation(nets, solver):
    """A Heun step that starts outside the interval and ends inside it needs the classifier's
    reference for its second stage, whether or not the first stage's branches are skipped."""
    clf = TinyLatentClassifier(C, 10)
    out = [Sampler(nets["main"], G.GFCG(clf, w_max=2.0, kappa=1.0, num_classes=10, interval=(0.0, 0.7)),
                   uniform_grid(6), solver=solver, skip_inactive=skip, progress=False)(_noise(), LABELS)
           for skip in (True, False)]
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-6)


def test_step_by_step_loop_equals_the_call(nets):
    """Callers driving the loop with step(): GFCG's reference needs the previous step's x0."""
    grid = uniform_grid(6, t_end=0.05)
    s = Sampler(nets["main"], G.GFCG(TinyLatentClassifier(C, 10), w_max=2.0, kappa=3.0, num_classes=10), grid,
                progress=False)
    want = s(_noise(), LABELS)
    x, x0, state = _noise(), None, {}
    for k in range(grid.num_steps):
        x, x0 = s.step(x, LABELS, k, state, x0, return_x0=True)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="'labels'"):
        Sampler(nets["main"], G.CFG(3.0, num_classes=10), grid, progress=False).step(_noise(), None, 0)


def test_decode_with_one_statistic(nets):
    mean, var = torch.randn(SHAPE), torch.rand(SHAPE) + 0.5
    z = torch.randn(2, *SHAPE)
    dec = TinyDecoder(C, patch=4)
    got = []
    for m, v in ((mean, None), (None, var), (mean, var)):
        p = Pipeline(nets["main"], None, uniform_grid(2), latent_shape=SHAPE, decoder=dec, latent_mean=m,
                     latent_var=v, decoder_output="unit", progress=False)
        got.append(p.decode(z))
    ones, zeros = torch.ones(SHAPE), torch.zeros(SHAPE)
    for (m, v), g in zip(((mean, ones - 1e-5), (zeros, var), (mean, var)), got):
        p = Pipeline(nets["main"], None, uniform_grid(2), latent_shape=SHAPE, decoder=dec, latent_mean=m,
                     latent_var=v, decoder_output="unit", progress=False)
        torch.testing.assert_close(g, p.decode(z), rtol=1e-5, atol=1e-5)


def test_interval_boundary_is_decided_in_float32_like_the_release(nets):
    """The released samplers compare a float32 t with Python-float bounds, i.e. in float32: the RAEv2
    grid point float32(0.8) > 0.8 is inside (0, 0.8) there, and float32(0.7) < 0.7 inside (0.7, 1)."""
    grid = raev2_grid(10, 1.0, latent_shape=SHAPE)
    assert grid.times()[2] == float(np.float32(0.8)) > 0.8 and grid.times()[3] == float(np.float32(0.7)) < 0.7
    main0 = lambda x, t, y: nets["v2"](x, t, y)[0]  # noqa: E731
    for iv in ((0.0, 0.8), (0.7, 1.0)):
        want = raev2_reference_sample(nets["v2"], _noise(), LABELS, num_steps=10, alpha=1.0, cfg_scale=3.0,
                                      cfg_interval=iv)
        for skip in (True, False):  # the sampler's skipping decides as the policy's mask does
            got = sample(main0, _noise(), LABELS, G.CFG(3.0, interval=iv), grid, param="x0", x0_t_eps=0.05,
                         progress=False, skip_inactive=skip)
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # one rule for floats, float32 and float64 tensors
    t32 = torch.tensor([0.8, 0.7], dtype=torch.float32)
    for t in (t32, t32.double()):
        assert G.in_interval(t, (0.0, 0.8)).tolist() == [True, True]
        assert G.in_interval(t, (0.7, 1.0)).tolist() == [True, True]
    assert G.in_interval(float(t32[0]), (0.0, 0.8)) and G.in_interval(float(t32[1]), (0.7, 1.0))
    assert not G.in_interval(0.8000001, (0.0, 0.8)) and G.in_interval(0.5, (0.5, 0.5))
    x = torch.zeros(2, *SHAPE)
    assert G.CFG(2.0, interval=(0.7, 0.8)).mask(x, t32.double()).tolist() == [1.0, 1.0]
    assert G.CFG(2.0, interval=(0.7, 0.8)).mask(x, float(t32[0])) is None  # active: no mask to apply
    assert G.CFG(2.0, interval=(0.7, 0.8)).mask(x, 0.9).tolist() == [0.0, 0.0]


def test_inactive_interval_skips_the_unneeded_branches(nets):
    grid = rae_v1_grid(12, latent_shape=SHAPE)
    ts = grid.times()[:-1]
    inside = [0.2 <= t <= 0.7 for t in ts]
    main, weak = Counting(nets["main"]), Counting(nets["weak"])
    sample(main, _noise(), LABELS, G.CFG(2.0, interval=(0.2, 0.7)), grid, progress=False)
    assert main.calls == [6 if on else 3 for on in inside]
    main.calls.clear()
    sample(main, _noise(), LABELS, G.AutoGuidance(1.5, interval=(0.2, 0.7)), grid, models={"weak": weak},
           progress=False)
    assert main.calls == [3] * len(ts) and len(weak.calls) == sum(inside)
    want = rae_v1_reference_sample(nets["main"], _noise(), LABELS, num_steps=12, cfg_scale=1.5,
                                   method="autoguidance", weak_model=nets["weak"], interval=(0.2, 0.7))
    got = sample(nets["main"], _noise(), LABELS, G.AutoGuidance(1.5, interval=(0.2, 0.7)), grid,
                 models={"weak": nets["weak"]}, progress=False)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # GFCG + CFG with an interval, and rescale around CFG: same result with and without skipping
    for policy in (lambda: G.GFCG(TinyLatentClassifier(C, 10), w_max=2.0, kappa=3.0, mode="cfg3", cfg_scale=1.5,
                                  interval=(0.2, 0.7), num_classes=10),
                   lambda: G.GuidanceRescale(G.CFG(2.0, interval=(0.2, 0.7)), 0.7)):
        a = sample(nets["main"], _noise(), LABELS, policy(), grid, progress=False)
        b = sample(nets["main"], _noise(), LABELS, policy(), grid, progress=False, skip_inactive=False)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
