"""Numerics (issue #11.4): stable softmax / log-sum-exp for large logits, fp32 accumulation for
bf16/fp16 inputs, guidance that stays precise when its branches nearly agree, and non-finite values
that propagate without a hang."""
from __future__ import annotations

import math

import pytest
import torch

from raekern import ops as R
from raekern.ops.guidance import gfcg_select_reference, guidance_step_reference
from _reliability_helpers import time_limit

HALF = [torch.bfloat16, torch.float16]


def _ulp(dtype) -> float:
    return torch.finfo(dtype).eps


# ------------------------------------------------------------------------------------------ large logits

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_attention_is_stable_for_large_logits(dtype, magnitude):
    """Scores of ±magnitude (exp would overflow fp32 at 88): the output is a convex combination of v
    and the lse equals the fp64 log-sum-exp."""
    torch.manual_seed(0)
    B, N, H, Dh = 2, 37, 2, 16
    q = torch.randn(B, N, H, Dh, dtype=torch.float64)
    k = torch.randn(B, N, H, Dh, dtype=torch.float64)
    v = torch.randn(B, N, H, Dh, dtype=torch.float64)
    scale = magnitude / Dh ** 0.5 / 4
    if dtype == torch.float16:
        q, k = q.clamp(-8, 8), k.clamp(-8, 8)  # keep the *inputs* finite in fp16; scale carries the size
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    out, lse = R.attention(qd, kd, vd, scale=scale, return_lse=True)
    ref, ref_lse = R.attention_reference(*(t.double() for t in (qd, kd, vd)), scale=scale, return_lse=True)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    assert lse.dtype == torch.float32
    # lse grows like the largest score: compare relative to it
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-3)
    # output: the flash-attention rule (DESIGN §3.3): error vs fp64 at most twice that of the same-dtype
    # PyTorch reference, plus a small floor; a naive exp would give inf/NaN here instead
    same = R.attention_reference(qd, kd, vd, scale=scale).double()
    err, err_ref = (out.double() - ref).abs().max().item(), (same - ref).abs().max().item()
    floor = 1e-4 if dtype == torch.float32 else 4 * _ulp(dtype)
    assert err <= 2 * err_ref + floor, (err, err_ref)
    lo, hi = vd.double().amin(1, keepdim=True), vd.double().amax(1, keepdim=True)
    assert ((out.double() >= lo - 1e-2) & (out.double() <= hi + 1e-2)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gfcg_select_is_stable_for_large_logits(dtype):
    big = 6e4 if dtype == torch.float16 else 1e6
    logits = torch.tensor([[big, big - 1.0, -big, 0.0], [-big, -big, -big + 0.5, -big]], dtype=torch.float64)
    target = torch.tensor([1, 3])
    lg = logits.to(dtype)
    ref, w, p_t, p_r = R.gfcg_select(lg, target, w_max=3.0, kappa=2.0)
    p = torch.softmax(lg.double(), -1)
    assert torch.isfinite(w).all() and torch.isfinite(p_t).all() and torch.isfinite(p_r).all()
    torch.testing.assert_close(p_t.double(), p[torch.arange(2), target], rtol=1e-5, atol=1e-7)
    assert ref.tolist() == gfcg_select_reference(lg, target, w_max=3.0, kappa=2.0)[0].tolist()


def test_depth_route_softmax_energy_is_stable_for_large_router_logits():
    torch.manual_seed(0)
    experts = [torch.randn(2, 3, 8) for _ in range(4)]
    base = torch.randn(2, 3, 8)
    logits = torch.randn(2, 3, 4) * 1e4
    out = R.depth_route(experts, logits, base, energy="softmax", bound="none")
    ref = R.depth_route_reference([e.double() for e in experts], logits.double(), base.double(), energy="softmax",
                                  bound="none")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [100.0, 1e4, 10000.1, 3.3, -0.7])
def test_layer_norm_of_a_constant_row_is_exactly_the_bias(value):
    """Variance 0 makes rstd = 1/sqrt(eps): (x - mean)·rstd is exactly 0 there, while the one-FMA form
    x·rstd − mean·rstd (the kernels' first form) left 0.39 at |x| = 1e4."""
    for D in (64, 1, 768, 1152, 37):  # 768, 1152: 1/D and the value are not exact in binary
        bias = torch.linspace(-1, 1, D)
        x = torch.full((2, 3, D), value)
        b = bias[:D]
        torch.testing.assert_close(R.layer_norm(x, None, b), b.expand_as(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(R.norm_modulate(x, torch.zeros(D), torch.zeros(D), bias=b), b.expand_as(x),
                                   rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ fp32 accumulation

# A bf16 running sum stops growing at 256 (8-bit significand) and an fp16 one loses units past 2048:
# a long row of ones tells fp32 accumulation from half-precision accumulation at a glance.
LONG = 8192


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_norms_accumulate_in_fp32(dtype):
    x = torch.ones(2, 3, LONG, dtype=dtype)
    assert torch.equal(R.rms_norm(x), x)  # rms = 1 exactly
    y = (torch.arange(LONG, dtype=torch.float64) % 7 - 3).to(dtype).expand(2, 3, LONG)  # mean 0, exact values
    ref = R.layer_norm_reference(y.double()).to(dtype)
    torch.testing.assert_close(R.layer_norm(y), ref, rtol=_ulp(dtype), atol=_ulp(dtype))
    shift = torch.zeros(2, 1, LONG, dtype=dtype)
    torch.testing.assert_close(R.norm_modulate(y, shift, shift, kind="layer"), ref, rtol=_ulp(dtype),
                               atol=_ulp(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fusion_accumulates_in_fp32(dtype):
    L = 3
    row = (torch.arange(LONG, dtype=torch.float64) % 5 - 2)
    layers = [(row * (l + 1)).to(dtype).expand(1, 4, LONG) for l in range(L)]
    got = R.layer_stack_fuse(layers, add_last_token_mean=True)
    want = R.layer_stack_fuse_reference([h.double() for h in layers], add_last_token_mean=True).to(dtype)
    torch.testing.assert_close(got, want, rtol=2 * _ulp(dtype), atol=2 * _ulp(dtype))
    ones = [torch.ones(1, 2, LONG, dtype=dtype) for _ in range(L)]
    base = torch.ones(1, 2, LONG, dtype=dtype)
    out = R.depth_route(ones, torch.ones(1, 2, L), base, energy="l2", bound="norm_cap", cap=0.5)
    # f = sqrt(3)·1, |f| = sqrt(3·LONG), cap·|base| = 0.5·sqrt(LONG): Δ = 0.5 per element
    torch.testing.assert_close(out.float(), torch.full((1, 2, LONG), 1.5), rtol=_ulp(dtype), atol=_ulp(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_attention_accumulates_in_fp32(dtype):
    """LONG keys with equal scores: every weight is 1/LONG; v = 1 everywhere must give exactly 1, and
    v = key index must give the mean index (a half-precision running sum would stall)."""
    q = torch.zeros(1, 2, 1, 16, dtype=dtype)
    k = torch.zeros(1, LONG, 1, 16, dtype=dtype)
    v = torch.ones(1, LONG, 1, 16, dtype=dtype)
    out, lse = R.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.ones_like(out))
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(LONG)), rtol=1e-6, atol=1e-6)
    idx = (torch.arange(LONG, dtype=torch.float64) / LONG).to(dtype)
    v2 = idx[None, :, None, None].expand(1, LONG, 1, 16)
    want = idx.double().mean()
    torch.testing.assert_close(R.attention(q, k, v2).double(), torch.full((1, 2, 1, 16), want.item(),
                                                                          dtype=torch.float64),
                               rtol=2 * _ulp(dtype), atol=2 * _ulp(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_guidance_statistics_accumulate_in_fp32(dtype):
    """CFG-Zero*'s s* = <pos, neg>/|neg|² over LONG elements of ones is 1: the guided output equals
    the positive branch; a half-precision dot product would give s* far from 1."""
    x = torch.zeros(2, LONG, dtype=dtype)
    pos = torch.ones(2, LONG, dtype=dtype)
    neg = torch.ones(2, LONG, dtype=dtype)
    out = R.guidance_step(x, [neg, pos], 0.5, terms=[(1, 0)], weights=[3.0], base=1, zero_star=True,
                          stats_space="velocity").out
    ref = guidance_step_reference(x.double(), [neg.double(), pos.double()], 0.5, terms=[(1, 0)],
                                    weights=[3.0], base=1, zero_star=True, stats_space="velocity").out
    torch.testing.assert_close(out.double(), ref, rtol=_ulp(dtype), atol=_ulp(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_gfcg_softmax_accumulates_in_fp32(dtype):
    logits = torch.zeros(2, LONG, dtype=dtype)
    ref, w, p_t, p_r = R.gfcg_select(logits, torch.tensor([0, 5]), w_max=2.0, kappa=1.0)
    torch.testing.assert_close(p_t, torch.full((2,), 1.0 / LONG), rtol=1e-5, atol=0)
    assert ref.tolist() == [1, 0]


# ------------------------------------------------------------------------------------------ guidance precision

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param", ["velocity", "x0", "eps"])
def test_guidance_precise_when_branches_nearly_equal(dtype, param):
    """cond = uncond + δ with δ ~ 1e-3 of the branch size: the guided displacement w·(cond − uncond)
    is formed from the exact difference of the rounded inputs, so the error stays at the output's
    rounding, not at w × the inputs' rounding."""
    torch.manual_seed(0)
    shape = (3, 4, 33)
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    u = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype)
    c = (u.double() + 1e-3 * torch.randn(shape, dtype=torch.float64) * 4).to(dtype)
    for w in (1.5, 7.0):
        kw = dict(param=param, terms=[(1, 0)], weights=[w - 1.0], base=1, return_x0=True)
        got = R.guidance_step(x, [u, c], 0.6, **kw)
        ref = guidance_step_reference(x.double(), [u.double(), c.double()], 0.6, **kw)
        for g, r in ((got.out, ref.out), (got.x0, ref.x0)):
            err = (g.double() - r).abs()
            bound = 2 * _ulp(dtype) * r.abs() + (1e-6 if dtype == torch.float32 else _ulp(dtype))
            assert (err <= bound).all(), (w, err.max().item())
    # identical branches: CFG is the identity, exactly
    kw = dict(param=param, terms=[(1, 0)], weights=[6.0], base=1)
    same = R.guidance_step(x, [u, u.clone()], 0.6, **kw).out
    assert torch.equal(same, R.guidance_step(x, [u], 0.6, terms=[], weights=[], base=0, param=param).out)


def test_cfg_zero_star_handles_a_zero_negative_branch():
    """|neg|² = 0: the 1e-8 guard keeps s* finite (0) instead of 0/0."""
    x = torch.randn(2, 16)
    pos = torch.randn(2, 16)
    out = R.guidance_step(x, [torch.zeros(2, 16), pos], 0.5, terms=[(1, 0)], weights=[2.0], base=1,
                          zero_star=True, stats_space="velocity").out
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, pos * 3)


# ------------------------------------------------------------------------------------------ non-finite values

def test_fully_masked_attention_rows_are_zero_not_nan():
    q, k, v = (torch.randn(2, 5, 2, 8) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out, lse = R.attention(q, k, v, key_padding_mask=mask, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_values_stay_in_their_row(dtype):
    """A NaN in one token row of x poisons that row only (row-wise ops) and never hangs."""
    x = torch.randn(2, 6, 24, dtype=dtype)
    x[1, 2, 5] = float("nan")
    x[0, 4, 1] = float("inf")
    with time_limit(30, "norms on non-finite input"):
        outs = [R.rms_norm(x), R.layer_norm(x),
                R.norm_modulate(x, torch.zeros(2, 1, 24, dtype=dtype), torch.zeros(2, 1, 24, dtype=dtype)),
                R.layer_stack_fuse([x, x])]
    for o in outs:
        bad = ~torch.isfinite(o.float()).all(-1)
        assert bad[1, 2] and bad[0, 4]
        bad[1, 2] = bad[0, 4] = False
        assert not bad.any()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_inputs_to_attention_and_guidance_do_not_hang(value):
    q, k, v = (torch.randn(1, 300, 2, 16) for _ in range(3))
    k[0, 7, 1, 3] = value
    with time_limit(30, "attention with non-finite keys"):
        out = R.attention(q, k, v)
    assert torch.isfinite(out[:, :, 0]).all()  # the other head is untouched
    x = torch.randn(2, 64)
    c = torch.randn(2, 64)
    c[1, 3] = value
    with time_limit(30, "guidance with non-finite branch"):
        o = R.guidance_step(x, [torch.randn(2, 64), c], 0.5, terms=[(1, 0)], weights=[2.0], base=1,
                            apg_norm_threshold=1.0, rescale_phi=0.5).out
    assert torch.isfinite(o[0]).all()
    lg = torch.randn(3, 10)
    lg[2, 4] = value
    with time_limit(30, "gfcg_select with non-finite logits"):
        ref, w, p_t, p_r = R.gfcg_select(lg, torch.tensor([0, 1, 2]), w_max=2.0, kappa=1.0)
    assert torch.isfinite(w[:2]).all() and 0 <= ref[2] < 10

