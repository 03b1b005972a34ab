"""Norm family (DESIGN §3.1): every op against its plain-PyTorch reference, gradients, layouts,
opcheck, torch.compile, and argument errors."""
import pytest
import torch

from raekern import ops as R

TOL = {  # (rtol, atol) of the forward outputs against the reference
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (1.6e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
SHAPES = [(2, 1, 24), (1, 257, 40), (2, 268, 13), (3, 7, 1152)]
LAYOUTS = ["sample", "token", "flat2d", "shared", "expand"]


def _mod(layout: str, B: int, N: int, D: int, dtype, k: int = 3, grad: bool = False):
    """k modulation operands in the layouts a DiT produces (adaLN chunks are non-contiguous views)."""
    if layout == "sample":  # chunks of a [B, 1, k*D] adaLN output
        base = torch.randn(B, 1, k * D, dtype=dtype)
    elif layout == "token":  # chunks of a per-token [B, N, k*D] adaLN output
        base = torch.randn(B, N, k * D, dtype=dtype)
    elif layout == "flat2d":  # [B, D] per sample, as chunks of [B, k*D]
        base = torch.randn(B, k * D, dtype=dtype)
    elif layout == "shared":  # [D]
        base = torch.randn(k * D, dtype=dtype)
    else:  # stride-0 broadcast over batch and tokens
        base = torch.randn(1, 1, k * D, dtype=dtype).expand(B, N, k * D)
    base = base * 0.5
    if grad:
        base = base.detach().requires_grad_()
    return base, list(base.chunk(k, dim=-1))


def _close(a, b, dtype, what=""):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _grad_close(a, b, dtype, what=""):
    assert a is not None and b is not None, what
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item() + 1e-6
    assert err <= GRAD_TOL[dtype] * scale, f"{what}: max err {err} vs scale {scale}"


# ---------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_plain_norms(dtype, shape):
    x = torch.randn(*shape, dtype=dtype) * 2 + 0.5
    D = shape[-1]
    w, b = torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype)
    _close(R.rms_norm(x), R.rms_norm_reference(x), dtype, "rms")
    _close(R.rms_norm(x, w), R.rms_norm_reference(x, w), dtype, "rms w")
    _close(R.layer_norm(x), R.layer_norm_reference(x), dtype, "ln")
    _close(R.layer_norm(x, w, b, eps=1e-5), R.layer_norm_reference(x, w, b, eps=1e-5), dtype, "ln wb")
    _close(R.layer_norm(x, None, b), R.layer_norm_reference(x, None, b), dtype, "ln b")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_modulate_and_fused_pair(dtype, layout, kind):
    for B, N, D in SHAPES[:3]:
        x, y = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
        _, (shift, scale, gate) = _mod(layout, B, N, D, dtype)
        w = torch.randn(D, dtype=dtype)
        b = torch.randn(D, dtype=dtype) if kind == "layer" else None
        kw = dict(kind=kind, weight=w, bias=b)
        _close(R.norm_modulate(x, shift, scale, **kw), R.norm_modulate_reference(x, shift, scale, **kw), dtype)
        _close(R.gated_residual(x, gate, y), R.gated_residual_reference(x, gate, y), dtype)
        xo, out = R.gated_residual_norm_modulate(x, gate, y, shift, scale, **kw)
        xr, outr = R.gated_residual_norm_modulate_reference(x, gate, y, shift, scale, **kw)
        _close(xo, xr, dtype, "x_out")
        _close(out, outr, dtype, "out")
        assert xo.is_contiguous() and out.is_contiguous()


def test_fp32_weight_with_bf16_activations():
    x = torch.randn(2, 9, 48, dtype=torch.bfloat16)
    _, (shift, scale) = _mod("sample", 2, 9, 48, torch.bfloat16, k=2)
    w = torch.randn(48, requires_grad=True)
    out = R.norm_modulate(x, shift, scale, kind="rms", weight=w)
    _close(out, R.norm_modulate_reference(x, shift, scale, kind="rms", weight=w), torch.bfloat16)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32


def test_autocast_promotes_mixed_operands():
    """Under torch.autocast a Linear's bf16 output (adaLN chunk, branch y) meets the fp32 residual
    stream: the ops promote as eager PyTorch does; outside autocast the mismatch is an error."""
    x = torch.randn(2, 9, 48)
    gate, y, shift, scale = (torch.randn(2, 9, 48).to(torch.bfloat16) for _ in range(4))
    with pytest.raises(TypeError, match="'shift'"):
        R.norm_modulate(x, shift, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = R.norm_modulate(x, shift, scale)
        x_out, h = R.gated_residual_norm_modulate(x, gate, y, shift, scale, kind="rms")
        r = R.gated_residual(x, gate, y)
    f = lambda t: t.float()  # noqa: E731
    assert out.dtype == x_out.dtype == h.dtype == r.dtype == torch.float32
    _close(out, R.norm_modulate_reference(x, f(shift), f(scale)), torch.float32)
    _close(r, R.gated_residual_reference(x, f(gate), f(y)), torch.float32)
    want = R.gated_residual_norm_modulate_reference(x, f(gate), f(y), f(shift), f(scale), kind="rms")
    _close(x_out, want[0], torch.float32)
    _close(h, want[1], torch.float32)


def test_outputs_that_do_not_depend_on_grad_inputs_say_so():
    """x_out = x + gate·y does not depend on shift/scale: with only those requiring grad it is a
    constant (requires_grad False), and the normalised output still trains them."""
    x, gate, y, shift, scale = (torch.randn(2, 5, 16) for _ in range(5))
    shift.requires_grad_()
    x_out, h = R.gated_residual_norm_modulate(x, gate, y, shift, scale)
    assert not x_out.requires_grad and h.requires_grad
    h.sum().backward()
    assert shift.grad is not None
    y.requires_grad_()
    x_out, h = R.gated_residual_norm_modulate(x, gate, y, shift, scale)
    assert x_out.requires_grad and h.requires_grad


def test_meta_tensors():
    # Shapes only (a model built on the meta device): no autocast query on a device that has none.
    x, y = torch.randn(2, 9, 16, device="meta"), torch.randn(2, 9, 16, device="meta")
    s = torch.randn(2, 1, 16, device="meta")
    assert R.norm_modulate(x, s, s).shape == x.shape
    assert R.gated_residual(x, s, y).shape == x.shape
    assert [t.shape for t in R.gated_residual_norm_modulate(x, s, y, s, s)] == [x.shape, x.shape]


def test_double_backward_is_refused():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    for fn in (R.rms_norm, R.layer_norm):
        (g,) = torch.autograd.grad(fn(x).pow(3).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(g.pow(2).sum(), x)


def test_noncontiguous_and_stride0_inputs():
    B, N, D = 3, 11, 40
    big = torch.randn(B, 2 * N, D + 8)
    x = big[:, ::2, 4 : 4 + D]  # strided tokens, offset features
    y = torch.randn(1, 1, D).expand(B, N, D)  # stride 0
    xt = torch.randn(B, D, N).transpose(1, 2)  # feature stride != 1
    _, (shift, scale, gate) = _mod("token", B, N, D, torch.float32)
    for xx in (x, xt):
        _close(R.rms_norm(xx), R.rms_norm_reference(xx), torch.float32)
        _close(R.layer_norm(xx), R.layer_norm_reference(xx), torch.float32)
        xo, out = R.gated_residual_norm_modulate(xx, gate, y, shift, scale, kind="layer")
        xr, outr = R.gated_residual_norm_modulate_reference(xx, gate, y, shift, scale, kind="layer")
        _close(xo, xr, torch.float32)
        _close(out, outr, torch.float32)
    x4 = torch.randn(2, 3, 5, 16)[..., ::2, :]  # >3-D, non-contiguous leading dims
    _close(R.layer_norm(x4), R.layer_norm_reference(x4), torch.float32)
    v = torch.randn(16)
    _close(R.rms_norm(v), R.rms_norm_reference(v), torch.float32)  # 1-D


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_outputs(dtype):
    """Outputs past the CPU kernel's streaming-store threshold (8 MiB) take the non-temporal path."""
    B, N, D = 4, 512, 1024
    x, y = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    _, (shift, scale, gate) = _mod("sample", B, N, D, dtype)
    xo, out = R.gated_residual_norm_modulate(x, gate, y, shift, scale, kind="rms")
    xr, outr = R.gated_residual_norm_modulate_reference(x, gate, y, shift, scale, kind="rms")
    _close(xo, xr, dtype, "x_out")
    _close(out, outr, dtype, "out")
    _close(R.gated_residual(x, gate, y), xr, dtype, "gated_residual")


def test_adaln_chunks_are_read_in_place():
    """The kernel takes the chunks' strides: results equal those of contiguous copies."""
    B, N, D = 2, 5, 24
    ada = torch.randn(B, 6 * D)
    chunks = ada.chunk(6, dim=-1)
    assert not chunks[0].is_contiguous()
    x, y = torch.randn(B, N, D), torch.randn(B, N, D)
    a = R.gated_residual_norm_modulate(x, chunks[2], y, chunks[0], chunks[1], kind="rms")
    b = R.gated_residual_norm_modulate(x, chunks[2].contiguous(), y, chunks[0].contiguous(),
                                       chunks[1].contiguous(), kind="rms")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- backward

def _fused_inputs(layout, B, N, D, dtype, kind, grad=True):
    x = torch.randn(B, N, D, dtype=dtype, requires_grad=grad)
    y = torch.randn(B, N, D, dtype=dtype, requires_grad=grad)
    base, (shift, scale, gate) = _mod(layout, B, N, D, dtype, grad=grad)
    w = (torch.randn(D, dtype=dtype) * 0.5 + 1).requires_grad_(grad)
    b = (torch.randn(D, dtype=dtype) * 0.1).requires_grad_(grad) if kind == "layer" else None
    return x, y, base, shift, scale, gate, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_backward_matches_reference(dtype, layout, kind):
    B, N, D = 2, 37, 72
    x, y, base, shift, scale, gate, w, b = _fused_inputs(layout, B, N, D, dtype, kind)
    leaves = [t for t in (x, y, base, w, b) if t is not None]
    gxo, gout = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)

    def grads(fn):
        xo, out = fn(x, gate, y, shift, scale, kind=kind, weight=w, bias=b)
        return torch.autograd.grad([xo, out], leaves, [gxo, gout])

    for got, want, name in zip(grads(R.gated_residual_norm_modulate),
                               grads(R.gated_residual_norm_modulate_reference), "x y adaLN w b".split()):
        _grad_close(got, want, dtype, f"fused d{name}")

    def grads_nm(fn):
        return torch.autograd.grad(fn(x, shift, scale, kind=kind, weight=w, bias=b), [x, base, w], gout)

    for got, want, name in zip(grads_nm(R.norm_modulate), grads_nm(R.norm_modulate_reference), "x adaLN w".split()):
        _grad_close(got, want, dtype, f"norm_modulate d{name}")

    def grads_gr(fn):
        return torch.autograd.grad(fn(x, gate, y), [x, y, base], gxo)

    for got, want, name in zip(grads_gr(R.gated_residual), grads_gr(R.gated_residual_reference), "x y adaLN".split()):
        _grad_close(got, want, dtype, f"gated_residual d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_norm_backward(dtype):
    x = torch.randn(3, 257, 40, dtype=dtype, requires_grad=True)
    w = torch.randn(40, dtype=dtype, requires_grad=True)
    b = torch.randn(40, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 257, 40, dtype=dtype)
    for fn, ref, args in [(R.rms_norm, R.rms_norm_reference, (x, w)), (R.layer_norm, R.layer_norm_reference, (x, w, b)),
                          (R.layer_norm, R.layer_norm_reference, (x,))]:
        for got, want in zip(torch.autograd.grad(fn(*args), args, g), torch.autograd.grad(ref(*args), args, g)):
            _grad_close(got, want, dtype, fn.__name__)


@pytest.mark.parametrize("used", ["x_out", "out"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["sample", "token"])
def test_fused_pair_with_one_output_used(used, dtype, layout):
    """Only one output's gradient: the backward runs without grad_out (or without grad_x_out); fp32 and
    bf16 take the vectorised CPU rows, fp64 the generic ones."""
    x, y, base, shift, scale, gate, w, _ = _fused_inputs(layout, 2, 9, 40, dtype, "rms")
    leaves = [x, y, base, w]

    def grads(fn):
        xo, out = fn(x, gate, y, shift, scale, kind="rms", weight=w)
        return torch.autograd.grad((xo if used == "x_out" else out).sum(), leaves, allow_unused=True)

    for got, want in zip(grads(R.gated_residual_norm_modulate), grads(R.gated_residual_norm_modulate_reference)):
        if want is None:  # None as in the unfused pair, not zeros (optimisers skip None, not 0)
            assert got is None
        elif dtype == torch.float64:
            torch.testing.assert_close(got, want)
        else:
            _grad_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["sample", "token"])
def test_backward_large_outputs(dtype, layout):
    """Gradients past the CPU backward's streaming-store threshold (8 MiB of outputs, rows a multiple
    of 64 bytes) take the non-temporal path."""
    B, N, D = 4, 512, 1024
    x, y, base, shift, scale, gate, w, _ = _fused_inputs(layout, B, N, D, dtype, "rms")
    gxo, gout = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)

    def grads(fn):
        xo, out = fn(x, gate, y, shift, scale, kind="rms", weight=w)
        return torch.autograd.grad([xo, out], [x, y, base, w], [gxo, gout])

    for got, want, name in zip(grads(R.gated_residual_norm_modulate),
                               grads(R.gated_residual_norm_modulate_reference), "x y adaLN w".split()):
        _grad_close(got, want, dtype, f"d{name}")


def test_backward_strided_feature_dim():
    """Inputs whose feature stride is not 1 take the CPU backward's generic (non-vectorised) rows."""
    B, N, D = 2, 11, 40
    x = torch.randn(B, D, N).transpose(1, 2).requires_grad_()
    base = (torch.randn(B, 1, 2 * D) * 0.5).requires_grad_()
    shift, scale = base.chunk(2, dim=-1)
    w = torch.randn(D, requires_grad=True)
    g = torch.randn(B, D, N).transpose(1, 2)
    for kind in ("layer", "rms"):
        got = torch.autograd.grad(R.norm_modulate(x, shift, scale, kind=kind, weight=w), [x, base, w], g)
        want = torch.autograd.grad(R.norm_modulate_reference(x, shift, scale, kind=kind, weight=w), [x, base, w], g)
        for a, e, name in zip(got, want, "x adaLN w".split()):
            _grad_close(a, e, torch.float32, f"{kind} d{name}")


@pytest.mark.parametrize("layout", ["sample", "token", "shared", "flat2d"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gradcheck_fp64(layout, kind):
    B, N, D = 2, 3, 5
    x, y, base, shift, scale, gate, w, b = _fused_inputs(layout, B, N, D, torch.float64, kind)
    gc = torch.autograd.gradcheck

    def fused(x, y, base, w, b):
        sh, sc, g = base.chunk(3, dim=-1)
        return R.gated_residual_norm_modulate(x, g, y, sh, sc, kind=kind, weight=w, bias=b)

    def modulate(x, base, w, b):
        sh, sc, _ = base.chunk(3, dim=-1)
        return R.norm_modulate(x, sh, sc, kind=kind, weight=w, bias=b)

    def residual(x, y, base):
        return R.gated_residual(x, base.chunk(3, dim=-1)[2], y)

    # fast_mode: gradcheck of random projections (the full Jacobian check runs once per kind below)
    assert gc(fused, (x, y, base, w, b), fast_mode=layout != "token")
    assert gc(modulate, (x, base, w, b), fast_mode=True)
    assert gc(residual, (x, y, base), fast_mode=True)


def test_gradcheck_fp64_plain_and_token_broadcast():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(R.rms_norm, (x, w))
    assert torch.autograd.gradcheck(R.rms_norm, (x,))
    assert torch.autograd.gradcheck(R.layer_norm, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, b: R.layer_norm(x, None, b), (x, b))
    # [1, N, D] operands (shared across the batch, per token)
    sh = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: R.norm_modulate(x, s, s * 2, kind="rms"), (x, sh))


# ---------------------------------------------------------------------------------- op contract

def _opcheck_cases():
    B, N, D = 2, 5, 12
    dt = torch.float32
    x = torch.randn(B, N, D, dtype=dt, requires_grad=True)
    y = torch.randn(B, N, D, dtype=dt, requires_grad=True)
    ps = torch.randn(B, 1, D, dtype=dt, requires_grad=True)
    pt = torch.randn(B, N, D, dtype=dt, requires_grad=True)
    w = torch.randn(D, dtype=dt, requires_grad=True)
    b = torch.randn(D, dtype=dt, requires_grad=True)
    ops = torch.ops.raekern
    return [
        (ops.rms_norm, (x, w, 1e-6)),
        (ops.rms_norm, (x, None, 1e-6)),
        (ops.layer_norm, (x, w, b, 1e-5)),
        (ops.layer_norm, (x, None, None, 1e-5)),
        (ops.norm_modulate, (x, ps, pt, "layer", w, b, 1e-6)),
        (ops.norm_modulate, (x, pt, ps, "rms", w, None, 1e-6)),
        (ops.gated_residual, (x, ps, y)),
        (ops.gated_residual_norm_modulate, (x, ps, y, ps, pt, "rms", w, None, 1e-6)),
        (ops.gated_residual_norm_modulate, (x, pt, y, pt, ps, "layer", None, b, 1e-6)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    B, N, D = 2, 5, 12
    x, g = torch.randn(B, N, D), torch.randn(B, N, D)
    ps, w = torch.randn(B, 1, D), torch.randn(D)
    _, mean, rstd = torch.ops.raekern.layer_norm(x, w, None, 1e-6)
    ops = torch.ops.raekern
    torch.library.opcheck(ops.layer_norm_backward, (g, x, w, None, mean, rstd))
    torch.library.opcheck(ops.rms_norm_backward, (g, x, None, rstd))
    torch.library.opcheck(ops.norm_modulate_backward, (g, x, ps, ps, "layer", w, None, mean, rstd))
    torch.library.opcheck(ops.gated_residual_backward, (g, ps, x))
    torch.library.opcheck(ops.gated_residual_norm_modulate_backward,
                          (g, None, x, ps, x, ps, ps, "layer", w, None, mean, rstd))


def test_torch_compile_fullgraph_dit_block():
    B, N, D = 2, 9, 32
    x, y, base, shift, scale, gate, w, _ = _fused_inputs("token", B, N, D, torch.float32, "rms")

    def block(fused, nm, x, y, base, w):
        sh, sc, g = base.chunk(3, dim=-1)
        xo, h = fused(x, g, y, sh, sc, kind="rms", weight=w)
        return (xo * nm(h, sh, sc, kind="layer")).sum()

    eager = lambda *a: block(R.gated_residual_norm_modulate_reference, R.norm_modulate_reference, *a)  # noqa: E731
    compiled = torch.compile(lambda *a: block(R.gated_residual_norm_modulate, R.norm_modulate, *a),
                             fullgraph=True, dynamic=False)
    args = (x, y, base, w)
    got, want = compiled(*args), eager(*args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b_ in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- errors

def test_bad_inputs_name_the_argument():
    B, N, D = 2, 4, 8
    x, y = torch.randn(B, N, D), torch.randn(B, N, D)
    s = torch.randn(B, 1, D)
    with pytest.raises(ValueError, match="'x'"):
        R.norm_modulate(torch.randn(B, D), s, s)  # wrong rank
    with pytest.raises(ValueError, match="'shift'"):
        R.norm_modulate(x, torch.randn(B, 1, D + 1), s)  # mismatched D
    with pytest.raises(ValueError, match="'scale'"):
        R.norm_modulate(x, s, torch.randn(B + 1, 1, D))  # does not broadcast
    with pytest.raises(ValueError, match="'scale'"):
        R.norm_modulate(x, s, torch.randn(B, 3, D))  # does not broadcast
    with pytest.raises(ValueError, match="'shift'"):
        R.norm_modulate(x, torch.randn(B, 1, D, device="meta"), s)  # mixed devices
    with pytest.raises(TypeError, match="'x'"):
        R.rms_norm(torch.ones(B, D, dtype=torch.int32))  # integer dtype
    with pytest.raises(TypeError, match="'gate'"):
        R.gated_residual(x, s.to(torch.bfloat16), y)  # dtype mismatch
    with pytest.raises(ValueError, match="'weight'"):
        R.rms_norm(x, torch.randn(D + 1))
    with pytest.raises(ValueError, match="'bias'"):
        R.layer_norm(x, None, torch.randn(2, D))
    with pytest.raises(ValueError, match="'kind'"):
        R.norm_modulate(x, s, s, kind="batch")
    with pytest.raises(ValueError, match="'y'"):
        R.gated_residual(x, s, torch.randn(B, 1, D))
    with pytest.raises(ValueError, match="'gate'"):
        R.gated_residual_norm_modulate(x, torch.randn(3, D), y, s, s)
    with pytest.raises(ValueError, match="'eps'"):
        R.rms_norm(x, eps=-1.0)
    with pytest.raises(TypeError, match="'shift'"):
        R.norm_modulate(x, 1.0, s)


def test_cpp_checks_name_the_argument():
    """The compiled ops validate too (callers of torch.ops.raekern.* skip the Python checks)."""
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="'scale'"):
        torch.ops.raekern.norm_modulate(x, x, torch.randn(2, 4, 7), "layer", None, None, 1e-6)
    with pytest.raises(ValueError, match="'kind'"):
        torch.ops.raekern.norm_modulate(x, x, x, "batch", None, None, 1e-6)
    with pytest.raises(ValueError, match="'weight'"):
        torch.ops.raekern.rms_norm(x, torch.randn(3), 1e-6)
    with pytest.raises(ValueError, match="'x'"):
        torch.ops.raekern.rms_norm(torch.ones(2, 3, dtype=torch.int64), None, 1e-6)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_single_row_affine_weight_grad(kind):
    """B = N = 1 with an affine weight: the [D] weight/bias gradients must be written (regression)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    if kind == "rms":
        out, ref = R.rms_norm(x, w), R.rms_norm_reference(x, w)
    else:
        b = torch.randn(24, dtype=torch.float64, requires_grad=True)
        out, ref = R.layer_norm(x, w, b), R.layer_norm_reference(x, w, b)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w], g)
    want = torch.autograd.grad(ref, [x, w], g)
    for a, e in zip(got, want):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e)
