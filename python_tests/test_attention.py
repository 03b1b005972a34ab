"""raekern.ops.attention: CPU flash kernel (and CUDA when present) vs an fp64 reference.

Accuracy rule (flash-attention's): the max error of out / every gradient vs the fp64 reference is
at most 2x the error of the same-dtype PyTorch reference plus a small floor."""
import importlib
import logging
import math

import pytest
import torch

from raekern._utils.library import emulation_library
from raekern.ops import attention, attention_packed, attention_path, attention_reference
from raekern.ops.attention import attention_info

attn_mod = importlib.import_module("raekern.ops.attention")  # the module (raekern.ops.attention is the op)

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 2e-4}
GRAD_FLOOR = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make(shape_bnhd, dtype, layout="bnhd", device="cpu", seed=0, nk=None):
    g = torch.Generator().manual_seed(seed)
    b, n, h, d = shape_bnhd
    nk = n if nk is None else nk

    def t(nn):
        x = torch.randn(b, nn, h, d, generator=g, dtype=torch.float64)
        x = x if layout == "bnhd" else x.transpose(1, 2).contiguous()
        return x.to(device=device, dtype=dtype)

    return t(n), t(nk), t(nk)


def features(d, n, b, dtype, device="cpu", seed=1, norm=True, rope=True, mask=True):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if norm:
        kw["q_norm_weight"] = (torch.rand(d, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)
        kw["k_norm_weight"] = (torch.rand(d, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)
    if rope and d % 4 == 0:
        kw["rope_grid"] = (16, 16) if n >= 256 else (max(1, n // 4), 4) if n >= 4 else (1, 1)
    if mask:
        m = torch.rand(b, n, generator=g) > 0.25
        m[:, 0] = True
        kw["key_padding_mask"] = m.to(device)
    return kw


def to64(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}


def check_close(got, ref_same, ref64, floor, what):
    err = (got.double() - ref64).abs().max().item()
    ref_err = (ref_same.double() - ref64).abs().max().item()
    assert err <= 2 * ref_err + floor, f"{what}: error {err:.3g} > 2 x {ref_err:.3g} + {floor:g}"


SHAPES = [(2, 257, 3, 72), (1, 1, 2, 64), (1, 268, 2, 128), (2, 33, 2, 12), (1, 17, 1, 10), (1, 40, 1, 256)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_forward_matches_reference(dtype, shape, layout):
    b, n, h, d = shape
    q, k, v = make(shape, dtype, layout)
    kw = features(d, n, b, dtype)
    out, lse = attention(q, k, v, layout=layout, return_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (b, h, n)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), layout=layout, return_lse=True,
                                       **to64(kw))
    same, same_lse = attention_reference(q, k, v, layout=layout, return_lse=True, **kw)
    check_close(out, same, ref, FLOOR[dtype], "out")
    check_close(lse, same_lse, ref_lse, FLOOR[dtype], "lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 257, 2, 72), (1, 268, 2, 64), (2, 19, 1, 12)], ids=str)
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_gradients_match_reference(dtype, shape, layout):
    b, n, h, d = shape
    q, k, v = make(shape, dtype, layout)
    kw = features(d, n, b, dtype)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def grads(fn, q, k, v, kw):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, kw["q_norm_weight"], kw["k_norm_weight"])]
        kw2 = dict(kw, q_norm_weight=leaves[3], k_norm_weight=leaves[4])
        out = fn(*leaves[:3], layout=layout, **kw2)
        out.backward(g.to(out.dtype))
        return [t.grad for t in leaves]

    got = grads(attention, q, k, v, kw)
    same = grads(attention_reference, q, k, v, kw)
    ref = grads(attention_reference, q.double(), k.double(), v.double(), to64(kw))
    for name, a, s, r in zip(("dq", "dk", "dv", "dq_norm_weight", "dk_norm_weight"), got, same, ref):
        scale = max(1.0, r.abs().max().item())
        check_close(a, s, r, GRAD_FLOOR[dtype] * scale, name)


@pytest.mark.parametrize("unit", ["1", "0"], ids=["dot_product_kernels", "fp32_kernels"])
@pytest.mark.parametrize("shape", [(2, 257, 2, 72), (1, 268, 2, 64), (1, 40, 1, 136), (2, 19, 1, 12)], ids=str)
def test_both_cpu_bf16_units_match_reference(unit, shape, monkeypatch):
    """CPU bf16 runs the bf16 dot-product kernels (AMX / vdpbf16ps) or the fp32 ones (by default on
    Intel without AMX, where vdpbf16ps is the slower unit): both, forced, on whichever CPU runs the tests."""
    monkeypatch.setenv("RAEKERN_ATTENTION_AMX", unit)
    if unit == "0":
        assert attention_info()["bf16_forward"] in ("avx512", "avx2", "portable")
    for layout in ("bnhd", "bhnd"):
        test_forward_matches_reference(torch.bfloat16, shape, layout)
        test_gradients_match_reference(torch.bfloat16, shape, layout)


# The CPU products with Dh columns compute round8(Dh) of them: head dims ≡ 8 (mod 16) end in a half
# (ymm) vector, alone (8), after 1–4 full vectors (24…72), or after 64-column panels (88, 104, 152, 248).
@pytest.mark.parametrize("d", [8, 24, 40, 56, 88, 104, 152, 248])
def test_cpu_head_dims_ending_in_half_a_vector(d):
    b, n, h = 1, 70, 2
    q, k, v = make((b, n, h, d), torch.float32, "bnhd")
    kw = features(d, n, b, torch.float32)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def run(fn, q, k, v, kw):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, **kw)
        out.backward(g.to(out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    got = run(attention, q, k, v, kw)
    same = run(attention_reference, q, k, v, kw)
    ref = run(attention_reference, q.double(), k.double(), v.double(), to64(kw))
    for name, a, s, r in zip(("out", "dq", "dk", "dv"), got, same, ref):
        scale = max(1.0, r.abs().max().item())
        check_close(a, s, r, GRAD_FLOOR[torch.float32] * scale, name)


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_gradcheck_fp64_all_features(layout):
    b, n, h, d = 2, 7, 1, 8
    q, k, v = make((b, n, h, d), torch.float64, layout)
    kw = features(d, n, b, torch.float64)
    kw["key_padding_mask"][1] = False  # a batch with every key masked
    kw["rope_grid"] = (2, 3)  # 6 grid tokens, the 7th unrotated
    qw, kw_ = kw.pop("q_norm_weight"), kw.pop("k_norm_weight")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, qw, kw_)]

    def f(q, k, v, qw, kw_):
        out, lse = attention(q, k, v, layout=layout, q_norm_weight=qw, k_norm_weight=kw_, return_lse=True, **kw)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


def test_gradcheck_fp64_plain_and_cross_attention():
    q = torch.randn(1, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 5, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 5, 1, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, scale=0.3), (q, k, v))


def test_fully_masked_rows_give_zero_and_finite_grads():
    q, k, v = (t.requires_grad_() for t in make((2, 9, 2, 16), torch.float32))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0] = False
    out, lse = attention(q, k, v, key_padding_mask=mask, return_lse=True)
    assert torch.all(out[0] == 0) and torch.isinf(lse[0]).all() and torch.isfinite(lse[1]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and torch.all(t.grad[0] == 0)


def test_masked_keys_get_no_gradient_and_mask_broadcasts():
    q, k, v = (t.requires_grad_() for t in make((2, 12, 1, 8), torch.float32))
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, 5:] = False
    out = attention(q, k, v, key_padding_mask=mask)
    ref = attention_reference(q, k, v, key_padding_mask=mask.expand(2, 12))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.all(k.grad[:, 5:] == 0) and torch.all(v.grad[:, 5:] == 0)


def test_non_contiguous_and_expanded_inputs():
    b, n, h, d = 3, 20, 2, 16
    base = torch.randn(b, h, n, 2 * d)
    q = base[..., ::2].transpose(1, 2)  # strided head dim -> copied once, still correct
    k = torch.randn(1, n, h, d).expand(b, n, h, d).requires_grad_(False)  # stride-0 batch
    v1 = torch.randn(1, n, 1, d, requires_grad=True)
    v = v1.expand(b, n, h, d)  # stride-0 batch and head
    kw = features(d, n, b, torch.float32)
    out = attention(q, k, v, **kw)
    ref = attention_reference(q.double(), k.double(), v.double(), **to64(kw))
    assert (out.double() - ref).abs().max() < 1e-5
    out.sum().backward()
    ref_v1 = v1.detach().double().requires_grad_()
    attention_reference(q.double(), k.double(), ref_v1.expand(b, n, h, d), **to64(kw)).sum().backward()
    assert (v1.grad.double() - ref_v1.grad).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feat", [False, True], ids=["plain", "norm_rope_mask"])
@pytest.mark.parametrize("shape", [(3, 130, 5, 72), (2, 256, 5, 72)], ids=["one_group", "groups_2_2_1"])
def test_cpu_forward_thread_split_and_layout(dtype, feat, shape):
    # Tasks (batch, head, query chunk) go to whichever thread is free and every task computes its rows
    # the same way, so the output must not depend on the thread count (which also moves where query
    # chunks start) nor on the layout (strided bnhd rows vs contiguous bhnd), and must meet the
    # accuracy rule. The fp32 kernel stages bnhd heads in groups sized to L2: all 5 heads at N = 130,
    # groups of 2, 2 and 1 at N = 256 (the staged copy is exact, so nothing may change).
    b, n, h, d = shape
    q, k, v = make((b, n, h, d), dtype)
    kw = features(d, n, b, dtype, norm=feat, rope=feat, mask=feat)
    prev = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 4, 7):
            torch.set_num_threads(threads)
            outs.append(attention(q, k, v, **kw))
    finally:
        torch.set_num_threads(prev)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    assert torch.equal(attention(qt, kt, vt, layout="bhnd", **kw).transpose(1, 2), outs[0])
    ref64 = attention_reference(q.double(), k.double(), v.double(), **to64(kw))
    check_close(outs[0], attention_reference(q, k, v, **kw), ref64, FLOOR[dtype], "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backward_independent_of_thread_count(dtype):
    # (batch, head) tasks are claimed dynamically; each computes its gradients alone and the norm-weight
    # gradients are reduced in a fixed order, so every gradient is bit-identical whatever the threads.
    # N = 300 spans two query chunks of the bf16 tile backward.
    b, n, h, d = 2, 300, 3, 72
    q, k, v = make((b, n, h, d), dtype)
    kw = features(d, n, b, dtype)
    go = torch.randn(b, n, h, d, generator=torch.Generator().manual_seed(5)).to(dtype)
    prev = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            leaves = [x.clone().requires_grad_() for x in (q, k, v, kw["q_norm_weight"], kw["k_norm_weight"])]
            kwt = dict(kw, q_norm_weight=leaves[3], k_norm_weight=leaves[4])
            out = attention(leaves[0], leaves[1], leaves[2], **kwt)
            grads.append(torch.autograd.grad(out, leaves, go))
    finally:
        torch.set_num_threads(prev)
    for g in grads[1:]:
        for a, c in zip(g, grads[0]):
            assert torch.equal(a, c)


def test_packed_entry_point_matches_separate_qkv():
    b, n, h, d = 2, 21, 3, 8
    w = torch.randn(h * d * 3, 24)
    x = torch.randn(b, n, 24)
    qkv = (x @ w.t()).requires_grad_()
    kw = features(d, n, b, torch.float32)
    out = attention_packed(qkv, h, **kw)
    assert out.shape == (b, n, h * d) and out.is_contiguous()
    q, k, v = qkv.detach().view(b, n, 3, h, d).unbind(2)
    ref = attention_reference(q, k, v, **kw).reshape(b, n, h * d)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    out.sum().backward()
    ref_qkv = qkv.detach().clone().requires_grad_()
    rq, rk, rv = ref_qkv.view(b, n, 3, h, d).unbind(2)
    attention_reference(rq, rk, rv, **kw).sum().backward()
    torch.testing.assert_close(qkv.grad, ref_qkv.grad, atol=1e-4, rtol=1e-4)
    out2, lse = attention_packed(qkv.detach(), h, return_lse=True)
    assert lse.shape == (b, h, n)


def test_rope_reference_matches_rae_definition():
    # RAE's VisionRotaryEmbeddingFast(dim=Dh/2): freqs theta^(-arange(0, Dh/2, 2)/(Dh/2)) per interleaved
    # pair, first half by row, second half by column.
    d, gh, gw = 8, 2, 3
    x = torch.randn(1, 1, gh * gw + 1, d, dtype=torch.float64)
    y = attn_mod.rope_2d_reference(x, (gh, gw))
    f = 10000.0 ** (-torch.arange(0, d // 2, 2, dtype=torch.float64) / (d // 2))
    for t in range(gh * gw):
        r, c = divmod(t, gw)
        for half, pos in ((0, r), (1, c)):
            for p in range(d // 4):
                i = half * d // 2 + 2 * p
                a, bb = x[0, 0, t, i], x[0, 0, t, i + 1]
                ang = pos * f[p]
                torch.testing.assert_close(y[0, 0, t, i], a * torch.cos(ang) - bb * torch.sin(ang))
                torch.testing.assert_close(y[0, 0, t, i + 1], bb * torch.cos(ang) + a * torch.sin(ang))
    torch.testing.assert_close(y[0, 0, -1], x[0, 0, -1])  # past the grid: unrotated


def _huge_qkv(magnitude):
    g = torch.Generator().manual_seed(0)
    q, k = ((torch.randn(1, 16, 2, 16, generator=g) * magnitude).bfloat16() for _ in range(2))
    return q, k, torch.randn(1, 16, 2, 16, generator=g).bfloat16(), torch.randn(1, 16, 2, 16, generator=g).bfloat16()


@pytest.mark.parametrize("magnitude", [3e4, 5e4])
def test_huge_scores_bf16_forward(magnitude):
    """Scores near 1e10 (q, k entries ~5e4): the largest probability of a row must come out as 1, not
    2^-512 (a fused s·scale − max keeps the exact product while the max is rounded; that row's
    0/0 was a NaN output, a 2^-124 one flushed small outputs to 0). Against fp64 math on the same
    bf16 inputs."""
    q, k, v, _ = _huge_qkv(magnitude)
    out, lse = attention(q, k, v, return_lse=True)
    want, want_lse = attention_reference(q.double(), k.double(), v.double(), return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # fp32 scores near 1e10 carry rounding errors near 1e3: compare the rows whose top two scores
    # are further apart than that (all but a few).
    sc = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * 0.25
    top = sc.topk(2, dim=-1).values
    clear = ((top[..., 0] - top[..., 1]) > 1e-5 * top[..., 0].abs()).transpose(1, 2)  # [B, N, H]
    assert clear.float().mean() > 0.8
    torch.testing.assert_close(out.double()[clear], want[clear], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=0, rtol=1e-6)


def test_large_scores_bf16_backward():
    """Scores near 1e6, nearly one-hot rows: the gradients within the same-dtype reference's error.
    (Near 1e10 no fp32 flash backward can be: P is recomputed from an lse whose fp32 rounding there
    is hundreds of log2 units.)"""
    q, k, v, dout = _huge_qkv(1e3)

    def grads(fn, *xs):
        xs = [x.detach().requires_grad_() for x in xs]
        return torch.autograd.grad(fn(*xs), xs, dout.to(xs[0].dtype))

    exact = grads(attention_reference, q.double(), k.double(), v.double())
    ours, ref16 = grads(attention, q, k, v), grads(attention_reference, q, k, v)
    # The floor: a recomputed P's exponent s·log2e − lse·log2e carries the fp32 rounding of scores of
    # this size (ulps of 1/8 to 1/2 log2 units here), so P ≈ 1 on a one-hot row is off by several %.
    # The AMX backward measures 4% of |dv| here, the portable AVX-512 one (no AMX: AMD, older Intel;
    # its q·k blocking differs from its forward's) 5%.
    amx = attention_info()["bf16_backward"] in ("amx", "avx512bf16")  # the bf16 dot-product kernels
    rel = 0.05 if amx else 0.07
    for a, r, e in zip(ours, ref16, exact):
        assert torch.isfinite(a).all()
        assert (a.double() - e).norm() <= 2 * (r.double() - e).norm() + rel * max(e.norm().item(), 1.0)


def test_lse_is_a_constant_when_only_v_requires_grad():
    q, k, v = make((1, 6, 2, 8), torch.float32)
    v.requires_grad_()
    out, lse = attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    out.sum().backward()
    assert v.grad is not None
    q.requires_grad_()
    assert attention(q, k, v, return_lse=True)[1].requires_grad


def test_autocast_casts_inputs_like_sdpa():
    """Under torch.autocast, q/k/v go to the autocast dtype as SDPA's inputs do: an fp32 q beside
    bf16 k/v (a torch norm's fp32 output beside Linear outputs) runs, in bf16, with fp32 norm weights."""
    q, k, v = make((2, 20, 2, 16), torch.float32)
    w = torch.rand(16) + 0.5
    with pytest.raises(TypeError, match="'k'"):
        attention(q, k.bfloat16(), v.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k.bfloat16(), v, q_norm_weight=w, k_norm_weight=w, rope_grid=(4, 5))
        want_sdpa = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert got.dtype == want_sdpa.dtype == torch.bfloat16
    b16 = [t.bfloat16() for t in (q, k, v)]
    ref = attention(*b16, q_norm_weight=w, k_norm_weight=w, rope_grid=(4, 5))
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    # fp64 stays fp64 (autocast leaves it alone)
    q64, k64, v64 = make((1, 5, 1, 8), torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention(q64, k64, v64).dtype == torch.float64


def test_sdpa_fallback_matches_reference():
    q, k, v = make((2, 30, 2, 16), torch.float32)
    kw = features(16, 30, 2, torch.float32)
    kw["key_padding_mask"][1] = False
    got = attn_mod._sdpa_fallback(q, k, v, "bnhd", 0.25, kw["q_norm_weight"], kw["k_norm_weight"], 1e-6,
                                  kw["rope_grid"], 10000.0, kw["key_padding_mask"])
    ref = attention_reference(q, k, v, scale=0.25, **kw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_scale(dtype):
    """A negative scale turns the largest scaled score into the smallest raw one; the bf16 AMX path
    takes its running max from the raw scores, so it must take their minimum then."""
    q, k, v = make((1, 130, 2, 64), dtype)
    out, lse = attention(q, k, v, scale=-3.0, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    o64, l64 = attention_reference(q.double(), k.double(), v.double(), scale=-3.0, return_lse=True)
    osd, _ = attention_reference(q, k, v, scale=-3.0, return_lse=True)
    check_close(out, osd, o64, FLOOR[dtype], "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_in_a_key_propagates(dtype):
    """As in SDPA: a NaN key reaches every query's output (it is not a zero-weight key)."""
    q, k, v = make((1, 70, 1, 64), dtype)
    k[0, 5, 0, 3] = float("nan")
    assert attention(q, k, v).isnan().all()


def test_sdpa_fallback_with_mask_compiles_fullgraph():
    q, k, v = make((1, 8, 1, 264), torch.float32)  # Dh > 256: the SDPA path
    m = torch.ones(1, 8, dtype=torch.bool)
    m[0, 3] = False
    assert attention_path(q, k, v, key_padding_mask=m)[0] == "sdpa"
    f = torch.compile(lambda q, k, v, m: attention(q, k, v, key_padding_mask=m), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v, m), attention(q, k, v, key_padding_mask=m))


def test_build_facts_are_compile_constants_without_importing_dynamo():
    """raekern marks its cached build/GPU facts the way torch.compiler.assume_constant_result does, so
    `import raekern` need not import torch._dynamo; this fails if a torch release changes the mark."""
    import subprocess
    import sys

    import torch._dynamo

    A = importlib.import_module("raekern.ops.attention")

    def probe():
        return 0

    marked = torch._dynamo.assume_constant_result(probe)
    assert marked is probe and vars(probe) == {"_dynamo_marked_constant": True}
    for fn in (A._arch_reason, A._smem_reason):
        assert getattr(fn, "_dynamo_marked_constant", False)
    code = ("import sys, raekern.ops, raekern.models, raekern.sampling, raekern.cli; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "importing raekern imports torch._dynamo again (1.5 s per start)"


def test_cuda_eligibility_follows_the_build_archs_and_shared_memory(monkeypatch):
    """Pure host logic (no GPU): which GPUs the compiled images serve, and the forward's shared memory."""
    for archs, runs, refused in (("8.0,9.0a", [(8, 0), (8, 6), (8, 9), (9, 0)], [(10, 0), (12, 0), (7, 5)]),
                                 ("8.0+PTX,9.0a", [(8, 9), (9, 0), (10, 0), (12, 0)], [(7, 5)]),
                                 ("9.0a", [(9, 0)], [(8, 0), (10, 0)])):
        monkeypatch.setattr(attn_mod, "build_info", lambda a=archs: {"cuda_archs": a})
        attn_mod._FACTS.clear()
        assert all(attn_mod._arch_reason(*cc) is None for cc in runs), archs
        assert all("no kernel image" in attn_mod._arch_reason(*cc) for cc in refused), archs
    attn_mod._FACTS.clear()
    smem = {d: torch.ops.raekern.attention_cuda_fwd_smem(d) for d in (64, 72, 128, 136, 256)}
    assert smem[64] < smem[72] < smem[128] <= 99 * 1024 + 3072 < smem[136] == smem[256] <= 227 * 1024
    assert torch.ops.raekern.attention_cuda_fwd_smem(16) == smem[64] and torch.ops.raekern.attention_cuda_fwd_smem(12) == -1


def test_double_backward_is_refused():
    q, k, v = (t.requires_grad_() for t in make((1, 10, 1, 16), torch.float64))
    (g,) = torch.autograd.grad(attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.square().sum(), [q, k, v])


def test_path_introspection_and_debug_log(caplog):
    q, k, v = make((1, 8, 2, 16), torch.float32)
    path, reasons = attention_path(q, k, v)
    assert path == "raekern_cpu" and reasons["raekern_cpu"] is None
    assert "not cuda" in reasons["raekern_cuda"] and reasons["sdpa"] is None
    with caplog.at_level(logging.DEBUG, logger="raekern.attention"):
        attention(q, k, v)
    assert "path=raekern_cpu" in caplog.text
    import raekern.ops
    assert raekern.ops.attention_info is attn_mod.attention_info  # documented under raekern.ops
    info = attn_mod.attention_info()
    assert info["fp32"] in ("avx512", "avx2", "portable")
    assert info["bf16_forward"] in ("amx", "avx512bf16", "avx512", "avx2", "portable")
    assert info["bf16_backward"] == info["bf16_forward"]


def test_opcheck():
    q, k, v = make((2, 10, 2, 8), torch.float32)
    kw = features(8, 10, 2, torch.float32)
    args = (q, k, v, kw["q_norm_weight"].requires_grad_(), kw["k_norm_weight"], kw["key_padding_mask"],
            0.35, 1e-6, 2, 4, 10000.0, 0)
    torch.library.opcheck(torch.ops.raekern.attention.default, args)
    with torch.no_grad():
        out, lse = torch.ops.raekern.attention(*args)
    bargs = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, args[3].detach(), *args[4:], False)
    torch.library.opcheck(torch.ops.raekern.attention_backward.default, bargs)


def test_torch_compile_fullgraph_forward_backward():
    q, k, v = (t.requires_grad_() for t in make((1, 12, 2, 8), torch.float32))
    kw = features(8, 12, 1, torch.float32, mask=False)

    def f(q, k, v):
        return attention(q, k, v, rope_grid=(3, 4), q_norm_weight=kw["q_norm_weight"],
                         k_norm_weight=kw["k_norm_weight"]).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v).backward()
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad)


@pytest.mark.parametrize(
    "kwargs, arg, exc",
    [
        (dict(layout="nbhd"), "layout", ValueError),
        (dict(q_norm_weight=torch.ones(7)), "q_norm_weight", ValueError),
        (dict(k_norm_weight=torch.ones(8, dtype=torch.int32)), "k_norm_weight", TypeError),
        (dict(rope_grid=(0, 4)), "rope_grid", ValueError),
        (dict(rope_grid=4), "rope_grid", ValueError),
        (dict(rope_grid=(3, 4)), "rope_grid", ValueError),  # 12 grid tokens, 10 tokens
        (dict(key_padding_mask=torch.ones(2, 10)), "key_padding_mask", TypeError),
        (dict(key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), "key_padding_mask", ValueError),
        (dict(scale="big"), "scale", TypeError),
        (dict(norm_eps=-1.0), "norm_eps", ValueError),
        (dict(norm_eps=float("nan")), "norm_eps", ValueError),
        (dict(scale=float("nan")), "scale", ValueError),
        (dict(scale=True), "scale", TypeError),
        (dict(rope_grid=(2, 2), rope_theta=float("nan")), "rope_theta", ValueError),
        (dict(rope_grid=(True, 2)), "rope_grid", ValueError),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, arg, exc):
    q, k, v = make((2, 10, 2, 8), torch.float32)
    with pytest.raises(exc, match=f"'{arg}'"):
        attention(q, k, v, **kwargs)


def test_bad_tensors_name_the_argument():
    q, k, v = make((2, 10, 2, 8), torch.float32)
    with pytest.raises(ValueError, match="'k'"):
        attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="'v'"):
        attention(q, k, v[:, :5])
    with pytest.raises(TypeError, match="'v'"):
        attention(q, k, v.double())
    with pytest.raises(TypeError, match="'q'"):
        attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="'q'"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="'rope_grid'"):
        attention(*make((1, 4, 1, 10), torch.float32), rope_grid=(2, 2))
    with pytest.raises(ValueError, match="'qkv'"):
        attention_packed(torch.randn(1, 4, 10), 2)
    with pytest.raises(ValueError, match="'num_heads'"):
        attention_packed(torch.randn(1, 4, 12), 0)
    with pytest.raises(ValueError, match="'key_padding_mask'"):  # the C++ op checks too
        torch.ops.raekern.attention(q, k, v, None, None, torch.ones(3, 10, dtype=torch.bool), 1.0, 1e-6, 0, 0,
                                    1e4, 0)


def _emu_or_skip():
    emu = emulation_library()
    if emu is None or not hasattr(emu, "attention_prologue"):
        pytest.skip("raekern._emu (host emulation of the SIMT attention code) is not built")
    return emu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm, grid", [(True, (4, 4)), (False, (4, 4)), (True, None)])
def test_emulated_simt_prologue(dtype, norm, grid):
    emu = _emu_or_skip()
    x = torch.randn(2, 20, 2, 72).to(dtype)  # tokens 16..19 are past the 4x4 grid
    w = (torch.rand(72) + 0.5) if norm else None
    gh, gw = grid if grid else (0, 0)
    got = emu.attention_prologue(x, w, 1e-6, gh, gw, 10000.0)
    xt = x.double().transpose(1, 2)
    ref = attn_mod.rope_2d_reference(attn_mod.qk_rms_norm_reference(xt, None if w is None else w.double()), grid)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), ref.transpose(1, 2), atol=tol, rtol=tol)


def test_emulated_softmax_epilogue():
    emu = _emu_or_skip()
    m = torch.tensor([0.5, -3.0, float("-inf"), 10.0])
    l = torch.tensor([2.0, 1.0, 0.0, 7.5])
    inv, lse = emu.attention_softmax_finalize(m, l)
    torch.testing.assert_close(inv, torch.tensor([0.5, 1.0, 0.0, 1 / 7.5]))
    exp_lse = (m + torch.log2(l)) * math.log(2.0)
    exp_lse[2] = float("-inf")
    torch.testing.assert_close(lse, exp_lse)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 72, 128])
@pytest.mark.parametrize("n", [1, 257, 268])
def test_cuda_forward_matches_reference(dtype, d, n):
    b, h = 2, 3
    q, k, v = make((b, n, h, d), dtype, device="cuda")
    kw = features(d, n, b, dtype, device="cuda")
    path, reasons = attention_path(q, k, v, **kw)
    if path != "raekern_cuda":
        pytest.skip(f"CUDA kernel not eligible: {reasons['raekern_cuda']}")
    out, lse = attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), return_lse=True, **to64(kw))
    same = attention_reference(q, k, v, **kw)
    check_close(out, same, ref, FLOOR[dtype], "out")
    assert (lse.double() - ref_lse).abs().max() < 1e-2


def test_cuda_attention_mode_parses_the_variable(monkeypatch):
    from raekern.ops.attention import _cuda_attention_mode
    for value, mode in (("", "auto"), ("auto", "auto"), ("1", "on"), ("ON", "on"), ("0", "off"), ("x", "auto")):
        monkeypatch.setenv("RAEKERN_CUDA_ATTENTION", value)
        assert _cuda_attention_mode() == mode, value
    monkeypatch.delenv("RAEKERN_CUDA_ATTENTION")
    assert _cuda_attention_mode() == "auto"


@cuda
def test_cuda_plain_calls_go_to_sdpa_unless_forced(monkeypatch):
    # Measured on an H200: with nothing to fuse SDPA's flash/cuDNN forward is faster than ours.
    q, k, v = make((2, 256, 4, 72), torch.bfloat16, device="cuda")
    monkeypatch.delenv("RAEKERN_CUDA_ATTENTION", raising=False)
    path, reasons = attention_path(q, k, v)
    assert path == "sdpa" and "nothing to fuse" in reasons["raekern_cuda"]
    kw = features(72, 256, 2, torch.bfloat16, device="cuda", mask=False)
    assert attention_path(q, k, v, **kw)[0] == "raekern_cuda"  # QK-norm + RoPE: fused here
    monkeypatch.setenv("RAEKERN_CUDA_ATTENTION", "1")
    assert attention_path(q, k, v)[0] == "raekern_cuda"
    forced = attention(q, k, v)
    monkeypatch.setenv("RAEKERN_CUDA_ATTENTION", "0")
    assert attention_path(q, k, v, **kw)[0] == "sdpa"
    monkeypatch.delenv("RAEKERN_CUDA_ATTENTION")
    ref = attention_reference(q.double(), k.double(), v.double())
    check_close(forced, attention_reference(q, k, v), ref, FLOOR[torch.bfloat16], "out")
    check_close(attention(q, k, v), attention_reference(q, k, v), ref, FLOOR[torch.bfloat16], "out")


# ----------------------------------------------------------------------------- CUDA forward, emulated
def _emu_fwd_or_skip():
    emu = emulation_library()
    if emu is None or not hasattr(emu, "attention"):
        pytest.skip("raekern._emu (host emulation of the CUDA attention forward) is not built")
    return emu


def _emu_fwd_check(emu, q, k, v, kw, layout, scale=None):
    """The sm80 tensor-core forward (mma.sync / ldmatrix / cp.async emulated) against the fp64
    reference, by the flash rule; lse against the fp64 lse."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    gh, gw = kw.get("rope_grid", (0, 0))
    args = (kw.get("q_norm_weight"), kw.get("k_norm_weight"), kw.get("key_padding_mask"), scale, 1e-6, gh, gw,
            1e4, ("bnhd", "bhnd").index(layout))
    out, lse = emu.attention(q, k, v, *args)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), layout=layout, scale=scale,
                                       return_lse=True, **to64(kw))
    same, same_lse = attention_reference(q, k, v, layout=layout, scale=scale, return_lse=True, **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape and lse.dtype == torch.float32
    check_close(out, same, ref, FLOOR[q.dtype], "out")
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    if fin.any():
        check_close(lse[fin], same_lse[fin], ref_lse[fin], 1e-3, "lse")


# (b, nq, nk, h, d, dtype, layout, features)
EMU_FWD_CASES = [
    (1, 70, 70, 2, 64, torch.bfloat16, "bnhd", False),
    (2, 70, 70, 1, 72, torch.float16, "bhnd", False),
    (1, 129, 129, 1, 128, torch.bfloat16, "bnhd", True),  # three key blocks, the last one partial
    (1, 68, 68, 2, 72, torch.bfloat16, "bhnd", True),  # RoPE grid 17x4: later tokens unrotated
    (2, 1, 1, 1, 64, torch.float16, "bnhd", True),  # one token
    (1, 5, 130, 1, 72, torch.float16, "bnhd", True),  # cross attention, Nq < one tile
    (1, 130, 3, 1, 128, torch.bfloat16, "bhnd", False),  # two query tiles, Nk < one tile
    # head dims without an exact config run in a bucket (64, 96, 128, 256)
    (1, 40, 70, 2, 32, torch.bfloat16, "bnhd", True),
    (1, 70, 40, 1, 80, torch.float16, "bhnd", True),
    (1, 33, 65, 1, 96, torch.bfloat16, "bnhd", False),
    (1, 20, 70, 1, 112, torch.bfloat16, "bhnd", True),
    (1, 30, 66, 1, 136, torch.float16, "bnhd", True),
    (1, 17, 65, 1, 256, torch.bfloat16, "bnhd", True),
]


@pytest.fixture(params=["tiles2", "rows16"])
def fwd_tiles(request, monkeypatch):
    """The forward's configs: two 16-row m-tiles per warp (the default) and the measured one-m-tile
    kernel (RAEKERN_ATTENTION_FWD=rows16)."""
    if request.param == "rows16":
        monkeypatch.setenv("RAEKERN_ATTENTION_FWD", "rows16")
    else:
        monkeypatch.delenv("RAEKERN_ATTENTION_FWD", raising=False)
    return request.param


@pytest.mark.parametrize("case", EMU_FWD_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}x{c[4]}-"
                         f"{str(c[5])[6:]}-{c[6]}-{'feat' if c[7] else 'plain'}")
def test_emulated_cuda_forward_matches_reference(case, fwd_tiles):
    emu = _emu_fwd_or_skip()
    b, nq, nk, h, d, dtype, layout, feat = case
    q, _, _ = make((b, nq, h, d), dtype, layout, seed=3)
    _, k, v = make((b, nk, h, d), dtype, layout, seed=4)
    kw = features(d, nk, b, dtype, seed=5, norm=feat, rope=feat, mask=feat)
    if feat and d % 4 == 0:
        kw["rope_grid"] = (max(1, min(nq, nk) // 4), 4) if min(nq, nk) >= 4 else (1, 1)
    _emu_fwd_check(emu, q, k, v, kw, layout, scale=0.8 / math.sqrt(d))


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_emulated_cuda_forward_schedules_and_unaligned_rows(schedule, fwd_tiles):
    """Every thread order between barriers gives the same result (no missing barrier or cp.async
    wait); rows that are not 16-byte aligned take the kernel's element-copy path."""
    emu = _emu_fwd_or_skip()
    emu.set_schedule(schedule, 11)
    try:
        b, n, h, d = 1, 67, 2, 72
        q, k, v = make((b, n, h, d), torch.bfloat16, seed=6)
        kw = features(d, n, b, torch.bfloat16, seed=7)
        kw["rope_grid"] = (8, 8)
        _emu_fwd_check(emu, q, k, v, kw, "bnhd")
        big = torch.randn(b, n, h, d + 1).to(torch.bfloat16)
        q_odd = big[..., 1:]  # every row starts 2 bytes past a 16-byte boundary
        assert q_odd.data_ptr() % 16 != 0
        _emu_fwd_check(emu, q_odd, k, v, kw, "bnhd")
    finally:
        emu.set_schedule("random", 0)


def test_emulated_cuda_forward_nan_key_propagates_to_out_and_lse():
    """A NaN score makes the row sum NaN: out and lse are NaN (not 0 and -inf, a fully masked row)."""
    emu = _emu_fwd_or_skip()
    q, k, v = make((1, 70, 1, 64), torch.bfloat16, seed=3)
    k[0, 5, 0, 3] = float("nan")
    out, lse = emu.attention(q, k, v, None, None, None, 0.125, 1e-6, 0, 0, 1e4, 0)
    assert out.isnan().all() and lse.isnan().all()


def test_emulated_cuda_forward_masked_batch_and_broadcast_mask():
    emu = _emu_fwd_or_skip()
    b, n, h, d = 2, 40, 1, 64
    q, k, v = make((b, n, h, d), torch.bfloat16, seed=8)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0] = False  # batch 0 has no key: out 0, lse -inf
    mask[1, 7:30] = False
    out, lse = emu.attention(q, k, v, None, None, mask, d ** -0.5, 1e-6, 0, 0, 1e4, 0)
    assert torch.all(out[0] == 0) and torch.isinf(lse[0]).all()
    _emu_fwd_check(emu, q, k, v, {"key_padding_mask": mask}, "bnhd")
    one = torch.ones(1, n, dtype=torch.bool)
    one[0, ::3] = False
    _emu_fwd_check(emu, q, k, v, {"key_padding_mask": one.expand(b, n)}, "bnhd")  # stride-0 batch


def test_emulated_cuda_forward_bad_arguments_name_the_argument():
    emu = _emu_fwd_or_skip()
    q, k, v = make((1, 8, 1, 64), torch.float32)
    with pytest.raises(ValueError, match="'q' must be bfloat16 or float16"):
        emu.attention(q, k, v, None, None, None, 0.125, 1e-6, 0, 0, 1e4, 0)
    q, k, v = make((1, 8, 1, 36), torch.bfloat16)
    with pytest.raises(ValueError, match="'q'.*head dim 36 is not a multiple of 8 up to 256"):
        emu.attention(q, k, v, None, None, None, 0.125, 1e-6, 0, 0, 1e4, 0)


# ----------------------------------------------------------------------------- CUDA backward, emulated
def _emu_bwd_or_skip():
    emu = emulation_library()
    if emu is None or not hasattr(emu, "attention_bwd"):
        pytest.skip("raekern._emu (host emulation of the CUDA attention backward) is not built")
    return emu


def _bwd_problem(b, nq, nk, h, d, dtype, layout, norm, rope, mask, dlse, seed=0):
    """Inputs of attention_backward with out / lse from the CPU forward, plus the fp64 reference
    gradients of sum(out·g) + sum(lse·gl) (the same q, k, v, weights widened to fp64)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make((b, nq, h, d), dtype, layout, seed=seed, nk=nk)
    kw = features(d, nk, b, dtype, seed=seed + 1, norm=norm, rope=rope, mask=mask)
    if rope and d % 4 == 0:
        kw["rope_grid"] = (2, 3) if max(nq, nk) > 6 else (1, 1)  # later tokens unrotated
    qw, kw_, m = kw.get("q_norm_weight"), kw.get("k_norm_weight"), kw.get("key_padding_mask")
    gh, gw = kw.get("rope_grid", (0, 0))
    scale = 0.7 / math.sqrt(d)
    li = ("bnhd", "bhnd").index(layout)
    out, lse = torch.ops.raekern.attention(q, k, v, qw, kw_, m, scale, 1e-6, gh, gw, 1e4, li)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    gl = torch.randn(lse.shape, generator=gen, dtype=torch.float64).float() if dlse else None
    args = (g, gl, q, k, v, out, lse, qw, kw_, m, scale, 1e-6, gh, gw, 1e4, li)

    leaves = [t.double().requires_grad_() if t is not None else None for t in (q, k, v, qw, kw_)]
    o64, l64 = attention_reference(*leaves[:3], layout=layout, scale=scale, q_norm_weight=leaves[3],
                                   k_norm_weight=leaves[4], norm_eps=1e-6, key_padding_mask=m,
                                   rope_grid=kw.get("rope_grid"), rope_theta=1e4, return_lse=True)
    loss = (o64 * g.double()).sum()
    if gl is not None:
        loss = loss + (l64.masked_fill(torch.isinf(l64), 0.0) * gl.double()).sum()
    loss.backward()
    ref = [t.grad if t is not None else None for t in leaves]
    return args, ref


GRAD_NAMES = ("dq", "dk", "dv", "dq_norm_weight", "dk_norm_weight")

# (b, nq, nk, h, d, dtype, layout, norm, rope, mask, grad_lse)
EMU_BWD_CASES = [
    (1, 1, 1, 1, 8, torch.float32, "bnhd", False, False, False, False),
    (2, 5, 5, 2, 8, torch.float32, "bhnd", True, True, True, True),
    (1, 37, 37, 2, 72, torch.float32, "bnhd", True, True, True, True),
    (1, 37, 37, 1, 72, torch.bfloat16, "bhnd", True, True, True, True),
    (2, 37, 37, 1, 64, torch.float32, "bhnd", False, True, False, True),
    (1, 37, 37, 1, 64, torch.bfloat16, "bnhd", True, False, True, False),
    (1, 5, 70, 1, 8, torch.float32, "bnhd", True, True, True, True),  # two key blocks, cross attention
    (1, 9, 37, 1, 136, torch.float32, "bhnd", True, True, False, True),  # Dh bucket 256: three key blocks
    (1, 7, 9, 2, 10, torch.float32, "bnhd", True, False, True, True),  # Dh 10: not a multiple of 8
    (1, 5, 5, 1, 8, torch.float16, "bnhd", True, True, True, True),
]


# The tensor-core mainloop (bf16/fp16, Dh 64/72/128): odd lengths, several key and query blocks.
EMU_BWD_TC_CASES = [
    (1, 37, 37, 1, 72, torch.bfloat16, "bhnd", True, True, True, True),
    (1, 37, 37, 1, 64, torch.bfloat16, "bnhd", True, False, True, False),
    (2, 70, 130, 2, 64, torch.float16, "bnhd", False, False, False, True),  # 2 query x 3 key blocks
    (1, 65, 65, 1, 128, torch.bfloat16, "bnhd", True, True, True, True),
    (1, 3, 66, 2, 72, torch.float16, "bhnd", True, True, True, False),  # cross attention
    # head dims without an exact config run in a bucket (64, 96, 128)
    (1, 37, 70, 1, 32, torch.bfloat16, "bnhd", True, True, True, True),
    (1, 70, 37, 1, 80, torch.float16, "bhnd", True, True, False, True),
    (1, 33, 33, 2, 96, torch.bfloat16, "bnhd", False, False, True, False),
    (1, 40, 65, 1, 112, torch.bfloat16, "bhnd", True, True, True, True),
]


def _bwd_id(c):
    return f"{c[0]}x{c[1]}x{c[2]}x{c[3]}x{c[4]}-{str(c[5])[6:]}-{c[6]}-n{int(c[7])}r{int(c[8])}m{int(c[9])}l{int(c[10])}"


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case,mainloop", [(c, 1) for c in EMU_BWD_CASES] + [(c, 2) for c in EMU_BWD_TC_CASES],
                         ids=lambda x: _bwd_id(x) if isinstance(x, tuple) else ("simt", "tc")[x - 1])
def test_emulated_cuda_backward_matches_reference(case, mainloop, deterministic):
    emu = _emu_bwd_or_skip()
    b, nq, nk, h, d, dtype, layout, norm, rope, mask, dlse = case
    args, ref = _bwd_problem(b, nq, nk, h, d, dtype, layout, norm, rope, mask, dlse)
    got = emu.attention_bwd(*args, deterministic, 0, mainloop)
    cpu = torch.ops.raekern.attention_backward(*args, deterministic)
    for name, a, c, r in zip(GRAD_NAMES, got, cpu, ref):
        if r is None:
            assert a.numel() == 0 and c.numel() == 0, name
            continue
        assert a.shape == c.shape and a.dtype == c.dtype and a.is_contiguous(), name
        assert torch.isfinite(a).all(), name
        scale = max(1.0, r.abs().max().item())
        # the CPU op (same fp32 accumulation, same low-precision out / lse) is the same-dtype reference
        check_close(a, c, r, GRAD_FLOOR[dtype] * scale, name)


def test_emulated_cuda_backward_masked_batch_and_strided_inputs():
    emu = _emu_bwd_or_skip()
    b, n, h, d = 2, 9, 2, 16
    qkv = torch.randn(b, n, 3, h, d)
    q, k, v = qkv.unbind(2)  # strided views of a packed projection
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0] = False  # batch 0 attends to nothing: zero output, lse -inf, zero gradients
    mask[1, 4:] = False
    qw, kw = torch.rand(d) + 0.5, torch.rand(d) + 0.5
    out, lse = torch.ops.raekern.attention(q, k, v, qw, kw, mask, 0.25, 1e-6, 2, 4, 1e4, 0)
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    args = (g, gl, q, k, v, out, lse, qw, kw, mask, 0.25, 1e-6, 2, 4, 1e4, 0)
    for det in (False, True):
        got = emu.attention_bwd(*args, det)
        cpu = torch.ops.raekern.attention_backward(*args, det)
        for name, a, c in zip(GRAD_NAMES, got, cpu):
            torch.testing.assert_close(a, c, atol=2e-5, rtol=2e-5, msg=name)
        assert torch.all(got[0][0] == 0) and torch.all(got[1][0] == 0) and torch.all(got[2][0] == 0)
        assert torch.all(got[1][1, 4:] == 0) and torch.all(got[2][1, 4:] == 0)  # masked keys


def test_emulated_cuda_tensor_core_backward_choice_and_determinism():
    """mainloop=0 takes the tensor cores exactly where they apply (bf16/fp16, Dh 64/72/128, 16-byte
    aligned v and grad_out rows); their deterministic mode is bit-identical across schedules and
    key blocks per CTA."""
    emu = _emu_bwd_or_skip()
    args, _ = _bwd_problem(1, 40, 150, 2, 72, torch.bfloat16, "bnhd", True, True, True, True, seed=9)
    auto, tc, simt = (emu.attention_bwd(*args, True, 0, m) for m in (0, 2, 1))
    for name, a, t, s_ in zip(GRAD_NAMES, auto, tc, simt):
        assert torch.equal(a, t), name
        assert not torch.equal(a, s_) or a.numel() == 0, name  # a different mainloop really ran
    try:
        emu.set_schedule("reverse", 0)
        again = emu.attention_bwd(*args, True, 0, 2)
        emu.set_schedule("random", 3)
        grouped = emu.attention_bwd(*args, True, 2, 2)  # two key blocks per CTA: same order
    finally:
        emu.set_schedule("random", 0)
    for name, a, b_, c in zip(GRAD_NAMES, tc, again, grouped):
        assert torch.equal(a, b_) and torch.equal(a, c), name
    # v rows 2 bytes off a 16-byte boundary: auto falls back to SIMT, mainloop=2 is refused
    g, gl, q, k, v = args[:5]
    v_odd = torch.cat([torch.zeros_like(v[..., :1]), v], -1)[..., 1:]
    odd = (g, gl, q, k, v_odd) + args[5:]
    fallback = emu.attention_bwd(*odd, True, 0, 0)
    for name, a, s_ in zip(GRAD_NAMES, fallback, emu.attention_bwd(*odd, True, 0, 1)):
        assert torch.equal(a, s_), name
    with pytest.raises(ValueError, match="tensor-core backward needs"):
        emu.attention_bwd(*odd, True, 0, 2)
    with pytest.raises(ValueError, match="'mainloop'"):
        emu.attention_bwd(*args, True, 0, 3)


def test_emulated_cuda_backward_deterministic_is_bit_identical():
    emu = _emu_bwd_or_skip()
    # three key blocks (Dh bucket 256 has 16-key blocks), several slabs
    args, _ = _bwd_problem(1, 6, 40, 2, 132, torch.float32, "bnhd", True, True, True, True, seed=5)
    try:
        emu.set_schedule("random", 7)
        first = emu.attention_bwd(*args, True)
        emu.set_schedule("reverse", 0)
        second = emu.attention_bwd(*args, True)
    finally:
        emu.set_schedule("forward", 0)
    # two key blocks per CTA: fewer slabs, same summation order
    grouped = emu.attention_bwd(*args, True, 2)
    atomic = emu.attention_bwd(*args, False)
    for name, a, b_, c, e in zip(GRAD_NAMES, first, second, grouped, atomic):
        assert torch.equal(a, b_), name
        assert torch.equal(a, c), name
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype, mainloop", [(torch.bfloat16, 1), (torch.bfloat16, 2), (torch.float32, 1)])
def test_emulated_cuda_masked_keys_holding_nan_stay_out(dtype, mainloop):
    """Masked keys are left out of the sums, not weighted by 0: padding that holds NaN/inf (torch.empty)
    must not reach out, lse or any gradient (the CPU kernels skip those keys)."""
    b, nq, nk, h, d = 1, 6, 70, 1, 64
    q, k, v = make((b, nq, h, d), dtype, seed=12, nk=nk)
    mask = torch.ones(b, nk, dtype=torch.bool)
    mask[0, [3, 66]] = False
    k, v = k.clone(), v.clone()
    v[0, 3], k[0, 66] = float("nan"), float("inf")
    out, lse = torch.ops.raekern.attention(q, k, v, None, None, mask, d ** -0.5, 1e-6, 0, 0, 1e4, 0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    keep = mask[0]
    same = attention_reference(q, k[:, keep], v[:, keep], layout="bnhd")
    ref = attention_reference(q.double(), k[:, keep].double(), v[:, keep].double(), layout="bnhd")
    check_close(out, same, ref, FLOOR[dtype], "out")
    if dtype != torch.float32:
        emu = _emu_fwd_or_skip()
        eo, el = emu.attention(q, k, v, None, None, mask, d ** -0.5, 1e-6, 0, 0, 1e4, 0)
        assert torch.isfinite(eo).all() and torch.isfinite(el).all()
        torch.testing.assert_close(eo.float(), out.float(), atol=FLOOR[dtype], rtol=0)
    emu = _emu_bwd_or_skip()
    g = torch.randn(out.shape).to(dtype)
    args = (g, None, q, k, v, out, lse, None, None, mask, d ** -0.5, 1e-6, 0, 0, 1e4, 0)
    cpu = torch.ops.raekern.attention_backward(*args, False)
    got = emu.attention_bwd(*args, False, 0, mainloop)
    for name, a, c in zip(GRAD_NAMES[:3], got, cpu):
        assert torch.isfinite(c).all() and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.float(), c.float(), atol=GRAD_FLOOR[dtype], rtol=0, msg=name)
    assert torch.all(got[1][0, [3, 66]] == 0) and torch.all(got[2][0, [3, 66]] == 0)


def test_emulated_cuda_backward_bad_arguments_name_the_argument():
    emu = _emu_bwd_or_skip()
    args, _ = _bwd_problem(1, 5, 5, 1, 8, torch.float32, "bnhd", False, False, False, False)
    with pytest.raises(ValueError, match="'q'"):
        emu.attention_bwd(*(a.double() if isinstance(a, torch.Tensor) and i in (0, 2, 3, 4, 5) else a
                            for i, a in enumerate(args)), False)
    with pytest.raises(ValueError, match="'lse'"):
        emu.attention_bwd(*args[:6], args[6][:, :, :3], *args[7:], False)
    with pytest.raises(ValueError, match="'grad_out'"):
        emu.attention_bwd(args[0][:, :4], *args[1:], False)


# ----------------------------------------------------------------------------- CUDA backward on a GPU
def _cuda_backward_or_skip():
    if not attn_mod._has_kernel("CUDA", "raekern::attention_backward"):
        pytest.skip("raekern was built without the CUDA attention backward")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 72, 128])
@pytest.mark.parametrize("n", [1, 37, 268])
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_cuda_training_matches_reference(dtype, d, n, layout, monkeypatch):
    _cuda_backward_or_skip()
    monkeypatch.setenv("RAEKERN_CUDA_ATTENTION_BACKWARD", "1")  # by default training goes to SDPA
    b, h = 2, 3
    q, k, v = make((b, n, h, d), dtype, layout, device="cuda")
    kw = features(d, n, b, dtype, device="cuda")
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).cuda()

    def grads(fn, q, k, v, kw):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, kw["q_norm_weight"], kw["k_norm_weight"])]
        kw2 = dict(kw, q_norm_weight=leaves[3], k_norm_weight=leaves[4])
        if fn is attention:
            path, reasons = attention_path(*leaves[:3], layout=layout, **kw2)
            if path != "raekern_cuda":
                pytest.skip(f"CUDA kernels not eligible: {reasons['raekern_cuda']}")
        out = fn(*leaves[:3], layout=layout, **kw2)
        out.backward(g.to(out.dtype))
        return [t.grad for t in leaves]

    got = grads(attention, q, k, v, kw)
    same = grads(attention_reference, q, k, v, kw)
    ref = grads(attention_reference, q.double(), k.double(), v.double(), to64(kw))
    for name, a, s, r in zip(GRAD_NAMES, got, same, ref):
        scale = max(1.0, r.abs().max().item())
        check_close(a, s, r, GRAD_FLOOR[dtype] * scale, name)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [8, 72, 136, 256])
def test_cuda_backward_op_matches_cpu_and_is_deterministic(dtype, d):
    _cuda_backward_or_skip()
    args, ref = _bwd_problem(2, 70, 70, 2, d, dtype, "bnhd", True, True, True, True, seed=4)
    dev = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    cpu = torch.ops.raekern.attention_backward(*args, False)
    atomic = torch.ops.raekern.attention_backward(*dev, False)
    det = [torch.ops.raekern.attention_backward(*dev, True) for _ in range(2)]
    for i, name in enumerate(GRAD_NAMES):
        if ref[i] is None:
            continue
        scale = max(1.0, ref[i].abs().max().item())
        check_close(atomic[i].cpu(), cpu[i], ref[i], GRAD_FLOOR[dtype] * scale, name)
        check_close(det[0][i].cpu(), cpu[i], ref[i], GRAD_FLOOR[dtype] * scale, name)
        assert torch.equal(det[0][i], det[1][i]), f"{name}: deterministic mode differs between runs"


@cuda
def test_cuda_training_deterministic_mode_is_bit_identical():
    _cuda_backward_or_skip()
    q, k, v = make((2, 268, 4, 72), torch.bfloat16, device="cuda")
    kw = features(72, 268, 2, torch.bfloat16, device="cuda")
    if attention_path(q, k, v, **kw)[0] != "raekern_cuda":
        pytest.skip("CUDA kernels not eligible")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (q, k, v, kw["q_norm_weight"], kw["k_norm_weight"])]
            out = attention(*leaves[:3], **dict(kw, q_norm_weight=leaves[3], k_norm_weight=leaves[4]))
            out.float().square().sum().backward()
            runs.append([t.grad for t in leaves])
    finally:
        torch.use_deterministic_algorithms(prev)
    for name, a, b_ in zip(GRAD_NAMES, *runs):
        assert torch.equal(a, b_), name


# ----------------------------------------------------------------------------- the emulation against the GPU
@cuda
@pytest.mark.parametrize("d", [64, 72, 96, 128])
def test_cuda_kernels_agree_with_their_emulation(d):
    """The same inputs through the real CUDA kernels and through the host emulation of the same
    source (tensor-core instructions emulated from their PTX definitions): they differ only by the
    tensor cores' internal rounding, so this validates the emulation the CPU-only CI relies on."""
    emu = emulation_library()
    if emu is None or not hasattr(emu, "attention") or not attn_mod._has_kernel("CUDA"):
        pytest.skip("needs both the CUDA build and raekern._emu")
    b, n, h = 2, 131, 2
    q, k, v = make((b, n, h, d), torch.bfloat16, seed=21)
    kw = features(d, n, b, torch.bfloat16, seed=22)
    kw["rope_grid"] = (8, 8)
    gh, gw = kw["rope_grid"]
    args = (kw["q_norm_weight"], kw["k_norm_weight"], kw["key_padding_mask"], d ** -0.5, 1e-6, gh, gw, 1e4, 0)
    out_e, lse_e = emu.attention(q, k, v, *args)
    dev = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    out_g, lse_g = torch.ops.raekern.attention(dev(q), dev(k), dev(v), *map(dev, args))
    # a bf16 rounding step or two of the output, 1e-3 in lse
    torch.testing.assert_close(out_g.cpu().float(), out_e.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_g.cpu(), lse_e, atol=1e-3, rtol=1e-4)
    if d in (64, 72, 128):  # the tensor-core backward
        g = torch.randn(out_e.shape, generator=torch.Generator().manual_seed(23)).to(torch.bfloat16)
        bargs = (g, None, q, k, v, out_e, lse_e, *args, True)
        got_e = emu.attention_bwd(*bargs, 0, 2)
        got_g = torch.ops.raekern.attention_backward(*map(dev, bargs))
        for name, a, c in zip(GRAD_NAMES, got_g, got_e):
            scale = max(1.0, c.abs().max().item())
            torch.testing.assert_close(a.cpu().float(), c.float(), atol=3e-2 * scale, rtol=3e-2, msg=name)


def test_numpy_scalar_arguments_are_accepted():
    np = pytest.importorskip("numpy")
    q, k, v = make((1, 16, 2, 8), torch.float32, seed=2)
    want = attention(q, k, v, scale=0.3, rope_grid=(4, 4), rope_theta=100.0)
    got = attention(q, k, v, scale=np.float32(0.3), rope_grid=(np.int64(4), np.int32(4)), rope_theta=np.float32(100.0))
    torch.testing.assert_close(got, want)
