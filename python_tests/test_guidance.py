"""raekern.ops.guidance_step / gfcg_select against their plain-PyTorch references."""
import inspect
import math

import pytest
import torch

from raekern.ops.guidance import (gfcg_select, gfcg_select_reference, guidance_step,
                                  guidance_step_reference)

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}


def _t(B, dtype=torch.float64, lo=0.15, hi=0.95):
    return torch.linspace(hi, lo, B, dtype=dtype) if B > 1 else torch.tensor([0.6], dtype=dtype)


def _inputs(B, S, dtype, K=2, momentum_J=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *S, generator=g, dtype=torch.float64)
    P = [torch.randn(B, *S, generator=g, dtype=torch.float64) for _ in range(K)]
    extra = dict(
        x_prev=torch.randn(B, *S, generator=g, dtype=torch.float64).to(dtype),
        u_prev=torch.randn(B, *S, generator=g, dtype=torch.float64).to(dtype),
    )
    mom = None
    if momentum_J:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        mom = torch.randn(momentum_J, B, *S, generator=g, dtype=torch.float64).to(acc)
    return x.to(dtype), [p.to(dtype) for p in P], extra, mom


def _configs(B):
    t = _t(B)
    mask2 = torch.ones(B, 2)
    mask2[0, 1] = 0
    return {
        "cfg": dict(terms=[(0, 1)], weights=[1.5], base=0),
        "cfg_euler_x0": dict(terms=[(0, 1)], weights=[0.5], base=0, solver="euler", t_next=t - 0.1, return_x0=True),
        "per_sample_mask": dict(terms=[(0, 1)], weights=[torch.linspace(0.5, 3.0, B)], base=0,
                                mask=(torch.arange(B) % 2 == 0).float()),
        "three_branch": dict(terms=[(0, 1), (0, 2)], weights=torch.rand(B, 2, dtype=torch.float64) * 2, base=0,
                             mask=mask2, param=["velocity", "x0", "eps"], out_param="eps", K=3),
        "zero_star": dict(terms=[(0, 1)], weights=[2.0], base=0, zero_star=True, stats_space="velocity",
                          zero_init=(torch.arange(B) == B - 1)),
        "zero_star_comfy": dict(terms=[(0, 1)], weights=[2.0], base=0, zero_star="x0", stats_space="velocity",
                                out_param="x0"),
        "apg": dict(terms=[(0, 1)], weights=[3.0], base=0, apg_eta=0.0, apg_norm_threshold=4.0, apg_beta=-0.5,
                    J_m=1),
        "apg_eta_eps": dict(terms=[(0, 1)], weights=[3.0], base=0, apg_eta=0.3, stats_space="eps",
                            solver="euler", t_next=t - 0.05),
        "rescale": dict(terms=[(0, 1)], weights=[4.0], base=0, rescale_phi=0.7, rescale_space="x0"),
        "x0_branches_rescale_v": dict(terms=[(0, 1)], weights=[0.78], base=0, param="x0", rescale_phi=0.5,
                                      rescale_space="velocity", solver="euler", t_next=t - 0.1),
        "heun2": dict(terms=[(0, 1)], weights=[1.0], base=1, solver="heun2", t_next=t + 0.1, heun=True),
    }


def _run(fn, x, P, extra, mom, cfg, stacked=False):
    cfg = dict(cfg)
    cfg.pop("K", None)
    cfg.pop("J_m", None)
    if cfg.pop("heun", False):
        cfg.update(extra)
    if mom is not None:
        cfg["momentum"] = mom
    branches = torch.cat(P) if stacked else P
    return fn(x, branches, _t(x.shape[0]).to(torch.float64), **cfg)


def _close(a, b, dtype):
    rtol, atol = TOL[dtype]
    scale = max(1.0, b.detach().double().abs().max().item())
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale)


CASES = list(_configs(3).keys())


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_reference(name, dtype):
    B, S = 3, (4, 5, 7)  # 140 elements per sample, not a multiple of 8
    cfg = _configs(B)[name]
    x, P, extra, mom = _inputs(B, S, dtype, K=cfg.get("K", 2), momentum_J=cfg.get("J_m", 0))
    got = _run(guidance_step, x, P, extra, mom, cfg)
    want = _run(guidance_step_reference, x, P, extra, mom, cfg)
    assert got.out.dtype == dtype and got.out.shape == x.shape
    _close(got.out, want.out, dtype)
    if want.x0 is not None:
        _close(got.x0, want.x0, dtype)
    if want.momentum is not None:
        _close(got.momentum, want.momentum, dtype)


@pytest.mark.parametrize("shape", [(1, 257), (2, 268, 3), (5, 1), (4, 3, 16, 16)])
@pytest.mark.parametrize("name", ["cfg_euler_x0", "apg", "rescale"])
def test_odd_sizes(shape, name):
    B, S = shape[0], shape[1:]
    cfg = _configs(B)[name]
    x, P, extra, mom = _inputs(B, S, torch.float32, momentum_J=cfg.get("J_m", 0))
    got = _run(guidance_step, x, P, extra, mom, cfg)
    want = _run(guidance_step_reference, x, P, extra, mom, cfg)
    _close(got.out, want.out, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["cfg_euler_x0", "zero_star", "apg"])
def test_large_outputs(name, dtype):
    # > 4 MiB of output: the CPU kernel switches to non-temporal stores (sample 0, 64-byte aligned)
    # and keeps ordinary stores where a row is misaligned (sample 1: N is odd).
    B, S = 2, (1_050_011,)
    cfg = _configs(B)[name]
    x, P, extra, mom = _inputs(B, S, dtype, momentum_J=cfg.get("J_m", 0))
    got = _run(guidance_step, x, P, extra, mom, cfg)
    want = _run(guidance_step_reference, x, P, extra, mom, cfg)
    _close(got.out, want.out, dtype)
    if want.x0 is not None:
        _close(got.x0, want.x0, dtype)
    if want.momentum is not None:
        _close(got.momentum, want.momentum, dtype)


@pytest.mark.parametrize("name", ["zero_star", "apg", "rescale"])
@pytest.mark.parametrize("B, N", [(5, 131_072), (4, 40_000), (3, 300_000), (2, 300_000)])
def test_statistics_schedules(name, B, N):
    # Two threads: B = 4 and B = 2 share out evenly (per-sample schedule); B = 5 samples of 1 MiB of
    # statistics input go in groups of two (2, 2, 1), each split between both threads; B = 3 samples
    # larger than one core's L2 budget are split one at a time.
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = _configs(B)[name]
        x, P, extra, mom = _inputs(B, (N,), torch.float32, momentum_J=cfg.get("J_m", 0))
        got = _run(guidance_step, x, P, extra, mom, cfg)
        want = _run(guidance_step_reference, x, P, extra, mom, cfg)
        _close(got.out, want.out, torch.float32)
        torch.set_num_threads(1)  # same chunk order of the statistics, one thread: bit-identical
        one = _run(guidance_step, x, P, extra, mom, cfg)
        assert torch.equal(got.out, one.out)
    finally:
        torch.set_num_threads(prev)


def _bf16_bits_rne(f32):
    # c10's fp32 -> bf16 rounding (nearest even) on the bit pattern, for finite values
    u = f32.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(torch.int32)


def test_bf16_rounding_of_denormals_and_specials():
    # The bf16 output path converts 16 lanes at once: a block with a denormal, a NaN or an infinity must
    # round exactly as c10 does (denormals rounded, not flushed), and so must the blocks around it.
    B, N = 2, 64
    g = torch.Generator().manual_seed(3)
    C = (torch.randn(B, N, generator=g) * 1e-38).to(torch.bfloat16)
    U = (torch.randn(B, N, generator=g) * 1e-38).to(torch.bfloat16)
    C[:, 32:48] = torch.randn(B, 16, generator=g).to(torch.bfloat16)  # a block of normal values
    U[:, 32:48] = torch.randn(B, 16, generator=g).to(torch.bfloat16)
    C[0, 5], C[0, 20], C[1, 60] = float("nan"), float("inf"), -float("inf")
    U[1, 60] = 0.0
    x = torch.zeros(B, N, dtype=torch.bfloat16)
    kw = dict(terms=[(0, 1)], weights=[0.37], base=0)
    got = guidance_step(x, [C, U], 0.5, **kw).out
    f32 = guidance_step(x.float(), [C.float(), U.float()], 0.5, **kw).out  # same fp32 arithmetic
    assert (f32.abs() < 1.1754944e-38).sum() > 50  # the case exercises fp32 denormals
    nan = torch.isnan(f32)
    assert torch.equal(torch.isnan(got), nan)
    bits = got.view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(bits[~nan], _bf16_bits_rne(f32)[~nan])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_in", [1, 3, 8])
def test_combine(dtype, n_in):
    # guidance_combine (the backward's kernel): up to six inputs with a non-zero coefficient take the
    # register-blocked kernel, more the buffered path; a zero coefficient skips its input (a NaN there
    # stays out), a sample with no input left is zero.
    B, N = 4, 1000
    g = torch.Generator().manual_seed(n_in)
    ins = [torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype) for _ in range(n_in)]
    c = torch.randn(B, n_in, generator=g, dtype=torch.float64)
    c[1, n_in - 1] = 0.0
    ins[n_in - 1][1, 7] = float("nan")
    c[2] = 0.0
    ins[0][2, 3] = float("nan")
    got = torch.ops.raekern.guidance_combine(ins, c)
    want = sum(c[:, e].view(B, 1) * torch.nan_to_num(ins[e].double(), nan=0.0) for e in range(n_in))
    assert got.dtype == dtype and not torch.isnan(got).any()
    _close(got, want, dtype)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


def test_combine_large_output():
    # > 4 MiB of output: non-temporal stores on aligned rows, ordinary ones on the odd-sized sample.
    B, N = 2, 700_001
    ins = [torch.randn(B, N) for _ in range(2)]
    c = torch.tensor([[0.5, -2.0], [1.25, 3.0]], dtype=torch.float64)
    got = torch.ops.raekern.guidance_combine(ins, c)
    want = sum(c[:, e].view(B, 1) * ins[e].double() for e in range(2))
    _close(got, want, torch.float32)


@pytest.mark.parametrize("name", ["cfg_euler_x0", "zero_star", "apg"])
def test_stacked_branches_and_layouts(name):
    B, S = 4, (6, 9)
    cfg = _configs(B)[name]
    x, P, extra, mom = _inputs(B, S, torch.float32, momentum_J=cfg.get("J_m", 0))
    want = _run(guidance_step_reference, x, P, extra, mom, cfg)
    # one [K*B] tensor, as a batched network call returns it
    got = _run(guidance_step, x, P, extra, mom, cfg, stacked=True)
    _close(got.out, want.out, torch.float32)
    # non-contiguous views (inner dims strided) and a transposed layout
    xs = torch.empty(B, S[0], 2 * S[1])[..., ::2].copy_(x)
    Ps = [p.t().contiguous().t() if p.dim() == 2 else p.transpose(1, 2).contiguous().transpose(1, 2) for p in P]
    got = _run(guidance_step, xs, Ps, extra, mom, cfg)
    _close(got.out, want.out, torch.float32)
    # a stacked tensor that is itself a strided view
    big = torch.empty(2 * B, S[0], S[1] + 3)
    big[..., : S[1]] = torch.cat(P)
    got = _run(guidance_step, x, P, extra, mom, cfg) if False else _run(
        guidance_step, x, [big[:B, :, : S[1]], big[B:, :, : S[1]]], extra, mom, cfg)
    _close(got.out, want.out, torch.float32)


def test_stride0_expand():
    B, S = 5, (3, 11)
    x1, P1, _, _ = _inputs(1, S, torch.float32)
    x = x1.expand(B, *S)
    P = [p.expand(B, *S) for p in P1]
    cfg = dict(terms=[(0, 1)], weights=[2.0], base=0, zero_star=True, stats_space="velocity", solver="euler",
               t_next=0.3)
    got = guidance_step(x, P, 0.5, **cfg)
    want = guidance_step_reference(x.contiguous(), [p.contiguous() for p in P], 0.5, **cfg)
    _close(got.out, want.out, torch.float32)


def test_mixed_t_within_batch():
    B, S = 6, (8, 5)
    x, P, _, _ = _inputs(B, S, torch.float32)
    t = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1, 0.05], dtype=torch.float32)
    cfg = dict(terms=[(0, 1)], weights=[3.0], base=0, param="x0", apg_eta=0.0, apg_norm_threshold=2.0,
               solver="euler", t_next=t * 0.9, return_x0=True)
    got = guidance_step(x, P, t, **cfg)
    want = guidance_step_reference(x, P, t, **cfg)
    _close(got.out, want.out, torch.float32)
    # each sample equals the same call made with its own scalar t
    for b in range(B):
        one = guidance_step(x[b:b + 1], [p[b:b + 1] for p in P], float(t[b]), **{**cfg, "t_next": float(t[b] * 0.9)})
        _close(got.out[b:b + 1], one.out, torch.float32)


@pytest.mark.parametrize("space,t", [("velocity", 0.0), ("x0", 0.0), ("eps", 1.0), ("velocity", 1.0)])
@pytest.mark.parametrize("stats_space", ["x0", "eps", "velocity"])
def test_affine_rules_where_a_space_is_singular(space, t, stats_space):
    """CFG is affine, so it is the same in every space: at t = 0 (where x0 = x_t and B_x0 = 0) and
    t = 1 (B_eps = 0) it must not pass through a stats space whose conversion divides by zero."""
    x, (C, U), _, _ = _inputs(3, (4, 5), torch.float64)
    kw = dict(param=space, out_param=space, stats_space=stats_space, terms=[(0, 1)], weights=[1.5], base=1,
              return_x0=space != "eps" or t != 1.0)
    want = U + 1.5 * (C - U)
    for fn in (guidance_step, guidance_step_reference):
        got = fn(x, [C, U], torch.full((3,), t, dtype=torch.float64), **kw)
        torch.testing.assert_close(got.out, want, rtol=1e-12, atol=1e-12)
    # per-sample t with one finished sample (t = 0) beside running ones
    tt = torch.tensor([0.0, 0.5, 0.9], dtype=torch.float64)
    got = guidance_step(x, [C, U], tt, terms=[(0, 1)], weights=[1.5], base=1)
    assert torch.isfinite(got.out).all()
    torch.testing.assert_close(got.out, want, rtol=1e-12, atol=1e-12)


def test_apg_in_its_own_space_at_t0():
    """x0 branches with APG statistics in x0 space at t = 0: the displacement stays in one space
    (no 0/0 from B_x0 / B_x0)."""
    x, P, _, _ = _inputs(2, (6, 5), torch.float64)
    kw = dict(param="x0", out_param="x0", stats_space="x0", terms=[(0, 1)], weights=[2.0], base=0,
              apg_eta=0.0, apg_norm_threshold=1.0)
    got = guidance_step(x, P, 0.0, **kw)
    want = guidance_step_reference(x, P, 0.0, **kw)
    assert torch.isfinite(got.out).all()
    torch.testing.assert_close(got.out, want.out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["apg", "zero_star", "rescale"])
def test_nearly_equal_branches_precision(name):
    """C = U + 1e-4·δ: the statistics of C − U must keep fp32 precision (differences are formed
    before squaring), so fp32 matches an fp64 reference on the guidance part G − C."""
    B, S = 3, (16, 64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, *S, generator=g, dtype=torch.float64)
    U = torch.randn(B, *S, generator=g, dtype=torch.float64) * 10
    C = U + 1e-4 * torch.randn(B, *S, generator=g, dtype=torch.float64)
    cfg = dict(_configs(B)[name])
    cfg.pop("J_m", None)
    mom = torch.zeros(1, B, *S) if name == "apg" else None
    if mom is not None:
        cfg["momentum"] = mom
        cfg["apg_norm_threshold"] = 1e-3
    want = guidance_step_reference(x, [C, U], _t(B), **{**cfg, "momentum": None if mom is None else mom.double()})
    got = guidance_step(x.float(), [C.float(), U.float()], _t(B), **cfg)
    dw = want.out - C
    dg = got.out.double() - C.float().double()
    err = (dg - dw).abs().max().item() / dw.abs().max().item()
    # the output itself is rounded to fp32 (|C|·6e-8 ≈ 2e-6 absolute vs a guidance part of ~1e-4)
    assert err < 0.05, err


def test_opcheck():
    B, S = 2, (3, 7)
    x, P, extra, mom = _inputs(B, S, torch.float32, momentum_J=1)
    t = _t(B)
    op = torch.ops.raekern.guidance_step.default
    nan = math.nan
    w = torch.full((B, 1), 2.0, dtype=torch.float64)
    lin = (x, P, t, t - 0.1, w, None, None, None, None, [0, 0], 0, [0], [1], [1], [-1], [0.0], [0.0], [nan],
           0.0, 1, 0, 0, 1, True)
    stats = (x, [torch.cat(P)], t, None, w, torch.tensor([True, False]), mom, None, None, [0, 0], 0, [0], [1],
             [1], [0], [-0.5], [3.0], [0.0], 0.7, 1, 0, 0, 0, False)
    heun = (x, P, t, t + 0.1, w, None, None, extra["x_prev"], extra["u_prev"], [1, 1], 1, [0], [1], [1], [-1],
            [0.0], [0.0], [nan], 0.0, 1, 0, 0, 2, False)
    for args in (lin, stats, heun):
        torch.library.opcheck(op, args)
    gw = torch.tensor([[1.0, 0.5], [0.0, 2.0]], dtype=torch.float64)
    torch.library.opcheck(torch.ops.raekern.guidance_combine.default, ([x, P[0]], gw))
    logits = torch.randn(4, 10)
    torch.library.opcheck(torch.ops.raekern.gfcg_select.default, (logits, torch.tensor([0, 3, 9, 2]), 2.0, 5.0, 0.0))


def test_gradcheck_linear():
    B, S = 2, (3, 4)
    x, P, extra, mom = _inputs(B, S, torch.float64, K=3, momentum_J=2)
    xs = [x, *P, mom, extra["x_prev"], extra["u_prev"]]
    for v in xs:
        v.requires_grad_(True)

    def f_euler(x, p0, p1, p2, m, xp, up):
        r = guidance_step(x, [p0, p1, p2], _t(B), param=["velocity", "x0", "eps"], terms=[(0, 1), (2, 1)],
                          weights=[torch.tensor([1.5, 0.5], dtype=torch.float64), 2.0], base=0, apg_beta=0.3,
                          momentum=m, solver="euler", t_next=_t(B) - 0.1, return_x0=True)
        return r.out, r.x0, r.momentum

    def f_heun_stacked(x, p0, p1, p2, m, xp, up):
        r = guidance_step(x, torch.cat([p0, p1]), _t(B), param="x0", terms=[(0, 1)], weights=[2.0], base=1,
                          solver="heun2", t_next=_t(B) + 0.1, x_prev=xp, u_prev=up)
        return r.out

    assert torch.autograd.gradcheck(f_euler, xs)
    assert torch.autograd.gradcheck(f_heun_stacked, xs)


def test_backward_raises_for_statistics():
    B, S = 2, (3, 4)
    x, P, _, _ = _inputs(B, S, torch.float64)
    P[0].requires_grad_(True)
    r = guidance_step(x, P, 0.5, terms=[(0, 1)], weights=[2.0], base=0, rescale_phi=0.7)
    with pytest.raises(RuntimeError, match="not differentiable"):
        r.out.sum().backward()


def test_torch_compile_fullgraph():
    B, S = 2, (4, 6)
    x, P, _, mom = _inputs(B, S, torch.float32, momentum_J=1)
    t = torch.tensor([0.7, 0.4])

    def f(x, C, U, t, m):
        r = guidance_step(x, [C, U], t, terms=[(0, 1)], weights=[2.0], base=0, apg_eta=0.0, apg_beta=-0.5,
                          apg_norm_threshold=3.0, momentum=m, solver="euler", t_next=t - 0.1, return_x0=True)
        return r.out, r.x0, r.momentum

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = cf(x, P[0], P[1], t, mom)
    want = f(x, P[0], P[1], t, mom)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("stat", [dict(rescale_phi=0.7), dict(zero_star=True), dict(apg_norm_threshold=1.0),
                                  dict(apg_eta=0.0)], ids=["rescale", "zero_star", "apg_r", "apg_eta"])
@pytest.mark.parametrize("shape", [(2, 0, 8), (3, 0), (0, 4)])
def test_empty_samples_with_statistics(stat, shape):
    # Statistics over nothing are 0 (the solve used to read them through a null pointer and crash).
    x = torch.randn(shape)
    kw = dict(terms=[(0, 1)], weights=[1.5], base=0, **stat)
    for fn in (guidance_step, guidance_step_reference):
        assert fn(x, [x, 2 * x], 0.5, **kw).out.shape == x.shape


def test_torch_compile_dynamic_shapes_and_floats():
    # dynamic=True makes the float arguments symbolic: the argument checks must still trace.
    def f(x, C, U):
        return guidance_step(x, [C, U], 0.3, terms=[(0, 1)], weights=[1.5], base=0, rescale_phi=0.5).out

    def g(logits, target):
        return gfcg_select(logits, target, w_max=3.0, kappa=2.0)[1]

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    cg = torch.compile(g, fullgraph=True, dynamic=True, backend="aot_eager")
    for B in (3, 5):
        x, (C, U), _, _ = _inputs(B, (2, 7), torch.float32)
        torch.testing.assert_close(cf(x, C, U), f(x, C, U))
        logits, target = torch.randn(B, 10), torch.arange(B) % 10
        torch.testing.assert_close(cg(logits, target), g(logits, target))


def _base_kwargs():
    return dict(terms=[(0, 1)], weights=[2.0], base=0)


@pytest.mark.parametrize("bad, exc, arg", [
    (dict(weights=[1.0, 2.0]), ValueError, "weights"),
    (dict(weights=torch.ones(5, 1)), ValueError, "weights"),
    (dict(param="v-pred"), ValueError, "param"),
    (dict(param=["velocity"] * 3), ValueError, "param"),
    (dict(terms=[(0, 2)]), ValueError, "terms"),
    (dict(base=2), ValueError, "base"),
    (dict(momentum=torch.zeros(2, 3, 4, 5), apg_beta=0.5), ValueError, "momentum"),
    (dict(momentum=torch.zeros(1, 3, 4, 5, dtype=torch.float64), apg_beta=0.5), TypeError, "momentum"),
    (dict(solver="rk4"), ValueError, "solver"),
    (dict(solver="euler"), ValueError, "t_next"),
    (dict(solver="heun2", t_next=0.6), ValueError, "x_prev"),
    (dict(mask=torch.ones(4)), ValueError, "mask"),
    (dict(stats_space="score"), ValueError, "stats_space"),
    (dict(zero_star="lipman"), ValueError, "zero_star"),
    (dict(apg_norm_threshold=-1.0), ValueError, "apg_norm_threshold"),
    (dict(out_param="sigma"), ValueError, "out_param"),
    (dict(rescale_ref=5, rescale_phi=0.5), ValueError, "rescale_ref"),
])
def test_bad_arguments(bad, exc, arg):
    x = torch.randn(3, 4, 5)
    P = [torch.randn(3, 4, 5), torch.randn(3, 4, 5)]
    with pytest.raises(exc, match=f"'{arg}'"):
        guidance_step(x, P, 0.5, **{**_base_kwargs(), **bad})


def test_bad_branches():
    x = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="'branches'"):
        guidance_step(x, torch.randn(7, 4, 5), 0.5, **_base_kwargs())
    with pytest.raises(ValueError, match="'branches'"):
        guidance_step(x, [torch.randn(3, 4, 5), torch.randn(3, 4, 6)], 0.5, **_base_kwargs())
    with pytest.raises(TypeError, match="'branches'"):
        guidance_step(x, [torch.randn(3, 4, 5), torch.randn(3, 4, 5, dtype=torch.float64)], 0.5, **_base_kwargs())
    # three stacked branches but a two-entry param list
    with pytest.raises(ValueError, match="'param'"):
        guidance_step(x, torch.randn(9, 4, 5), 0.5, param=["x0", "x0"], **_base_kwargs())
    with pytest.raises(ValueError, match="'t'"):
        guidance_step(x, [x, x], torch.ones(4), **_base_kwargs())
    with pytest.raises(ValueError, match="'t'"):
        guidance_step(x, [x, x], float("nan"), **_base_kwargs())


@pytest.mark.parametrize("param", [["eps", "velocity"], ["x0", "velocity"], ["velocity", "x0"]])
@pytest.mark.parametrize("stat", [dict(rescale_phi=0.7, rescale_space="velocity", rescale_ref=1),
                                  dict(zero_star=True, stats_space="velocity"),
                                  dict(apg_eta=0.3, stats_space="velocity"),
                                  dict(apg_norm_threshold=0.5, stats_space="velocity")])
def test_mixed_parameterisations_with_velocity_statistics(param, stat):
    """Mixed parameterisations work in velocity space, but an x0/ε branch converted to velocity
    carries x: the statistics must read x even when every statistic is taken in velocity space."""
    g = torch.Generator().manual_seed(5)
    x, a, b = (torch.randn(3, 37, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.4, 0.7, 0.2], dtype=torch.float64)
    kw = dict(param=param, terms=[(0, 1)], weights=[0.5], base=0, **stat)
    got = guidance_step(x, [a, b], t, **kw).out
    _close(got, guidance_step_reference(x, [a, b], t, **kw).out, torch.float64)


def test_float_zero_init_is_a_truth_mask():
    x, c, u = (torch.randn(2, 8) for _ in range(3))
    kw = dict(terms=[(0, 1)], weights=[1.5], base=0, zero_init=torch.tensor([0.5, 0.0]))
    got = guidance_step(x, [c, u], 0.5, **kw).out
    assert torch.equal(got[0], torch.zeros(8))
    _close(got, guidance_step_reference(x, [c, u], 0.5, **kw).out, torch.float32)


def test_autocast_promotes_mixed_branches():
    """A bf16 network output (stacked or a list) beside the fp32 sampler state under autocast: the
    step runs in fp32 as eager math would; outside autocast the mismatch stays an error."""
    x = torch.randn(3, 4, 5)
    P = [torch.randn(3, 4, 5).bfloat16() for _ in range(2)]
    kw = _base_kwargs()
    with pytest.raises(TypeError, match="'branches'"):
        guidance_step(x, P, 0.5, **kw)
    want = guidance_step_reference(x, [p.float() for p in P], 0.5, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_list = guidance_step(x, P, 0.5, **kw)
        got_stacked = guidance_step(x, torch.cat(P), 0.5, **kw)
    for got in (got_list, got_stacked):
        assert got.out.dtype == torch.float32
        _close(got.out, want.out, torch.float32)


# ---------------------------------------------------------------------------------------------
# gfcg_select


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, C", [(1, 2), (7, 10), (33, 1000)])
def test_gfcg_select(dtype, B, C):
    g = torch.Generator().manual_seed(B * C)
    logits = (torch.randn(B, C, generator=g) * 3).to(dtype)
    target = torch.randint(0, C, (B,), generator=g)
    got = gfcg_select(logits, target, w_max=3.0, kappa=4.0, w_min=0.1)
    want = gfcg_select_reference(logits, target, w_max=3.0, kappa=4.0, w_min=0.1)
    assert torch.equal(got[0], want[0])
    assert not torch.any(got[0] == target)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(got[1].min()) >= 0.1 and float(got[1].max()) <= 3.0


def test_gfcg_select_target_is_top_and_ties():
    logits = torch.tensor([[5.0, 1.0, 1.0, 0.0], [0.0, 3.0, 3.0, 3.0]])
    ref, w, pt, pr = gfcg_select(logits, torch.tensor([0, 2]), w_max=2.0, kappa=1.0)
    assert ref.tolist() == [1, 1]  # most probable non-target class, lowest index on ties
    assert abs(float(w[1]) - 2.0) < 1e-6  # p_target == p_ref -> w_max


def _nonfinite_logits():
    nan, inf = float("nan"), float("inf")
    rows = [[1, nan, nan, 0], [nan, 1, 5, 0], [5, 1, nan, 9], [1, inf, 3, 0], [-inf] * 4, [0, 0, -inf, 2],
            [1, 2, 3, 4]]
    return torch.tensor(rows), torch.tensor([0, 0, 0, 0, 1, 3, 2])


def test_gfcg_select_nonfinite_rows_follow_the_reference():
    """A row whose probabilities are undefined (NaN logit, largest logit ±inf) keeps the first non-target
    class, as the reference's argmax over NaN probabilities; finite rows are unaffected."""
    logits, target = _nonfinite_logits()
    got = gfcg_select(logits, target, w_max=2.0, kappa=1.0)
    want = gfcg_select_reference(logits, target, w_max=2.0, kappa=1.0)
    assert got[0].tolist() == want[0].tolist() == [1, 1, 1, 1, 0, 0, 3]
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("kw, arg", [
    (dict(logits=torch.randn(4)), "logits"),
    (dict(logits=torch.randn(4, 1)), "logits"),
    (dict(target=torch.zeros(3, dtype=torch.long)), "target"),
    (dict(target=torch.zeros(4)), "target"),
    (dict(target=torch.full((4,), 10)), "target"),
    (dict(w_min=5.0), "w_min"),
])
def test_gfcg_select_bad(kw, arg):
    args = dict(logits=torch.randn(4, 10), target=torch.zeros(4, dtype=torch.long))
    args.update({k: v for k, v in kw.items() if k in args})
    extra = {k: v for k, v in kw.items() if k not in args}
    with pytest.raises((ValueError, TypeError), match=f"'{arg}'"):
        gfcg_select(args["logits"], args["target"], w_max=2.0, kappa=1.0, **extra)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels (guidance_step_kernel.cuh, gfcg_select_kernel.cuh) run on the host emulation
# (torch.ops.raekern_emu, docs/emu.md) with the launch plan of guidance_launch.h. One host fiber per
# CUDA thread: small shapes. 140 elements per sample takes the scalar path, 128 the vector path.

from _kernels import kernel_fixture  # noqa: E402
from raekern._utils.library import emulation_library  # noqa: E402
def _t_variants(B):
    """Per-sample scalars as callers pass them: fp32/fp64, strided, expanded, another dtype, a float."""
    base = _t(B)
    wide = torch.stack([base, base], dim=1).to(torch.float32)  # column 0: a stride-2 view
    return {"fp64": base, "fp32": base.float(), "fp32_strided": wide[:, 0],
            "expanded": torch.tensor([0.6]).expand(B), "bf16": base.bfloat16(), "float": 0.6}


@pytest.mark.parametrize("variant", list(_t_variants(3)))
def test_per_sample_scalars_any_float_layout(variant):
    """t, t_next and the weights are read where they lie (fp64/fp32, any stride, a scalar for every
    sample); other dtypes are converted. Every form gives the fp64 reference's result."""
    B, S = 3, (4, 5)
    x, P, _, _ = _inputs(B, S, torch.float32)
    t = _t_variants(B)[variant]
    t64 = t.double() if isinstance(t, torch.Tensor) else t
    tn = t * 0.9 if isinstance(t, torch.Tensor) else 0.54
    tn64 = tn.double() if isinstance(t, torch.Tensor) else tn
    w = torch.tensor([[3.0, 0.5, 1.0], [1.5, 2.0, 0.25]], dtype=torch.float32).t()  # [B, J], transposed strides
    cfg = dict(terms=[(0, 1), (1, 0)], base=0, rescale_phi=0.5, solver="euler", return_x0=True)
    for weights in (w, w[:1].expand(B, 2)):  # (the second: one row for every sample, stride 0)
        got = guidance_step(x, P, t, weights=weights, t_next=tn, **cfg)
        want = guidance_step_reference(x.double(), [p.double() for p in P], t64, weights=weights.double(),
                                       t_next=tn64, **cfg)
        _close(got.out, want.out, torch.float32)
        _close(got.x0, want.x0, torch.float32)


@pytest.mark.parametrize("t_form", ["fp32", "float"])
def test_step_adds_no_conversion_or_fill_ops(t_form):
    """With fp32 t/t_next tensors (or floats) and float weights, a step runs the guidance op and
    nothing else that moves data (no cast, fill, stack or copy: on a GPU each would be one more kernel
    of the step); constant tensors are built once and reused."""
    B, S = 4, (3, 8)
    x, P, _, _ = _inputs(B, S, torch.float32)
    t = _t(B).float() if t_form == "fp32" else 0.7
    cfg = dict(terms=[(0, 1), (1, 0)], weights=[2.5, 0.5], base=0, solver="euler", t_next=t - 0.05)
    first = guidance_step(x, P, t, **cfg)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        again = guidance_step(x, P, t, **cfg)
    names = {e.name for e in prof.events()}
    moving = {n for n in names if n.split("::")[-1] in
              {"_to_copy", "to", "copy_", "fill_", "full", "stack", "cat", "clone", "contiguous", "mul", "zeros"}}
    assert not moving, f"extra data-moving ops per step: {sorted(moving)}"
    assert torch.equal(first.out, again.out)
    other = guidance_step(x, P, t, **{**cfg, "weights": [3.0, 1.0]})  # other constants: their own tensor
    _close(other.out, guidance_step_reference(x, P, t, **{**cfg, "weights": [3.0, 1.0]}).out, torch.float32)


from raekern.ops.guidance import GuidanceOutput, _normalize  # noqa: E402

_emu = emulation_library()
EMU_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


_STEP_DEFAULTS = {k: v.default for k, v in inspect.signature(guidance_step).parameters.items()
                  if v.kind == v.KEYWORD_ONLY and v.default is not inspect.Parameter.empty}


kern = kernel_fixture(_emu, "guidance_step")  # each kernel test runs on the emulation and, where there is one, on the GPU


def _kernel_step(kern):
    """guidance_step's argument handling, then the CUDA op (emulated, or on the GPU)."""
    def step(x, branches, t, **kw):
        a = _normalize(x, branches, t, **{**_STEP_DEFAULTS, **kw})
        out, x0, mom, _ = kern.guidance_step(*a)
        return GuidanceOutput(out, x0 if a.return_x0 else None, mom if a.momentum is not None else None)
    return step


def _emu_close(a, b, dtype):
    rtol, atol = EMU_TOL[dtype]
    scale = max(1.0, b.detach().double().abs().max().item())
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale)


def _emu_check(kern, x, P, extra, mom, cfg, dtype, stacked=False):
    got = _run(_kernel_step(kern), x, P, extra, mom, cfg, stacked=stacked)
    # the reference in fp64 on the same (rounded) inputs; momentum as given
    x64, P64 = x.double(), [p.double() for p in P]
    extra64 = {k: v.double() for k, v in extra.items()}
    want = _run(guidance_step_reference, x64, P64, extra64, None if mom is None else mom.double(), cfg)
    assert got.out.dtype == dtype and got.out.shape == x.shape
    _emu_close(got.out, want.out, dtype)
    if want.x0 is not None:
        _emu_close(got.x0, want.x0, dtype)
    if want.momentum is not None:
        assert got.momentum.dtype == torch.float32
        _emu_close(got.momentum, want.momentum, torch.float32 if dtype == torch.float32 else dtype)
    return got


@pytest.mark.parametrize("variant", ["fp32", "fp32_strided", "expanded", "bf16"])
def test_emulated_cuda_per_sample_scalars_any_float_layout(kern, variant):
    """The kernels read t, t_next and the weights in place in either float width and at any stride."""
    B, S = 3, (2, 64)
    x, P, _, _ = _inputs(B, S, torch.float32)
    t = _t_variants(B)[variant]
    w = torch.tensor([[3.0, 0.5, 1.0], [1.5, 2.0, 0.25]], dtype=torch.float32).t()
    cfg = dict(terms=[(0, 1), (1, 0)], base=0, rescale_phi=0.5, solver="euler", return_x0=True)
    got = _kernel_step(kern)(x, P, t, weights=w, t_next=t * 0.9, **cfg)  # (kern keeps every layout)
    want = guidance_step_reference(x.double(), [p.double() for p in P], t.double(), weights=w.double(),
                                   t_next=(t * 0.9).double(), **cfg)
    _emu_close(got.out, want.out, torch.float32)
    _emu_close(got.x0, want.x0, torch.float32)


@pytest.mark.parametrize("stat", [dict(zero_star=True), dict(rescale_phi=0.7, rescale_space="velocity"),
                                  dict(apg_eta=0.0, apg_norm_threshold=2.0)])
def test_emulated_cuda_statistics_skip_x_in_velocity_space(kern, stat):
    """Velocity branches with every statistic in velocity space: the statistics pass does not read x
    (its Gram entries would get zero weight), so a NaN in x stays out of a velocity output, as on the
    CPU and in the reference formulas."""
    B, S = 3, (2, 64)
    x, P, _, _ = _inputs(B, S, torch.float32)
    x[1, 0, 5] = float("nan")
    cfg = dict(terms=[(0, 1)], weights=[2.0], base=0, stats_space="velocity", **stat)
    got = _kernel_step(kern)(x, P, _t(B), **cfg)
    want = guidance_step_reference(x.double(), [p.double() for p in P], _t(B), **cfg)
    assert torch.isfinite(got.out).all() and torch.isfinite(want.out).all()
    _emu_close(got.out, want.out, torch.float32)
    cpu = guidance_step(x, P, _t(B), **cfg)
    assert torch.isfinite(cpu.out).all()


@pytest.fixture
def emu_schedule():
    yield
    if _emu is not None:
        _emu.set_schedule("random", 0)


@pytest.mark.parametrize("S", [(4, 5, 7), (2, 64)], ids=["scalar140", "vec128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_emulated_cuda_matches_reference(kern, name, dtype, S):
    B = 3
    cfg = _configs(B)[name]
    x, P, extra, mom = _inputs(B, S, dtype, K=cfg.get("K", 2), momentum_J=cfg.get("J_m", 0))
    _emu_check(kern, x, P, extra, mom, cfg, dtype)


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
@pytest.mark.parametrize("name", ["apg", "rescale", "zero_star"])
def test_emulated_cuda_several_blocks_per_sample(kern, name, schedule, emu_schedule):
    # > 8192 elements per sample: several blocks reduce one sample (one row of partial sums per block,
    # added in order), and each block's chunk boundary falls inside a vector row of the next
    if kern is _emu:  # (on the GPU the three schedules are three runs of the same launch)
        _emu.set_schedule(schedule, 7)
    B, S = 2, (2 * 8192 + 64,)
    cfg = _configs(B)[name]
    x, P, extra, mom = _inputs(B, S, torch.float32, momentum_J=cfg.get("J_m", 0))
    _emu_check(kern, x, P, extra, mom, cfg, torch.float32)


@pytest.mark.parametrize("stat", [dict(rescale_phi=0.7), dict(zero_star=True), dict(apg_eta=0.0)])
def test_emulated_cuda_empty_samples_with_statistics(kern, stat):
    x = torch.randn(2, 0, 8)
    assert _kernel_step(kern)(x, [x, x], 0.5, terms=[(0, 1)], weights=[1.5], base=0, **stat).out.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_cuda_many_branches_and_terms(kern, dtype):
    # K = 4 branches (mixed parameterizations), J = 3 terms with per-sample weights and masks, mixed t,
    # APG projection on one term: Gram size 5
    B, S = 4, (3, 11)
    t = torch.tensor([0.95, 0.7, 0.4, 0.12], dtype=torch.float64)
    mask = torch.ones(B, 3)
    mask[1, 0] = 0
    mask[3, 2] = 0
    cfg = dict(terms=[(0, 1), (0, 2), (3, 1)], weights=torch.rand(B, 3, dtype=torch.float64) * 2, base=1,
               param=["velocity", "x0", "eps", "x0"], mask=mask, apg_eta=[None, 0.25, None],
               stats_space=["x0", "velocity", "eps"], solver="euler", t_next=t - 0.1, return_x0=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, *S, generator=g, dtype=torch.float64).to(dtype)
    P = [torch.randn(B, *S, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]
    got = _kernel_step(kern)(x, P, t, **cfg)
    want = guidance_step_reference(x.double(), [p.double() for p in P], t, **cfg)
    _emu_close(got.out, want.out, dtype)
    _emu_close(got.x0, want.x0, dtype)


@pytest.mark.parametrize("name", ["cfg_euler_x0", "zero_star", "apg"])
def test_emulated_cuda_stacked_and_stride0(kern, name):
    B, S = 4, (6, 8)
    cfg = _configs(B)[name]
    x, P, extra, mom = _inputs(B, S, torch.float32, momentum_J=cfg.get("J_m", 0))
    _emu_check(kern, x, P, extra, mom, cfg, torch.float32, stacked=True)
    # expanded (batch stride 0) inputs
    x1, P1, _, _ = _inputs(1, S, torch.float32, seed=1)
    xe, Pe = x1.expand(B, *S), [p.expand(B, *S) for p in P1]
    got = _run(_kernel_step(kern), xe, Pe, extra, mom, cfg)
    want = _run(guidance_step_reference, xe.contiguous(), [p.contiguous() for p in Pe], extra, mom, cfg)
    _emu_close(got.out, want.out, torch.float32)


def test_emulated_cuda_nearly_equal_branches(kern):
    # the difference C − U is formed before it is weighted: fp32 keeps the guidance part's precision
    B, S = 3, (4, 33)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, *S, generator=g, dtype=torch.float64).float()
    U = (torch.randn(B, *S, generator=g, dtype=torch.float64) * 4).float()
    C = (U.double() + 4e-3 * torch.randn(B, *S, generator=g, dtype=torch.float64)).float()
    kw = dict(terms=[(1, 0)], weights=[6.0], base=1, return_x0=True)
    got = _kernel_step(kern)(x, [U, C], 0.6, **kw)
    want = guidance_step_reference(x.double(), [U.double(), C.double()], 0.6, **kw)
    for a, b in ((got.out, want.out), (got.x0, want.x0)):
        err = (a.double() - b).abs()
        assert (err <= 2 * 2.0 ** -24 * b.abs() + 1e-6).all(), err.max().item()
    same = _kernel_step(kern)(x, [U, U.clone()], 0.6, **kw).out
    assert torch.equal(same, _kernel_step(kern)(x, [U], 0.6, terms=[], weights=[], base=0).out)


@pytest.mark.parametrize("S", [(4, 5, 7), (2, 64)], ids=["scalar140", "vec128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_emulated_cuda_combine_kernels_agree(kern, monkeypatch, name, dtype, S):
    # combine_kernel with the stream count compiled in (the default up to 8 streams) against the generic
    # loop (RAEKERN_GUIDANCE_COMBINE=generic): the same products in the same order.
    B = 3
    cfg = _configs(B)[name]
    x, P, extra, mom = _inputs(B, S, dtype, K=cfg.get("K", 2), momentum_J=cfg.get("J_m", 0))
    monkeypatch.setenv("RAEKERN_GUIDANCE_COMBINE", "generic")
    generic = _emu_check(kern, x, P, extra, mom, cfg, dtype)
    monkeypatch.delenv("RAEKERN_GUIDANCE_COMBINE")
    fixed = _emu_check(kern, x, P, extra, mom, cfg, dtype)
    for a, b in ((fixed.out, generic.out), (fixed.x0, generic.x0), (fixed.momentum, generic.momentum)):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=2e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)


def test_emulated_cuda_matches_cpu_op(kern):
    B, S = 3, (2, 64)
    cfg = _configs(B)["apg"]
    x, P, extra, mom = _inputs(B, S, torch.float32, momentum_J=1)
    got = _run(_kernel_step(kern), x, P, extra, mom, cfg)
    cpu = _run(guidance_step, x, P, extra, mom, cfg)
    torch.testing.assert_close(got.out, cpu.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.momentum, cpu.momentum, rtol=1e-5, atol=1e-5)


def test_emulated_cuda_affine_rules_at_singular_times(kern):
    """The CUDA solve kernel shares guidance_solve.h: CFG at t = 0 (x0/velocity) and t = 1 (eps)."""
    x, (C, U), _, _ = _inputs(2, (4, 32), torch.float32)
    for space, t in (("velocity", 0.0), ("x0", 0.0), ("eps", 1.0)):
        got = _kernel_step(kern)(x, [C, U], t, param=space, out_param=space, terms=[(0, 1)], weights=[1.5], base=1)
        _emu_close(got.out, U + 1.5 * (C - U), torch.float32)


def test_emulated_cuda_statistics_limit(kern):
    # the CUDA Gram kernel keeps 1 + K + momentum terms <= 8 in registers
    B, S = 2, (8,)
    x, P, _, _ = _inputs(B, S, torch.float32, K=8)
    with pytest.raises(ValueError, match="'terms'"):
        _kernel_step(kern)(x, P, 0.5, terms=[(0, 1)], weights=[1.0], base=0, rescale_phi=0.5)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="'x'"):
        _kernel_step(kern)(x.double(), [p.double() for p in P], 0.5, terms=[(0, 1)], weights=[1.0], base=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_combine(kern, dtype):
    B, S = 3, (5, 9)
    ins = [torch.randn(B, *S).to(dtype) for _ in range(3)]
    c = torch.randn(B, 3, dtype=torch.float64)
    c[1, 2] = 0.0
    got = kern.guidance_combine(ins, c)
    want = sum(c[:, e].view(B, 1, 1) * ins[e].double() for e in range(3))
    _emu_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, C", [(1, 2), (7, 10), (3, 1000)])
def test_emulated_cuda_gfcg_select(kern, dtype, B, C):
    g = torch.Generator().manual_seed(B * C)
    logits = (torch.randn(B, C, generator=g) * 3).to(dtype)
    target = torch.randint(0, C, (B,), generator=g)
    got = kern.gfcg_select(logits, target, 3.0, 4.0, 0.1)
    want = gfcg_select_reference(logits, target, w_max=3.0, kappa=4.0, w_min=0.1)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_emulated_cuda_gfcg_select_nonfinite_rows(kern):
    # the kernel's argmax starts from the out-of-range index C: a row of NaNs must not return it
    logits, target = _nonfinite_logits()
    for dtype in (torch.float32, torch.bfloat16):
        got = kern.gfcg_select(logits.to(dtype), target, 2.0, 1.0, 0.0)
        want = gfcg_select_reference(logits.to(dtype), target, w_max=2.0, kappa=1.0)
        assert got[0].cpu().tolist() == want[0].tolist()


def test_emulated_cuda_empty_samples_over_the_gram_limit_raise(kern):
    # the statistics of empty samples are summed into a fixed-size array too: the limit holds at N = 0
    x = torch.randn(2, 0)
    with pytest.raises(ValueError, match="'terms'.*must be <= 8"):
        _kernel_step(kern)(x, [x] * 8, 0.5, terms=[(1, 0)], weights=[1.5], base=0, rescale_phi=0.5)


def test_emulated_cuda_gfcg_select_ties_and_invalid_target(kern):
    logits = torch.tensor([[5.0, 1.0, 1.0, 0.0], [0.0, 3.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    ref, w, pt, pr = kern.gfcg_select(logits, torch.tensor([0, 2, 7]), 2.0, 1.0, 0.0)
    assert ref[:2].tolist() == [1, 1]  # lowest index on ties
    assert abs(float(w[1]) - 2.0) < 1e-6
    # the CUDA kernel does not synchronise to validate targets: an invalid one reads ref = -1, NaN
    assert int(ref[2]) == -1 and torch.isnan(w[2]) and torch.isnan(pt[2]) and torch.isnan(pr[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_captures_a_step_with_constant_weights_and_float_t():
    """A step's constant tensors (float weights, a float t) are not cached while a CUDA graph is being
    captured (their fill only runs at replay), so the captured step and later eager steps agree, and the
    eager steps then reuse one cached tensor."""
    import raekern.ops.guidance as G

    G._CONSTANTS.clear()
    x, P, _, _ = _inputs(4, (3, 64), torch.float32)
    x, P = x.cuda(), [p.cuda() for p in P]
    cfg = dict(terms=[(0, 1)], weights=[2.5], base=0, rescale_phi=0.5, solver="euler", t_next=0.55)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        captured = guidance_step(x, P, 0.6, **cfg).out
    torch.cuda.current_stream().wait_stream(side)
    assert not G._CONSTANTS, "constants were cached during capture"
    graph.replay()
    eager = guidance_step(x, P, 0.6, **cfg).out
    n = len(G._CONSTANTS)
    again = guidance_step(x, P, 0.6, **cfg).out
    assert n > 0 and len(G._CONSTANTS) == n
    torch.cuda.synchronize()
    want = guidance_step_reference(x.double(), [p.double() for p in P], 0.6, **cfg).out
    for got in (captured, eager, again):
        _emu_close(got.cpu(), want.cpu(), torch.float32)
