"""MLP family (SwiGLU): swiglu / swiglu_packed against the plain-PyTorch reference, gradients, odd
sizes, strided / broadcast / packed layouts, opcheck, torch.compile, argument errors, and the CUDA
kernels (csrc/mlp/swiglu_kernel.cuh) run on the CPU through the host emulation. transpose_copy (the
Linear backward's operand transposes): exact against x.t().contiguous() over odd sizes, layouts and
dtypes, gradients, opcheck, compile, errors."""
import os

import pytest
import torch
import torch.nn.functional as F

from raekern import ops as R
from raekern._utils.library import emulation_library

TOL = {  # (rtol, atol) of the outputs against the reference (same dtype, computed in fp32/fp64)
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [1, 7, 257, 1024]


def _close(a, b, dtype, what=""):
    rtol, atol = TOL[dtype]
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _grad_close(a, b, dtype, what=""):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = b.double().abs().max().item() + 1e-6 if b.numel() else 1.0
    assert err <= GRAD_TOL[dtype] * scale, f"{what}: max err {err} vs scale {scale}"


def _ref_grads(fn, inputs, grad):
    """Gradients of the reference at the (already rounded) inputs, computed in fp64."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, grad.double())


def a_size(dtype):
    return torch.finfo(dtype).bits // 8


def _pair(shape, dtype, device="cpu", scale=3.0):
    a = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    b = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return a, b


# ---------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", HIDDEN)
def test_forward_matches_reference(dtype, H, device):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    for lead in [(), (1,), (3,), (2, 5)]:
        a, b = _pair((*lead, H), dtype, device)
        _close(R.swiglu(a, b), R.swiglu_reference(a, b), dtype, f"swiglu {lead}")
        ab = torch.cat([a, b], dim=-1)
        out = R.swiglu_packed(ab)
        _close(out, R.swiglu_packed_reference(ab), dtype, f"packed {lead}")
        assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_values(dtype):
    """silu stays finite and accurate for |a| up to the dtype's range (no overflow in exp)."""
    vals = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 8.0, -8.0, 20.0, -20.0, 88.0, -88.0, 89.0, -89.0,
                         100.0, -100.0, 1e4, -1e4, 3e38, -3e38], dtype=torch.float64)
    a = vals.to(dtype)
    b = torch.ones_like(a)
    got = R.swiglu(a, b)
    want = (F.silu(a.double()) * b.double())
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=TOL[dtype][0], atol=1e-30)
    # the packed form and the backward on the same values
    _close(R.swiglu_packed(torch.cat([a, b])), R.swiglu_reference(a, b), dtype, "packed")
    a_ = a.clone().requires_grad_()
    (da,) = torch.autograd.grad(R.swiglu(a_, b), a_, torch.ones_like(a))
    assert torch.isfinite(da).all(), da
    want = _ref_grads(R.swiglu_reference, [a, b], torch.ones_like(a))[0].to(dtype)
    torch.testing.assert_close(da.double(), want.double(), rtol=TOL[dtype][0], atol=1e-30)


def test_autocast_promotes_mixed_operands():
    """A bf16 Linear output times an fp32 tensor under autocast: promoted as eager silu(a) * b is."""
    a, b = torch.randn(3, 40), torch.randn(3, 40)
    with pytest.raises(TypeError, match="'b'"):
        R.swiglu(a.bfloat16(), b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = R.swiglu(a.bfloat16(), b)
        eager = F.silu(a.bfloat16()) * b
    assert got.dtype == eager.dtype == torch.float32
    _close(got, R.swiglu_reference(a.bfloat16().float(), b), torch.float32)


def test_double_backward_is_refused():
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64)
    (g,) = torch.autograd.grad(R.swiglu(a, b).pow(2).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), a)
    ab = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(R.swiglu_packed(ab).pow(2).sum(), ab, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), ab)


def test_nan_and_inf_propagate_like_torch():
    a = torch.tensor([float("nan"), float("inf"), 1.0, -1.0])
    b = torch.tensor([1.0, 1.0, float("nan"), float("inf")])
    torch.testing.assert_close(R.swiglu(a, b), F.silu(a) * b, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_outputs_stream(dtype):
    """Outputs past the CPU kernel's streaming-store threshold (8 MiB) take the non-temporal path,
    including rows whose starts are off the cache-line grid (the packed halves with H = 2730)."""
    a, b = _pair((8 * 1024 * 1024 // (1024 * a_size(dtype)), 1024), dtype)  # an 8 MiB output
    _close(R.swiglu(a, b), R.swiglu_reference(a, b), dtype, "swiglu")
    ab = torch.randn(1600, 2 * 2730, dtype=dtype)
    _close(R.swiglu_packed(ab), R.swiglu_packed_reference(ab), dtype, "packed")
    g = torch.randn(1600, 2730, dtype=dtype)
    ab_ = ab.detach().requires_grad_()
    got = torch.autograd.grad(R.swiglu_packed(ab_), ab_, g)[0]
    want = _ref_grads(R.swiglu_packed_reference, [ab], g)[0].to(dtype)
    _grad_close(got, want, dtype, "packed backward")


def test_outputs_past_the_huge_page_hint():
    """A packed backward output over 32 MiB is allocated with the transparent-huge-page hint
    (csrc/common/output_alloc.h, applied to every family's large outputs): the hint must not change
    the result, including a buffer whose start is not 2 MiB aligned."""
    ab = torch.randn(1500, 2 * 3000)
    g = torch.randn(1500, 3000)
    ab_ = ab.detach().requires_grad_()
    got = torch.autograd.grad(R.swiglu_packed(ab_), ab_, g)[0]
    assert got.numel() * got.element_size() > 32 << 20
    want = _ref_grads(R.swiglu_packed_reference, [ab], g)[0].to(torch.float32)
    _grad_close(got, want, torch.float32, "packed backward")


def test_noncontiguous_and_stride0_inputs():
    dtype = torch.float32
    B, N, H = 3, 11, 40
    big = torch.randn(B, 2 * N, H + 8)
    a = big[:, ::2, 4:4 + H]  # strided tokens, offset features
    b_bcast = torch.randn(1, 1, H).expand(B, N, H)  # stride 0 over batch and tokens
    b_t = torch.randn(B, H, N).transpose(1, 2)  # feature stride != 1
    b_scalar = torch.randn(()).expand(B, N, H)  # stride 0 everywhere
    for b in (b_bcast, b_t, b_scalar, a.contiguous()):
        _close(R.swiglu(a, b), R.swiglu_reference(a, b), dtype, "swiglu")
        _close(R.swiglu(b, a), R.swiglu_reference(b, a), dtype, "swiglu swapped")
    # >4 dimensions none of which merge: the kernels' fallback compacts the inputs
    a5 = torch.randn(4, 6, 8, 10, 12)[::2, ::2, ::2, ::2, ::2]
    b5 = torch.randn(2, 3, 4, 5, 6)
    _close(R.swiglu(a5, b5), R.swiglu_reference(a5, b5), dtype, "5-D")


def test_packed_layouts():
    dtype = torch.float32
    B, N, H = 2, 9, 24
    big = torch.randn(B, N + 1, 2 * H + 6)
    for ab in (
        big[:, 1:, : 2 * H],  # token slice of a wider buffer: leading dims that do not merge
        big[:, 1:, 3: 3 + 2 * H],  # rows start off the vector grid
        torch.randn(B, 2 * H, N).transpose(1, 2),  # feature stride != 1
        torch.randn(1, 1, 2 * H).expand(B, N, 2 * H),  # stride 0
        torch.randn(B, N, 4 * H)[..., ::2],  # feature stride 2
        torch.randn(N, 2),  # H = 1: a and b are the columns
    ):
        _close(R.swiglu_packed(ab), R.swiglu_packed_reference(ab), dtype, f"packed {tuple(ab.stride())}")
        ab_ = ab.detach().requires_grad_()
        g = torch.randn(*ab.shape[:-1], ab.shape[-1] // 2)
        got = torch.autograd.grad(R.swiglu_packed(ab_), ab_, g)[0]
        want = _ref_grads(R.swiglu_packed_reference, [ab], g)[0].float()
        _grad_close(got, want, dtype, "packed grad")


def test_packed_reads_chunks_in_place():
    """swiglu_packed(ab) equals swiglu on the two chunks, bit for bit."""
    ab = torch.randn(4, 7, 2 * 96)
    a, b = ab.chunk(2, dim=-1)
    torch.testing.assert_close(R.swiglu_packed(ab), R.swiglu(a, b), rtol=0, atol=0)
    torch.testing.assert_close(R.swiglu(a, b), R.swiglu(a.contiguous(), b.contiguous()), rtol=0, atol=0)


def test_empty_inputs():
    a = torch.randn(0, 8)
    assert R.swiglu(a, a).shape == (0, 8)
    assert R.swiglu_packed(torch.randn(3, 0)).shape == (3, 0)


# ---------------------------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", HIDDEN)
def test_backward_matches_reference(dtype, H, device):
    a, b = _pair((3, 5, H), dtype, device)
    g = torch.randn(3, 5, H, dtype=torch.float64).to(device=device, dtype=dtype)
    a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
    got = torch.autograd.grad(R.swiglu(a_, b_), [a_, b_], g)
    want = _ref_grads(R.swiglu_reference, [a, b], g)
    for x, y, name in zip(got, want, "ab"):
        _grad_close(x, y.to(dtype), dtype, f"d{name}")
    ab = torch.cat([a, b], dim=-1).requires_grad_()
    got = torch.autograd.grad(R.swiglu_packed(ab), ab, g)[0]
    want = _ref_grads(R.swiglu_packed_reference, [ab], g)[0]
    _grad_close(got, want.to(dtype), dtype, "d(ab)")
    assert got.is_contiguous() and got.shape == ab.shape


def test_gradcheck_fp64():
    gc = torch.autograd.gradcheck
    a = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert gc(R.swiglu, (a, b))
    ab = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    assert gc(R.swiglu_packed, (ab,))
    # strided and broadcast inputs
    base = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert gc(lambda x, y: R.swiglu(x[::2, 1:], y[1:].expand(2, 8)), (base, bb))
    assert gc(lambda x: R.swiglu_packed(x[:, 1:]), (base[:, :9].detach().clone().requires_grad_(),), fast_mode=True)


# ---------------------------------------------------------------------------------- op contract

def test_opcheck():
    a = torch.randn(2, 5, 12, requires_grad=True)
    b = torch.randn(2, 5, 12, requires_grad=True)
    ab = torch.randn(2, 5, 24, requires_grad=True)
    g = torch.randn(2, 5, 12)
    ops = torch.ops.raekern
    torch.library.opcheck(ops.swiglu, (a, b))
    torch.library.opcheck(ops.swiglu, (a[:, ::2], torch.randn(12).expand(2, 3, 12)))
    torch.library.opcheck(ops.swiglu_packed, (ab,))
    torch.library.opcheck(ops.swiglu_backward, (g, a.detach(), b.detach()))
    torch.library.opcheck(ops.swiglu_packed_backward, (g, ab.detach()))


def test_torch_compile_fullgraph_mlp():
    torch.manual_seed(0)
    D, H = 16, 24
    w12, w1, w2 = torch.nn.Linear(D, 2 * H), torch.nn.Linear(D, H), torch.nn.Linear(D, H)
    w3 = torch.nn.Linear(H, D)
    x = torch.randn(2, 9, D, requires_grad=True)

    def mlp(x, packed, pair):
        return (w3(packed(w12(x))) + w3(pair(w1(x), w2(x)))).square().sum()

    compiled = torch.compile(lambda x: mlp(x, R.swiglu_packed, R.swiglu), fullgraph=True, dynamic=False)
    got = compiled(x)
    want = mlp(x, R.swiglu_packed_reference, R.swiglu_reference)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    params = [x, *w12.parameters(), *w1.parameters(), *w3.parameters()]
    for p, q in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- errors

def test_bad_inputs_name_the_argument():
    a = torch.randn(2, 8)
    with pytest.raises(ValueError, match="'b'"):
        R.swiglu(a, torch.randn(2, 7))  # mismatched shapes
    with pytest.raises(ValueError, match="'b'"):
        R.swiglu(a, torch.randn(8))  # no implicit broadcasting
    with pytest.raises(ValueError, match="'ab'"):
        R.swiglu_packed(torch.randn(2, 7))  # odd last dimension
    with pytest.raises(TypeError, match="'a'"):
        R.swiglu(torch.ones(2, 8, dtype=torch.int32), a)  # integer dtype
    with pytest.raises(TypeError, match="'ab'"):
        R.swiglu_packed(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="'b'"):
        R.swiglu(a, a.to(torch.bfloat16))  # dtype mismatch
    with pytest.raises(ValueError, match="'b'"):
        R.swiglu(a, torch.randn(2, 8, device="meta"))  # mixed devices
    with pytest.raises(ValueError, match="'a'"):
        R.swiglu(torch.tensor(1.0), torch.tensor(2.0))  # 0-dim
    with pytest.raises(TypeError, match="'b'"):
        R.swiglu(a, 1.0)


def test_cpp_checks_name_the_argument():
    """The compiled ops validate too (callers of torch.ops.raekern.* skip the Python checks)."""
    ops = torch.ops.raekern
    a = torch.randn(2, 8)
    with pytest.raises(ValueError, match="'b'"):
        ops.swiglu(a, torch.randn(2, 7))
    with pytest.raises(ValueError, match="'a'"):
        ops.swiglu(torch.ones(2, 8, dtype=torch.int32), torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="'ab'"):
        ops.swiglu_packed(torch.randn(2, 7))
    with pytest.raises(ValueError, match="'grad'"):
        ops.swiglu_backward(torch.randn(2, 7), a, a)
    with pytest.raises(ValueError, match="'grad'"):
        ops.swiglu_packed_backward(torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="'b'"):
        ops.swiglu(a, a.double())


# ---------------------------------------------------------------------------------- host emulation

emu = emulation_library()
# Skipped only when the emulation is switched off; a missing or stale raekern._emu fails the tests.
needs_emu = pytest.mark.skipif(os.environ.get("RAEKERN_EMULATION", "1") == "0",
                               reason="host emulation disabled (RAEKERN_EMULATION=0)")
EMU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def emu_config():
    if emu is None or not hasattr(emu, "swiglu_launch_config"):
        raise ImportError("raekern._emu with the mlp ops (host emulation of csrc/mlp/swiglu_kernel.cuh) was not "
                          "built; rebuild with RAEKERN_EMULATION=1, or set RAEKERN_EMULATION=0 to skip")

    def config(block=0, max_grid_x=0, max_grid_y=0, schedule="random", seed=0):
        emu.swiglu_launch_config(block, max_grid_x, max_grid_y)
        emu.set_schedule(schedule, seed)
    yield config
    emu.swiglu_launch_config(0, 0, 0)
    emu.set_schedule("random", 0)


def _emu_check(a, b, g, dtype, what):
    _close(emu.swiglu(a, b), R.swiglu_reference(a, b), dtype, f"{what} fwd")
    da, db = emu.swiglu_backward(g, a, b)
    want = _ref_grads(R.swiglu_reference, [a, b], g)
    _grad_close(da, want[0].to(dtype), dtype, f"{what} da")
    _grad_close(db, want[1].to(dtype), dtype, f"{what} db")


@needs_emu
@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("H", [1, 7, 8, 257, 2730])
def test_emulated_kernels(dtype, H, emu_config):
    """Vector widths 16/8/4/2 bytes and the scalar path, as alignment and H allow; packed halves."""
    emu_config()
    rows = 3 if H < 1000 else 1
    a, b = _pair((rows, H), dtype)
    g = torch.randn(rows, H).to(dtype)
    _emu_check(a, b, g, dtype, "pair")
    ab = torch.cat([a, b], dim=-1)
    _close(emu.swiglu_packed(ab), R.swiglu_packed_reference(ab), dtype, "packed fwd")
    got = emu.swiglu_packed_backward(g, ab)
    _grad_close(got, _ref_grads(R.swiglu_packed_reference, [ab], g)[0].to(dtype), dtype, "packed bwd")


@needs_emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_layouts(dtype, emu_config):
    emu_config()
    B, N, H = 2, 5, 24
    big = torch.randn(B, 2 * N, H + 8).to(dtype)
    a = big[:, ::2, 4:4 + H]
    g = torch.randn(B, N, H).to(dtype)
    for b in (torch.randn(1, 1, H).to(dtype).expand(B, N, H),  # stride 0
              torch.randn(B, H, N).to(dtype).transpose(1, 2),  # feature stride != 1 (scalar path)
              big[:, 1::2, 3:3 + H]):  # rows off the vector grid
        _emu_check(a, b, g, dtype, f"b {tuple(b.stride())}")
    ab = torch.randn(B, N + 1, 2 * H + 6).to(dtype)[:, 1:, : 2 * H]
    _close(emu.swiglu_packed(ab), R.swiglu_packed_reference(ab), dtype, "packed slice")
    got = emu.swiglu_packed_backward(g, ab)
    _grad_close(got, _ref_grads(R.swiglu_packed_reference, [ab], g)[0].to(dtype), dtype, "packed slice bwd")
    ab1 = torch.randn(7, 2).to(dtype)  # H = 1: d(ab)'s halves have inner stride 2
    g1 = torch.randn(7, 1).to(dtype)
    got = emu.swiglu_packed_backward(g1, ab1)
    _grad_close(got, _ref_grads(R.swiglu_packed_reference, [ab1], g1)[0].to(dtype), dtype, "H=1 bwd")


@needs_emu
@pytest.mark.parametrize("block,max_x,max_y,schedule", [
    (32, 1, 1, "forward"), (64, 2, 3, "reverse"), (96, 1, 2, "random"), (256, 0, 0, "random")])
def test_emulated_grid_stride(block, max_x, max_y, schedule, emu_config):
    """Blocks smaller than a row and capped grids: every thread loops over columns and rows."""
    emu_config(block, max_x, max_y, schedule, seed=block)
    a, b = _pair((5, 3, 100), torch.float32)
    a = a[:, 1:]  # two leading dimensions that do not merge
    b = b[:, 1:]
    g = torch.randn(5, 2, 100)
    _emu_check(a, b, g, torch.float32, f"block {block}")
    flat_a, flat_b = _pair((1000,), torch.float32)  # one long row
    _emu_check(flat_a, flat_b, torch.randn(1000), torch.float32, "flat")


# ---------------------------------------------------------------------------------- transpose_copy

TRANSPOSE_SHAPES = [(1, 1), (1, 37), (37, 1), (16, 16), (17, 33), (100, 37), (64, 2048), (1031, 48), (48, 1031)]


@pytest.mark.parametrize("shape", TRANSPOSE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.int32, torch.int64])
def test_transpose_copy_is_exact(shape, dtype):
    """Bit-exact against x.t().contiguous() (the kernel's 16×16 / 8×8 blocks, the row and column
    tails, the tile edges at 1024 rows), a new contiguous tensor, for every dtype (4-byte ones take
    the kernel, the others torch's copy)."""
    x = (torch.randn(shape, dtype=torch.float64) * 100).to(dtype)
    y = R.transpose_copy(x)
    assert y.shape == shape[::-1] and y.dtype == dtype and y.is_contiguous()
    assert torch.equal(y, R.transpose_copy_reference(x)) and torch.equal(y, x.t())
    assert y.data_ptr() != x.data_ptr()


def test_transpose_copy_layouts():
    """Strided rows (a column slice), stride-0 rows (expand), a transposed (column-major) input, whose
    transpose is contiguous (still a new tensor), and a sliced row step."""
    base = torch.randn(70, 90)
    for x in (base[:, 3:80], base[::2], torch.randn(1, 90).expand(33, 90), base.t(), base[5:60, ::3],
              torch.empty(0, 5), torch.empty(5, 0)):
        y = R.transpose_copy(x)
        assert torch.equal(y, x.t()) and y.is_contiguous(), x.stride()
        if x.numel():
            assert y.data_ptr() != x.data_ptr()


def test_transpose_copy_grad_opcheck_compile():
    x = torch.randn(19, 35, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(R.transpose_copy, (x,))
    torch.library.opcheck(torch.ops.raekern.transpose_copy, (torch.randn(19, 35, requires_grad=True),))
    torch.library.opcheck(torch.ops.raekern.transpose_copy, (torch.randn(40, 7)[::2],))
    f = torch.compile(lambda a: R.transpose_copy(a * 2).sum(1), fullgraph=True)
    a = torch.randn(33, 65, requires_grad=True)
    torch.testing.assert_close(f(a), (a * 2).sum(0))
    f(a).sum().backward()
    assert torch.equal(a.grad, torch.full_like(a, 2.0))


def test_transpose_copy_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="'x'"):
        R.transpose_copy(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="'x'"):
        torch.ops.raekern.transpose_copy(torch.randn(5))
    with pytest.raises(TypeError, match="'x'"):
        R.transpose_copy([[1.0]])


def test_onednn_linear_backward_uses_the_fast_transpose(monkeypatch):
    """The raekern backend's oneDNN Linear (AMD CPUs) takes its backward operands from transpose_copy;
    its gradients equal nn.Linear's."""
    from raekern.models import layers as LY
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("no oneDNN linear in this torch build")
    calls = []
    real = LY._transposed
    monkeypatch.setattr(LY, "_transposed", lambda m: calls.append(m.shape) or real(m))
    monkeypatch.setattr(LY, "_ONEDNN_FP32", True)
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(3, 7, 24, requires_grad=True)
    y = LY.dense(x, lin)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, lin.weight, lin.bias), g)
    want = torch.autograd.grad(lin(x), (x, lin.weight, lin.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3
