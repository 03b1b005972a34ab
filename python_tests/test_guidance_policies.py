"""raekern.sampling.guidance policies against plain-PyTorch transcriptions of each method's formula."""
import pytest
import torch

from raekern.sampling.guidance import (APG, CFG, GFCG, AutoGuidance, Branch, CFGZeroStar, GuidanceRescale,
                                       InternalGuidance, NoGuidance)

B, S = 4, (6, 5, 5)


def _bc(v, x):
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def _data(dtype=torch.float32, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *S, generator=g).to(dtype) for _ in range(n + 1)]


def _close(a, b, dtype=torch.float32):
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


T_MIXED = torch.tensor([0.95, 0.6, 0.3, 0.05])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_both_forms_euler(dtype):
    x, C, U, _ = _data(dtype)
    tn = T_MIXED - 0.03
    xf, c, u = x.float(), C.float(), U.float()
    out = CFG(1.5).step(x, [C, U], T_MIXED, t_next=tn).out
    _close(out, xf + _bc(tn - T_MIXED, xf) * (u + 1.5 * (c - u)), dtype)
    out = CFG(0.5, form="anchor").step(x, torch.cat([C, U]), T_MIXED, solver="none").out
    _close(out, c + 0.5 * (c - u), dtype)
    assert CFG(2.0).branches == (Branch(label="cond"), Branch(label="null"))


def test_cfg_interval_mixed_t():
    x, C, U, _ = _data()
    out = CFG(3.0, interval=(0.2, 0.7)).step(x, [C, U], T_MIXED, solver="none").out
    inside = ((T_MIXED >= 0.2) & (T_MIXED <= 0.7)).float()
    want = C + _bc(inside, x) * 2.0 * (C - U)
    _close(out, want)
    # x0 models: the interval gates the same way in x0 space
    out = CFG(3.0, interval=(0.2, 0.7)).step(x, [C, U], T_MIXED, param="x0", solver="none", out_param="x0").out
    _close(out, want)


def test_autoguidance():
    x, C, W, _ = _data()
    p = AutoGuidance(1.42)
    assert p.branches == (Branch("main", "cond"), Branch("weak", "cond"))
    _close(p.step(x, [C, W], 0.5, solver="none").out, W + 1.42 * (C - W))


def test_no_guidance():
    x, C, _, _ = _data()
    _close(NoGuidance().step(x, [C], 0.5, t_next=0.4).out, x - 0.1 * C)


def test_internal_guidance_raev2():
    """RAEv2: x̂ = x_base + s·(x_full − x_base) on t ∈ [0.1, 1], then u = (x − x̂)/t and Euler."""
    x, F, Bs, _ = _data()
    p = InternalGuidance(1.78)
    assert p.branches == (Branch(output=0), Branch(output=1))
    tn = T_MIXED * 0.9
    out = p.step(x, [F, Bs], T_MIXED, param="x0", t_next=tn).out
    active = ((T_MIXED >= 0.1) & (T_MIXED <= 1.0)).float()
    x0 = torch.where(_bc(active, x) > 0, Bs + 1.78 * (F - Bs), F)
    u = (x - x0) / _bc(T_MIXED, x)
    _close(out, x + _bc(tn - T_MIXED, x) * u)


def test_internal_guidance_with_cfg():
    x, Fc, Bc, Fu = _data()
    Bu = torch.randn_like(x)
    p = InternalGuidance(1.5, cfg_scale=2.0, uncond_scale=1.2)
    assert len(p.branches) == 4
    out = p.step(x, [Fc, Bc, Fu, Bu], 0.5, param="x0", solver="none", out_param="x0").out
    igc = Bc + 1.5 * (Fc - Bc)
    igu = Bu + 1.2 * (Fu - Bu)
    _close(out, igu + 2.0 * (igc - igu))


class _Clf:
    def __call__(self, x0):
        return x0.flatten(1)[:, :12] * 3


@pytest.mark.parametrize("mode", ["alone", "cfg3", "cfg_substitute", "autoguidance"])
def test_gfcg_modes(mode):
    x, C, U, R = _data()
    labels = torch.tensor([0, 5, 7, 11])
    p = GFCG(_Clf(), w_max=2.5, kappa=3.0, mode=mode, cfg_scale=1.6, ag_scale=1.3)
    assert p.needs_reference
    ref, w = p.select_reference(C, labels)
    logits = _Clf()(C)
    prob = logits.softmax(-1)
    masked = prob.scatter(1, labels[:, None], -1.0)
    want_ref = masked.argmax(1)
    assert torch.equal(ref, want_ref)
    pt = prob.gather(1, labels[:, None])[:, 0]
    pr = prob.gather(1, want_ref[:, None])[:, 0]
    want_w = (2.5 * torch.exp(-3.0 * (pt - pr))).clamp(0, 2.5)
    _close(w, want_w)
    wb = _bc(want_w, x)
    if mode == "alone":
        outs, want = [C, R], C + wb * (C - R)
    elif mode == "cfg3":
        outs, want = [C, U, R], U + 1.6 * (C - U) + wb * (C - R)
    elif mode == "cfg_substitute":
        outs, want = [C, R], R + 1.6 * (C - R) + wb * (C - R)
    else:
        outs, want = [C, R], R + 1.3 * (C - R) + wb * (C - R)
        assert p.branches[1] == Branch(model="weak", label="ref")
    assert len(p.branches) == len(outs)
    res = p.step(x, outs, 0.5, solver="none")
    _close(res.out, want)
    assert res.x0 is not None  # GFCG always returns the guided x0 for the next reference


def test_gfcg_before_first_reference():
    x, C, _, R = _data()
    p = GFCG(_Clf(), w_max=2.0, kappa=1.0)
    labels = torch.arange(B)
    ref, w = p.select_reference(None, labels)
    assert torch.equal(ref, labels) and float(w.abs().max()) == 0.0
    _close(p.step(x, [C, R], 0.5, solver="none").out, C)


def _apg_paper(C0, U0, w, eta, r, beta, M):
    """Sadat et al. Algorithm 1 in x0 space, projection in fp64 as the reference implementations do."""
    d = C0 - U0
    if M is not None:
        d = d + beta * M
    m_new = d
    if r > 0:
        nrm = d.flatten(1).norm(dim=1)
        d = d * _bc(torch.clamp(r / nrm, max=1.0), d)
    v0, v1 = d.double(), C0.double()
    v1n = torch.nn.functional.normalize(v1.flatten(1), dim=1).view_as(v1)
    par = _bc((v0 * v1n).flatten(1).sum(1), v0) * v1n
    perp = v0 - par
    upd = (perp + eta * par).to(C0.dtype)
    return C0 + (w - 1) * upd, m_new


@pytest.mark.parametrize("param", ["velocity", "x0"])
def test_apg_two_steps_with_momentum(param):
    x, C, U, _ = _data()
    p = APG(4.0, eta=0.2, norm_threshold=3.0, momentum=-0.5)
    state = {}
    M = None
    for k, t in enumerate([0.8, 0.7]):
        res = p.step(x, [C, U], t, param=param, solver="none", out_param="x0", step_index=k, state=state)
        C0, U0 = (x - t * C, x - t * U) if param == "velocity" else (C, U)
        want, M = _apg_paper(C0, U0, 4.0, 0.2, 3.0, -0.5, M)
        _close(res.out, want)
        _close(res.momentum[0], M)


def test_apg_heun_stages_share_the_step_buffer():
    x, C, U, _ = _data()
    p = APG(3.0, momentum=0.5)
    state = {}
    p.step(x, [C, U], 0.8, solver="none", step_index=0, state=state)
    m0 = state[p._state_key()]["new"]
    a = p.step(x, [C, U], 0.7, solver="none", step_index=1, state=state).out
    b = p.step(x, [C, U], 0.7, solver="none", step_index=1, state=state).out  # Heun stage 2
    _close(a, b)
    assert state[p._state_key()]["prev"] is m0


def test_cfg_zero_star_official_and_comfyui():
    x, C, U, _ = _data()
    t, w = 0.6, 2.5
    s = ((C * U).flatten(1).sum(1) / ((U * U).flatten(1).sum(1) + 1e-8))
    sU = _bc(s, x) * U
    off = CFGZeroStar(w).step(x, [C, U], t, solver="none", step_index=2).out
    _close(off, sU + w * (C - sU))  # velocity space (official README)
    # ComfyUI: s* from residuals x − x0_hat, rescaled *denoised* uncond: w·C0 + (1 − w)·s*·U0 in x0 space
    C0, U0 = x - t * C, x - t * U
    rc, ru = x - C0, x - U0
    s2 = (rc * ru).flatten(1).sum(1) / ((ru * ru).flatten(1).sum(1) + 1e-8)
    comfy_x0 = w * C0 + (1 - w) * _bc(s2, x) * U0
    got = CFGZeroStar(w, variant="comfyui").step(x, [C, U], t, solver="none", out_param="x0", step_index=2).out
    _close(got, comfy_x0)
    # the two differ by exactly x_t·(1 − s*)(1 − w) in x0 space (reference/guidance.md §4.2)
    off_x0 = x - t * off
    _close(off_x0 - got, x * _bc((1 - s) * (1 - w), x))


def test_cfg_zero_star_zero_init():
    x, C, U, _ = _data()
    p = CFGZeroStar(2.0, zero_init_steps=2)
    for k in range(3):
        out = p.step(x, [C, U], 0.9, t_next=0.8, step_index=k).out
        if k < 2:
            _close(out, x)  # zero velocity leaves the state unchanged
        else:
            assert (out - x).abs().max() > 0


@pytest.mark.parametrize("space", ["x0", "velocity"])
def test_guidance_rescale(space):
    x, C, U, _ = _data()
    t, w, phi = 0.5, 5.0, 0.7
    pol = GuidanceRescale(CFG(w), phi, space=space)
    out = pol.step(x, [C, U], t, solver="none", out_param="velocity").out
    conv = (lambda v: x - t * v) if space == "x0" else (lambda v: v)
    back = (lambda g: (x - g) / t) if space == "x0" else (lambda g: g)
    G, Cs = conv(U + w * (C - U)), conv(C)
    f = phi * Cs.flatten(1).std(1) / G.flatten(1).std(1) + (1 - phi)
    _close(out, back(G * _bc(f, x)))
    assert pol.branches == CFG(w).branches


def test_rescale_composes_with_apg_and_interval():
    x, C, U, _ = _data()
    pol = GuidanceRescale(APG(3.0, interval=(0.5, 1.0)), 0.5)
    out = pol.step(x, [C, U], T_MIXED, solver="none").out
    inactive = T_MIXED < 0.5
    _close(out[inactive], C[inactive])  # outside the interval: C (rescale factor is 1 when G = C)


def test_heun_convention():
    """Stage 1: guided velocity; stage 2 ('heun2', t_next = t_prev): x + Δt·(u1 + u2)/2."""
    x, C1, U1, _ = _data()
    C2, U2 = torch.randn_like(x), torch.randn_like(x)
    p = CFG(1.5)
    t0, t1 = 0.8, 0.6
    u1 = p.step(x, [C1, U1], t0, solver="none").out
    x1 = x + (t1 - t0) * u1
    out = p.step(x1, [C2, U2], t1, solver="heun2", t_next=t0, x_prev=x, u_prev=u1).out
    u2 = U2 + 1.5 * (C2 - U2)
    _close(out, x + (t1 - t0) * (u1 + u2) / 2)


def test_policy_step_compiles():
    x, C, U, _ = _data()
    p = GuidanceRescale(CFG(2.0, interval=(0.3, 0.9)), 0.7)

    def f(x, outs, t):
        return p.step(x, outs, t, t_next=t - 0.1).out

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    t = torch.tensor([0.8, 0.5, 0.2, 0.9])
    _close(cf(x, torch.cat([C, U]), t), f(x, torch.cat([C, U]), t))


@pytest.mark.parametrize("make, arg", [
    (lambda: CFG(1.5, form="original"), "form"),
    (lambda: CFG(1.5, interval=(0.8, 0.2)), "interval"),
    (lambda: CFG("1.5"), "scale"),
    (lambda: GFCG(_Clf(), w_max=2.0, kappa=1.0, mode="both"), "mode"),
    (lambda: GFCG(None, w_max=2.0, kappa=1.0), "classifier"),
    (lambda: GFCG(_Clf(), w_max=1.0, kappa=1.0, w_min=2.0), "w_min"),
    (lambda: CFGZeroStar(2.0, zero_init_steps=-1), "zero_init_steps"),
    (lambda: CFGZeroStar(2.0, variant="x0"), "variant"),
    (lambda: APG(2.0, norm_threshold=-1.0), "norm_threshold"),
    (lambda: GuidanceRescale(object(), 0.7), "inner"),
    (lambda: GuidanceRescale(CFG(2.0), 0.7, space="score"), "space"),
])
def test_bad_configuration(make, arg):
    with pytest.raises((ValueError, TypeError), match=f"'{arg}'"):
        make()


def test_wrong_branch_count_raises():
    x, C, U, R = _data()
    with pytest.raises(ValueError, match="'terms'"):
        CFG(2.0).step(x, [C], 0.5, solver="none")
    with pytest.raises(ValueError, match="'branches'"):
        CFG(2.0).step(x, torch.cat([C, U, R])[: 2 * B + 1], 0.5, solver="none")
