"""The norm family's CUDA kernels (csrc/norm/fused_norm_kernel.cuh), run on the CPU by the host
emulation (torch.ops.raekern_emu, see docs/emu.md), against raekern.ops.norm's references: forward and
backward of all five ops; fp32/bf16/fp16; odd sizes; the vector and scalar paths; strided,
broadcast (stride-0) and adaLN-chunk operands; several block sizes, grid-stride loops and schedules."""
import os

import pytest
import torch

from _kernels import kernel_fixture
from raekern._utils.library import emulation_library
from raekern.ops import norm as N

emu = emulation_library()
if emu is None:
    if os.environ.get("RAEKERN_EMULATION", "1") == "0":
        pytest.skip("host emulation disabled (RAEKERN_EMULATION=0)", allow_module_level=True)
    raise ImportError("raekern._emu (the host emulation of the CUDA kernels) was not built or not found next "
                      "to raekern._C; rebuild with RAEKERN_EMULATION=1, or set RAEKERN_EMULATION=0 to skip")

if not hasattr(emu, "norm_launch_config"):
    pytest.skip("this checkout has no norm CUDA kernels (csrc/norm/fused_norm_kernel.cuh)", allow_module_level=True)

kern = kernel_fixture(emu)  # each kernel test runs on the emulation and, where there is one, on the GPU

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) against references evaluated in fp64 on the same (rounded) inputs; the kernels
# compute in fp32 and round once on output.
FWD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}
BWD_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
EPS = 1e-6


@pytest.fixture(autouse=True)
def _launch_defaults():
    yield
    emu.norm_launch_config(0, 0, 132)
    emu.set_schedule("random", 0)


def _config(block=0, max_grid=0, workers=132, schedule="random", seed=0):
    emu.norm_launch_config(block, max_grid, workers)
    emu.set_schedule(schedule, seed)


def _close(actual, expected, tol, what):
    rtol, atol = tol
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _ref_grads(fn, inputs, grads):
    """Gradients of the reference in fp64 at the (already rounded) inputs; None stays None."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g.double()) for o, g in zip(outs, grads) if g is not None]
    req = [t for t in leaves if t is not None]
    got = torch.autograd.grad([o for o, _ in pairs], req, [g for _, g in pairs], allow_unused=True)
    it = iter(got)
    return [next(it) if t is not None else None for t in leaves]


def _affine(D, affine):
    if not affine:
        return None, None
    return torch.randn(D) * 0.5 + 1, torch.randn(D) * 0.1


# ---------------------------------------------------------------------------------------------
# rms_norm / layer_norm: forward and backward.

# A single row (B = N = 1) with an affine weight: the weight gradient must come through the partials
# (this test found norm_host.h taking it for a per-row gradient that no kernel wrote).
SHAPES = [(1, 1, 8), (2, 5, 77), (1, 257, 40), (1, 268, 24), (3, 7, 268)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("shape", SHAPES)
def test_norm_forward_backward(kern, dtype, kind, shape):
    B, Nt, D = shape
    x = (torch.randn(B, Nt, D) * 2 + 0.5).to(dtype)
    w, b = _affine(D, affine=D % 2 == 0)
    if kind == "rms":
        out, rstd = kern.rms_norm(x, w, EPS)
        ref = lambda x_, w_: N.rms_norm_reference(x_, w_, EPS)  # noqa: E731
        ins = [x, w]
    else:
        out, mean, rstd = kern.layer_norm(x, w, b, EPS)
        ref = lambda x_, w_, b_: N.layer_norm_reference(x_, w_, b_, EPS)  # noqa: E731
        ins = [x, w, b]
    _close(out, ref(*[t.double() if t is not None else None for t in ins]), FWD_TOL[dtype], "out")
    xf = x.double()
    ms = (xf - xf.mean(-1, keepdim=True)) if kind == "layer" else xf
    _close(rstd, (ms.pow(2).mean(-1) + EPS).rsqrt(), (1e-5, 1e-5), "rstd")

    go = torch.randn_like(x)
    if kind == "rms":
        got = kern.rms_norm_backward(go, x, w, rstd)
    else:
        got = kern.layer_norm_backward(go, x, w, b, mean, rstd)
    want = _ref_grads(ref, ins, [go])
    for name, g, r in zip(["grad_x", "grad_weight", "grad_bias"], got, want):
        if r is not None:
            _close(g, r, BWD_TOL[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_constant_rows_are_exactly_zero(kern, dtype):
    # The mean is summed relative to the row's first value: a constant row (padding, a constant token)
    # normalises to exactly 0 as on the CPU, not to the rounding of s/D amplified by 1/sqrt(eps).
    D = 1152
    x = torch.full((2, 3, D), 12345.678).to(dtype)
    x[1] = 1000.1
    out, mean, _ = kern.layer_norm(x, None, None, EPS)
    assert torch.all(out == 0), out.abs().max()
    assert torch.equal(mean, x[..., 0].float())
    cpu_out = torch.ops.raekern.layer_norm(x, None, None, EPS)[0]
    assert torch.all(cpu_out == 0)
    # after a residual: the first value is the rounded x + gate·y, as the row in shared memory holds it
    gate, y = torch.ones(2, 1, D).to(dtype), torch.full((2, 3, D), 0.25).to(dtype)
    zero = torch.zeros(2, 1, D).to(dtype)
    x_out, h, _, _ = kern.gated_residual_norm_modulate(x, gate, y, zero, zero, "layer", None, None, EPS)
    assert torch.all(h == 0), h.abs().max()


@pytest.mark.parametrize(
    "block,schedule",
    [(b, s) for b in (32, 64, 96, 256) for s in ("forward", "reverse", "random")] + [(1024, "random")],
)
def test_block_sizes_and_schedules(block, schedule):
    # 96 threads: not a power of two; max_grid=3: each block loops over several rows.
    _config(block=block, max_grid=3, workers=4, schedule=schedule, seed=block)
    x = torch.randn(2, 45, 136)
    w, b = _affine(136, True)
    out, mean, rstd = emu.layer_norm(x, w, b, EPS)
    _close(out, N.layer_norm_reference(x.double(), w.double(), b.double(), EPS), FWD_TOL[torch.float32], "out")
    go = torch.randn_like(x)
    got = emu.layer_norm_backward(go, x, w, b, mean, rstd)
    want = _ref_grads(lambda x_, w_, b_: N.layer_norm_reference(x_, w_, b_, EPS), [x, w, b], [go])
    for name, g, r in zip(["grad_x", "grad_weight", "grad_bias"], got, want):
        _close(g, r, BWD_TOL[torch.float32], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["strided", "misaligned", "broadcast"])
def test_scalar_path_layouts(kern, dtype, layout):
    base = torch.randn(2, 9, 130).to(dtype)
    if layout == "strided":
        x = base[:, :, ::2]  # feature stride 2
    elif layout == "misaligned":
        x = base[:, :, 1:65]  # rows start off the 16-byte grid
    else:
        x = base[:, :1, :64].expand(2, 9, 64)  # stride-0 tokens
    w, _ = _affine(x.shape[-1], True)
    out, rstd = kern.rms_norm(x, w, EPS)
    _close(out, N.rms_norm_reference(x.double(), w.double(), EPS), FWD_TOL[dtype], "out")
    go = torch.randn(x.shape).to(dtype)
    got = kern.rms_norm_backward(go, x, w, rstd)
    want = _ref_grads(lambda x_, w_: N.rms_norm_reference(x_, w_, EPS), [x, w], [go])
    _close(got[0], want[0], BWD_TOL[dtype], "grad_x")
    _close(got[1], want[1], BWD_TOL[dtype], "grad_weight")


# ---------------------------------------------------------------------------------------------
# adaLN modulation and the gated residual.

def _operands(B, Nt, D, dtype, per, n):
    """n operands [B', N', D]: per sample as chunks of one adaLN output (non-contiguous views), per
    token (contiguous), or shared and expanded (stride 0)."""
    if per == "sample":
        ada = torch.randn(B, 1, n * D).to(dtype)
        return list(ada.chunk(n, dim=-1))
    if per == "token":
        return [torch.randn(B, Nt, D).to(dtype) for _ in range(n)]
    return [torch.randn(1, 1, D).to(dtype).expand(B, Nt, D) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per", ["sample", "token", "shared"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("B,Nt,D", [(2, 19, 64), (1, 257, 24), (2, 3, 77)])
def test_norm_modulate(kern, dtype, per, kind, B, Nt, D):
    x = torch.randn(B, Nt, D).to(dtype)
    shift, scale = _operands(B, Nt, D, dtype, per, 2)
    w, b = _affine(D, affine=kind == "layer")
    out, mean, rstd = kern.norm_modulate(x, shift, scale, kind, w, b, EPS)

    def ref(x_, sh_, sc_, w_, b_):
        return N.norm_modulate_reference(x_, sh_, sc_, kind=kind, weight=w_, bias=b_, eps=EPS)

    ins = [x, shift, scale, w, b]
    _close(out, ref(*[t.double() if t is not None else None for t in ins]), FWD_TOL[dtype], "out")
    go = torch.randn_like(x)
    got = kern.norm_modulate_backward(go, x, shift, scale, kind, w, b, mean, rstd)
    want = _ref_grads(ref, ins, [go])
    for name, g, r in zip(["grad_x", "grad_shift", "grad_scale", "grad_weight", "grad_bias"], got, want):
        if r is not None:
            assert g.shape == r.shape, name
            _close(g, r, BWD_TOL[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per", ["sample", "token"])
def test_gated_residual(kern, dtype, per):
    B, Nt, D = 2, 21, 72
    x, y = torch.randn(B, Nt, D).to(dtype), torch.randn(B, Nt, D).to(dtype)
    (gate,) = _operands(B, Nt, D, dtype, per, 1)
    out = kern.gated_residual(x, gate, y)
    ref = N.gated_residual_reference
    _close(out, ref(x.double(), gate.double(), y.double()), FWD_TOL[dtype], "x_out")
    grad = torch.randn_like(x)
    dgate, dy = kern.gated_residual_backward(grad, gate, y)
    want = _ref_grads(ref, [x, gate, y], [grad])
    _close(dgate, want[1], BWD_TOL[dtype], "grad_gate")
    _close(dy, want[2], BWD_TOL[dtype], "grad_y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per", ["sample", "token"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("grads", ["both", "out_only", "x_out_only"])
def test_gated_residual_norm_modulate(kern, dtype, per, kind, grads):
    B, Nt, D = 2, 17, 88
    x, y = torch.randn(B, Nt, D).to(dtype), torch.randn(B, Nt, D).to(dtype)
    gate, shift, scale = _operands(B, Nt, D, dtype, per, 3)
    w, b = _affine(D, affine=kind == "layer")
    x_out, out, mean, rstd = kern.gated_residual_norm_modulate(x, gate, y, shift, scale, kind, w, b, EPS)

    def ref(x_, g_, y_, sh_, sc_, w_, b_):
        return N.gated_residual_norm_modulate_reference(x_, g_, y_, sh_, sc_, kind=kind, weight=w_, bias=b_,
                                                        eps=EPS)

    ref_x_out, _ = ref(x, gate, y, shift, scale, w, b)
    assert torch.equal(x_out, ref_x_out) or dtype == torch.float32
    _close(x_out, ref_x_out, FWD_TOL[dtype], "x_out")
    # The norm sees x_out as stored (rounded to dtype), as the unfused pair would.
    ref_out = N.norm_modulate_reference(x_out.double(), shift.double(), scale.double(), kind=kind,
                                        weight=w.double() if w is not None else None,
                                        bias=b.double() if b is not None else None, eps=EPS)
    _close(out, ref_out, FWD_TOL[dtype], "out")

    g_xo = torch.randn_like(x) if grads != "out_only" else None
    g_out = torch.randn_like(x) if grads != "x_out_only" else None
    got = kern.gated_residual_norm_modulate_backward(g_xo, g_out, x_out, gate, y, shift, scale, kind, w, b,
                                                    mean, rstd)
    ins = [x, gate, y, shift, scale, w, b]
    want = _ref_grads(ref, ins, [g_xo, g_out])
    names = ["grad_x", "grad_gate", "grad_y", "grad_shift", "grad_scale", "grad_weight", "grad_bias"]
    for name, g, r in zip(names, got, want):
        if r is None:
            continue
        # bf16/fp16: the reference differentiates through x_out unrounded; allow one more rounding.
        rtol, atol = BWD_TOL[dtype]
        _close(g, r, (2 * rtol, 2 * atol) if dtype != torch.float32 else (rtol, atol), name)


def test_backward_task_chunks_cover_every_token():
    # workers=64 with B=1: the host plans several token chunks per sample; every chunk's partial sums
    # start as NaN in the emulation, so a chunk that skipped a row or a column would show up.
    _config(block=64, workers=64)
    B, Nt, D = 1, 150, 40
    x = torch.randn(B, Nt, D)
    shift, scale = _operands(B, Nt, D, torch.float32, "sample", 2)
    out, mean, rstd = emu.norm_modulate(x, shift, scale, "layer", None, None, EPS)
    go = torch.randn_like(x)
    got = emu.norm_modulate_backward(go, x, shift, scale, "layer", None, None, mean, rstd)
    want = _ref_grads(lambda x_, sh_, sc_: N.norm_modulate_reference(x_, sh_, sc_, kind="layer", eps=EPS),
                      [x, shift, scale], [go])
    for name, g, r in zip(["grad_x", "grad_shift", "grad_scale"], got, want):
        _close(g, r, BWD_TOL[torch.float32], name)


def test_emulated_kernel_errors_name_the_argument():
    with pytest.raises(ValueError, match="'x'"):
        emu.rms_norm(torch.randn(3, 8, dtype=torch.float64), None, EPS)
    with pytest.raises(ValueError, match="'block'"):
        emu.norm_launch_config(2048, 0, 1)


# ---------------------------------------------------------------------------------------------
# The two CUDA forwards: warp-per-row (rows of <= 2048 elements with 16-byte accesses, the default) and
# one block per row (RAEKERN_NORM_FORWARD=block, every other row). Each against the fp64 reference and
# against the other, on the widths at the edges of the register buckets and past the last one.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 256, 264, 1152, 2048, 2056])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_forward_kernels_agree(kern, monkeypatch, dtype, D, kind):
    B, Nt = 2, 11
    x, y = (torch.randn(B, Nt, D) * 3 + 1).to(dtype), torch.randn(B, Nt, D).to(dtype)
    gate, shift, scale = _operands(B, Nt, D, dtype, "token", 3)
    w, b = _affine(D, affine=True)
    results = {}
    for kernel in ("rows", "block"):
        if kernel == "block":
            monkeypatch.setenv("RAEKERN_NORM_FORWARD", "block")
        else:
            monkeypatch.delenv("RAEKERN_NORM_FORWARD", raising=False)
        out, mean, rstd = kern.norm_modulate(x, shift, scale, kind, w, b, EPS)
        x_out, h, *_ = kern.gated_residual_norm_modulate(x, gate, y, shift, scale, kind, w, b, EPS)
        results[kernel] = (out, mean, rstd, x_out, h, kern.gated_residual(x, gate, y))
    monkeypatch.delenv("RAEKERN_NORM_FORWARD", raising=False)
    ref = N.norm_modulate_reference(x.double(), shift.double(), scale.double(), kind=kind, weight=w.double(),
                                    bias=b.double(), eps=EPS)
    for kernel, (out, mean, rstd, x_out, h, xo2) in results.items():
        _close(out, ref, FWD_TOL[dtype], f"{kernel}: out")
        ref_h = N.norm_modulate_reference(x_out.double(), shift.double(), scale.double(), kind=kind,
                                          weight=w.double(), bias=b.double(), eps=EPS)
        _close(h, ref_h, FWD_TOL[dtype], f"{kernel}: fused out")
        _close(xo2, N.gated_residual_reference(x.double(), gate.double(), y.double()), FWD_TOL[dtype],
               f"{kernel}: gated_residual")
    # The residual is the same fma and rounding in both kernels; the statistics differ only in the
    # order of their fp32 partial sums.
    rows, block = results["rows"], results["block"]
    assert torch.equal(rows[3], block[3]) and torch.equal(rows[5], block[5])
    torch.testing.assert_close(rows[2], block[2], rtol=1e-5, atol=0)
    torch.testing.assert_close(rows[0].float(), block[0].float(), rtol=FWD_TOL[dtype][0], atol=FWD_TOL[dtype][1])


def test_rows_forward_with_whole_warp_blocks_and_a_capped_grid():
    # 1, 3 and 8 warps per block, 2 blocks: each warp loops over many rows (grid-stride).
    x = torch.randn(3, 37, 200)
    w, b = _affine(200, True)
    for block in (32, 96, 256):
        _config(block=block, max_grid=2, workers=4, schedule="random", seed=block)
        out, mean, rstd = emu.layer_norm(x, w, b, EPS)
        _close(out, N.layer_norm_reference(x.double(), w.double(), b.double(), EPS), FWD_TOL[torch.float32],
               f"block {block}: out")


# ---------------------------------------------------------------------------------------------
# The two CUDA backwards: warp-per-row (rows of <= 1536 elements with 16-byte accesses, the default;
# per-warp partial-sum slabs) and one block per task (RAEKERN_NORM_BACKWARD=block, and every row past
# 1536). Both against the fp64 reference and against each other, with every reduced gradient present
# (gate, shift, scale per sample; weight and bias shared) and per-token ones.

def _fused_backward(kern, x, y, gate, shift, scale, kind, w, b, g_xo, g_out):
    x_out, _, mean, rstd = kern.gated_residual_norm_modulate(x, gate, y, shift, scale, kind, w, b, EPS)
    return x_out, kern.gated_residual_norm_modulate_backward(g_xo, g_out, x_out, gate, y, shift, scale, kind, w,
                                                             b, mean, rstd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 256, 264, 1152, 1536, 1544])
@pytest.mark.parametrize("per", ["sample", "token"])
def test_backward_kernels_agree(kern, monkeypatch, dtype, D, per):
    B, Nt, kind = 2, 21, "layer"
    x, y = (torch.randn(B, Nt, D) * 3 + 1).to(dtype), torch.randn(B, Nt, D).to(dtype)
    gate, shift, scale = _operands(B, Nt, D, dtype, per, 3)
    w, b = _affine(D, affine=True)
    g_xo, g_out = torch.randn_like(x), torch.randn_like(x)
    results = {}
    for kernel in ("rows", "block"):
        if kernel == "block":
            monkeypatch.setenv("RAEKERN_NORM_BACKWARD", "block")
        else:
            monkeypatch.delenv("RAEKERN_NORM_BACKWARD", raising=False)
        results[kernel] = _fused_backward(kern, x, y, gate, shift, scale, kind, w, b, g_xo, g_out)
    monkeypatch.delenv("RAEKERN_NORM_BACKWARD", raising=False)

    def ref(x_, g_, y_, sh_, sc_, w_, b_):
        return N.gated_residual_norm_modulate_reference(x_, g_, y_, sh_, sc_, kind=kind, weight=w_, bias=b_,
                                                        eps=EPS)

    want = _ref_grads(ref, [x, gate, y, shift, scale, w, b], [g_xo, g_out])
    names = ["grad_x", "grad_gate", "grad_y", "grad_shift", "grad_scale", "grad_weight", "grad_bias"]
    rtol, atol = BWD_TOL[dtype]
    tol = (2 * rtol, 2 * atol) if dtype != torch.float32 else (rtol, atol)  # x_out rounded (see above)
    for kernel, (_, got) in results.items():
        for name, g, r in zip(names, got, want):
            _close(g, r, tol, f"{kernel}: {name}")
    # Per-row gradients: the same operations in the same order; reduced ones differ in summation order.
    rows, block = results["rows"][1], results["block"][1]
    for name, g_r, g_b in zip(names, rows, block):
        if g_r.shape[:2] == x.shape[:2]:
            torch.testing.assert_close(g_r.float(), g_b.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                       atol=1e-5 if dtype == torch.float32 else 1e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("block", [32, 96, 256])
@pytest.mark.parametrize("shape", [(3, 37, 200), (1, 40, 64), (2, 5, 64)])
def test_rows_backward_warps_and_tasks(block, shape):
    # 1, 3 and 8 warps per block over tasks of ~19 rows (each warp several rows) or of 5 rows (B=2, N=5:
    # one task per sample, so up to 3 of 8 warps have no row). Partial sums start as NaN in the
    # emulation: an idle warp's slab must still be added, as zeros.
    workers = 1 if shape[0] == 3 else 16
    _config(block=block, workers=workers, schedule="random", seed=block + workers)
    B, Nt, D = shape
    x, y = torch.randn(B, Nt, D), torch.randn(B, Nt, D)
    gate, shift, scale = _operands(B, Nt, D, torch.float32, "sample", 3)
    w, b = _affine(D, True)
    g_xo, g_out = torch.randn_like(x), torch.randn_like(x)
    _, got = _fused_backward(emu, x, y, gate, shift, scale, "rms", w, None, g_xo, g_out)

    def ref(x_, g_, y_, sh_, sc_, w_):
        return N.gated_residual_norm_modulate_reference(x_, g_, y_, sh_, sc_, kind="rms", weight=w_, eps=EPS)

    want = _ref_grads(ref, [x, gate, y, shift, scale, w], [g_xo, g_out])
    for name, g, r in zip(["grad_x", "grad_gate", "grad_y", "grad_shift", "grad_scale", "grad_weight"], got, want):
        _close(g, r, BWD_TOL[torch.float32], f"block {block}, shape {shape}: {name}")
