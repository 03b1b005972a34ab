"""The fusion family's CUDA kernels (csrc/fusion/*_kernel.cuh), run on the CPU by the host emulation
(torch.ops.raekern_emu, see docs/emu.md) through the very launch plans of the CUDA ops
(csrc/fusion/*_launch.h), against raekern.ops.fusion's references: layer_stack_fuse, depth_route and
latent_(de)normalize, forward and backward; fp32/bf16; odd sizes; the vector and scalar row layouts
(D divisible by the 16-byte vector or not, strided and stacked inputs); the channels-first tile
split into several blocks; depth_route's backward with blocks striding over tokens; random thread
schedules. One host fiber per CUDA thread (256 per block), so the shapes stay small."""
import os

import pytest
import torch

from _kernels import kernel_fixture
from raekern._utils.library import emulation_library
from raekern.ops import fusion as fu

emu = emulation_library()
if emu is None:
    if os.environ.get("RAEKERN_EMULATION", "1") == "0":
        pytest.skip("host emulation disabled (RAEKERN_EMULATION=0)", allow_module_level=True)
    raise ImportError("raekern._emu (the host emulation of the CUDA kernels) was not built or not found next "
                      "to raekern._C; rebuild with RAEKERN_EMULATION=1, or set RAEKERN_EMULATION=0 to skip")
if not hasattr(emu, "fusion_launch_config"):
    pytest.skip("this checkout has no fusion CUDA kernels (csrc/fusion/fusion_emu.cpp)", allow_module_level=True)

kern = kernel_fixture(emu)  # each kernel test runs on the emulation and, where there is one, on the GPU

DTYPES = [torch.float32, torch.bfloat16]
# (rtol, atol relative to the largest reference magnitude): the kernels compute in fp32 and round once.
FWD_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}
BWD_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


@pytest.fixture(autouse=True)
def _defaults():
    emu.set_schedule("random", 0)
    yield
    emu.fusion_launch_config(132)
    emu.set_schedule("random", 0)


def _close(actual, expected, tol, what):
    rtol, atol = tol
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def _layers(L, B, T, D, dtype, layout="list"):
    """L layers [B, T, D]: separate tensors, views of one stacked tensor, or strided views (D not
    contiguous: the scalar path)."""
    if layout == "stacked":
        return list((torch.randn(L, B, T, D, dtype=torch.float64) * 2 + 3).to(dtype).unbind(0))
    if layout == "strided":
        return [(torch.randn(B, D, T, dtype=torch.float64) * 2 + 3).to(dtype).transpose(1, 2) for _ in range(L)]
    return [(torch.randn(B, T, D, dtype=torch.float64) * 2 + 3).to(dtype) for _ in range(L)]


# ------------------------------------------------------------------------------------------------
# layer_stack_fuse

# (B, T, D, P, L, mode, layout, channels-first grid or None). D = 24/72: 16-byte vectors in fp32 and
# bf16; D = 100: vectors in fp32, scalar in bf16; D = 37: scalar. Channels-first N = 36 with D = 24
# is two tiles of 32 + 4 tokens; D = 600 is tiles of 20 + 16.
STACK_CASES = [
    (1, 5, 24, 1, 3, "mean", "list", None),
    (1, 37, 100, 0, 1, "sum_raw", "list", None),
    (1, 5, 72, 1, 7, "layer_w", "stacked", None),
    (2, 5, 37, 2, 3, "token_w_last_mean", "list", None),
    (1, 37, 24, 0, 3, "last_mean", "strided", None),
    (1, 37, 24, 1, 3, "mean_stats", "list", (4, 9)),
    (2, 9, 100, 3, 3, "token_w_last_mean_stats", "list", (2, 3)),
    (1, 37, 600, 1, 1, "layer_w_stats", "list", (6, 6)),
    (1, 5, 37, 1, 3, "sum_raw_cf", "strided", (2, 2)),
]


def _stack_kwargs(mode, B, N, L, D, grid):
    kw = dict(skip_tokens=None, normalize=True, eps=1e-5, reduce="mean", weights=None,
              add_last_token_mean="last_mean" in mode, channels_first=grid is not None, grid=grid,
              latent_mean=None, latent_var=None)
    if mode.startswith("sum_raw"):
        kw.update(reduce="sum", normalize=False)
    elif mode.startswith("layer_w"):
        kw.update(reduce="weighted", weights=torch.randn(L))
    elif mode.startswith("token_w"):
        kw.update(reduce="weighted", weights=torch.randn(B, N, L))
    if mode.endswith("_stats"):
        kw.update(latent_mean=torch.randn(D, *grid), latent_var=torch.rand(D, *grid) + 0.2)
    return kw


def _stack_op_args(hs, kw, P, latent_eps=1e-5):
    gh, gw = kw["grid"] if kw["grid"] else (0, 0)
    return (hs, kw["weights"], P, kw["normalize"], kw["eps"], kw["reduce"], kw["add_last_token_mean"],
            kw["channels_first"], gh, gw, kw["latent_mean"], kw["latent_var"], latent_eps)


def _stack_reference(hs, kw, P):
    ref_kw = {k: v for k, v in kw.items() if k != "skip_tokens"}
    return fu.layer_stack_fuse_reference(hs, skip_tokens=P, **ref_kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(STACK_CASES)))
def test_layer_stack_fuse_forward(kern, dtype, case):
    B, T, D, P, L, mode, layout, grid = STACK_CASES[case]
    torch.manual_seed(case)
    hs = _layers(L, B, T, D, dtype, layout)
    kw = _stack_kwargs(mode, B, T - P, L, D, grid)
    out = kern.layer_stack_fuse(*_stack_op_args(hs, kw, P))
    ref = _stack_reference(hs, kw, P)
    assert out.shape == ref.shape and out.dtype == dtype
    _close(out, ref, FWD_TOL[dtype], f"layer_stack_fuse {mode}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(STACK_CASES)))
def test_layer_stack_fuse_backward(kern, dtype, case):
    B, T, D, P, L, mode, layout, grid = STACK_CASES[case]
    torch.manual_seed(100 + case)
    hs = _layers(L, B, T, D, dtype, layout)
    kw = _stack_kwargs(mode, B, T - P, L, D, grid)
    ref_out = _stack_reference(hs, kw, P)
    grad = torch.randn(ref_out.shape, dtype=torch.float64).to(dtype)
    weights_grad = kw["weights"] is not None
    dl, dw = kern.layer_stack_fuse_backward(grad, hs, kw["weights"], P, kw["normalize"], kw["eps"], kw["reduce"],
                                           kw["add_last_token_mean"], kw["channels_first"], kw["latent_var"],
                                           1e-5, weights_grad)
    # fp64 gradients of the reference at the same (rounded) inputs.
    leaves = [h.detach().double().requires_grad_() for h in hs]
    kw64 = dict(kw)
    if weights_grad:
        kw64["weights"] = kw["weights"].double().requires_grad_()
    if kw["latent_mean"] is not None:
        kw64.update(latent_mean=kw["latent_mean"].double(), latent_var=kw["latent_var"].double())
    out64 = _stack_reference(leaves, kw64, P)
    req = leaves + ([kw64["weights"]] if weights_grad else [])
    want = torch.autograd.grad(out64, req, grad.double())
    assert len(dl) == L
    for l in range(L):
        assert dl[l].shape == (B, T, D) and dl[l].dtype == dtype
        _close(dl[l], want[l], BWD_TOL[dtype], f"grad layer {l} ({mode})")
    if weights_grad:
        _close(dw, want[L], BWD_TOL[dtype], f"grad weights ({mode})")
    else:
        assert dw.numel() == 0


def test_layer_stack_fuse_schedules_agree():
    """The same launch under forward, reverse and random thread orders gives bit-identical results
    (no race between the threads of a block)."""
    hs = _layers(3, 1, 37, 24, torch.float32)
    kw = _stack_kwargs("token_w_last_mean_stats", 1, 36, 3, 24, (4, 9))
    outs = []
    for policy, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)):
        emu.set_schedule(policy, seed)
        outs.append(emu.layer_stack_fuse(*_stack_op_args(hs, kw, 1)))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def _warp_and_block(monkeypatch, run):
    """run() with the warp-per-token kernels (the default) and with RAEKERN_FUSION_KERNEL=block."""
    results = {}
    for kernel in ("warp", "block"):
        if kernel == "block":
            monkeypatch.setenv("RAEKERN_FUSION_KERNEL", "block")
        else:
            monkeypatch.delenv("RAEKERN_FUSION_KERNEL", raising=False)
        results[kernel] = run()
    monkeypatch.delenv("RAEKERN_FUSION_KERNEL", raising=False)
    return results


# The two tokens-major layer_stack_fuse kernel pairs: warp per token (rows of 16-byte vectors with
# D <= 1024, the default; its backward also writes the prefix rows' zeros) and block per token
# (RAEKERN_FUSION_KERNEL=block, scalar rows, D > 1024), at the edges of the warp kernels' register
# buckets and past the last, with every reduction and the token mean, forward and backward.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 264, 768, 1024, 1032])
@pytest.mark.parametrize("mode", ["mean", "sum_raw", "token_w_last_mean", "layer_w"])
def test_layer_stack_fuse_kernels_agree(kern, monkeypatch, dtype, D, mode):
    B, T, P, L = 2, 6, 1, 3
    torch.manual_seed(D)
    hs = _layers(L, B, T, D, dtype, "list")
    kw = _stack_kwargs(mode, B, T - P, L, D, None)
    grad = torch.randn(B, T - P, D).to(dtype)
    wgrad = kw["weights"] is not None
    emu.fusion_launch_config(1)

    def run():
        out = kern.layer_stack_fuse(*_stack_op_args(hs, kw, P))
        return (out, *kern.layer_stack_fuse_backward(grad, hs, kw["weights"], P, kw["normalize"], kw["eps"],
                                                     kw["reduce"], kw["add_last_token_mean"], False, None, 1e-5,
                                                     wgrad))
    results = _warp_and_block(monkeypatch, run)
    leaves = [h.detach().double().requires_grad_() for h in hs]
    kw64 = dict(kw)
    if wgrad:
        kw64["weights"] = kw["weights"].double().requires_grad_()
    ref = _stack_reference(leaves, kw64, P)
    want = torch.autograd.grad(ref, leaves + ([kw64["weights"]] if wgrad else []), grad.double())
    for kernel, (out, dl, dw) in results.items():
        _close(out, ref.detach(), FWD_TOL[dtype], f"{kernel}: layer_stack_fuse {mode}")
        for l in range(L):
            assert torch.equal(dl[l][:, :P], torch.zeros_like(dl[l][:, :P])), f"{kernel}: prefix rows of layer {l}"
            _close(dl[l], want[l], BWD_TOL[dtype], f"{kernel}: grad layer {l}")
        if wgrad:
            _close(dw, want[L], BWD_TOL[dtype], f"{kernel}: grad weights")
    torch.testing.assert_close(results["warp"][0].float(), results["block"][0].float(), rtol=FWD_TOL[dtype][0],
                               atol=FWD_TOL[dtype][1])


# ------------------------------------------------------------------------------------------------
# depth_route

# (energy, bound, gamma: None | "scalar" | "vector", cap)
ROUTES = [
    ("l2", "tanh", "scalar", None),
    ("l2", "tanh", "vector", None),
    ("softmax", "tanh", None, None),
    ("none", "norm_cap", None, 0.8),
    ("l2", "norm_cap", None, 0.8),
    ("softmax", "none", None, None),
]
# (B, N, D, L, layout): fp32 vectors for 24/100, bf16 vectors for 24, scalar for 37 and strided.
ROUTE_SHAPES = [(1, 5, 24, 3, "list"), (2, 37, 100, 7, "stacked"), (1, 5, 37, 1, "strided")]


def _route_inputs(B, N, D, L, layout, dtype, gamma_kind):
    experts = _layers(L, B, N, D, dtype, layout)
    experts = [(e - 3) / 2 for e in experts]  # back to unit scale
    logits = torch.randn(B, N, L)
    base = torch.randn(B, N, D, dtype=torch.float64).to(dtype)
    gamma = None
    if gamma_kind == "scalar":
        gamma = torch.tensor([0.7])
    elif gamma_kind == "vector":
        gamma = torch.randn(D)
    return experts, logits, base, gamma


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", range(len(ROUTE_SHAPES)))
@pytest.mark.parametrize("route", range(len(ROUTES)))
def test_depth_route_forward(kern, dtype, shape, route):
    B, N, D, L, layout = ROUTE_SHAPES[shape]
    energy, bound, gk, cap = ROUTES[route]
    torch.manual_seed(10 * shape + route)
    experts, logits, base, gamma = _route_inputs(B, N, D, L, layout, dtype, gk)
    out = kern.depth_route(experts, logits, base, energy, bound, gamma, cap or 0.0)
    ref = fu.depth_route_reference(experts, logits, base, energy=energy, bound=bound, gamma=gamma, cap=cap)
    assert out.shape == base.shape and out.dtype == dtype
    _close(out, ref, FWD_TOL[dtype], f"depth_route {energy}/{bound}/{gk}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", range(len(ROUTE_SHAPES)))
@pytest.mark.parametrize("route", range(len(ROUTES)))
def test_depth_route_backward(kern, dtype, shape, route):
    B, N, D, L, layout = ROUTE_SHAPES[shape]
    energy, bound, gk, cap = ROUTES[route]
    torch.manual_seed(200 + 10 * shape + route)
    experts, logits, base, gamma = _route_inputs(B, N, D, L, layout, dtype, gk)
    grad = torch.randn(B, N, D, dtype=torch.float64).to(dtype)
    # One "SM": 8 blocks, each striding over several tokens (and reducing γ's gradient across them).
    emu.fusion_launch_config(1 if shape == 1 else 132)
    ge, glog, gbase, ggamma = kern.depth_route_backward(grad, experts, logits, base, energy, bound, gamma,
                                                       cap or 0.0)
    leaves = [e.detach().double().requires_grad_() for e in experts]
    lg = logits.double().requires_grad_()
    b64 = base.double().requires_grad_()
    g64 = gamma.double().requires_grad_() if gamma is not None else None
    out64 = fu.depth_route_reference(leaves, lg, b64, energy=energy, bound=bound, gamma=g64, cap=cap)
    req = leaves + [lg, b64] + ([g64] if g64 is not None else [])
    want = torch.autograd.grad(out64, req, grad.double())
    tol = BWD_TOL[dtype]
    for l in range(L):
        _close(ge[l], want[l], tol, f"grad expert {l}")
    _close(glog, want[L], tol, "grad router_logits")
    _close(gbase, want[L + 1], tol, "grad base")
    if gamma is not None:
        # Sums over every token: the bf16 rounding of the inputs adds up.
        _close(ggamma, want[L + 2], tol if dtype == torch.float32 else (5e-2, 5e-2), "grad gamma")
    else:
        assert ggamma.numel() == 0


def test_depth_route_norm_cap_nan_reaches_the_gradients(kern):
    """A NaN expert element leaves its token uncapped and NaN forward; its gradients must be NaN too
    (as the reference's), not finite values a gradient scaler would accept; other tokens stay finite."""
    torch.manual_seed(7)
    experts = [torch.randn(1, 3, 40) for _ in range(3)]
    experts[1][0, 0, 5] = float("nan")
    logits, base, grad = torch.randn(1, 3, 3), torch.randn(1, 3, 40), torch.randn(1, 3, 40)
    ge, glog, gbase, _ = kern.depth_route_backward(grad, experts, logits, base, "l2", "norm_cap", None, 0.5)
    for g in (*ge, gbase, glog):
        assert torch.isnan(g[0, 0]).any() and torch.isfinite(g[0, 1:]).all()


# The two depth_route kernel pairs: warp per token (rows of 16-byte vectors with D <= 1024, the
# default) and block per token (RAEKERN_FUSION_KERNEL=block, scalar rows, D > 1024). Widths at the edges
# of the warp kernels' register buckets and past the last; L = 33 and 48 put weights in both registers
# of a lane; few "SMs" make each warp stride over several tokens (γ's gradient summed across them).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 264, 768, 1024, 1032])
@pytest.mark.parametrize("L", [1, 33, 48])
@pytest.mark.parametrize("route", [0, 1, 2, 3])
def test_depth_route_kernels_agree(kern, monkeypatch, dtype, D, L, route):
    energy, bound, gk, cap = ROUTES[route]
    torch.manual_seed(D + L + route)
    B, N = 2, 7
    experts, logits, base, gamma = _route_inputs(B, N, D, L, "list", dtype, gk)
    grad = torch.randn(B, N, D).to(dtype)
    emu.fusion_launch_config(1)
    results = _warp_and_block(monkeypatch, lambda: (
        kern.depth_route(experts, logits, base, energy, bound, gamma, cap or 0.0),
        *kern.depth_route_backward(grad, experts, logits, base, energy, bound, gamma, cap or 0.0)))
    leaves = [e.detach().double().requires_grad_() for e in experts]
    lg, b64 = logits.double().requires_grad_(), base.double().requires_grad_()
    g64 = gamma.double().requires_grad_() if gamma is not None else None
    out64 = fu.depth_route_reference(leaves, lg, b64, energy=energy, bound=bound, gamma=g64, cap=cap)
    want = torch.autograd.grad(out64, leaves + [lg, b64] + ([g64] if g64 is not None else []), grad.double())
    for kernel, (out, ge, glog, gbase, ggamma) in results.items():
        _close(out, out64.detach(), FWD_TOL[dtype], f"{kernel}: out")
        for l in (0, L - 1):
            _close(ge[l], want[l], BWD_TOL[dtype], f"{kernel}: grad expert {l}")
        _close(glog, want[L], BWD_TOL[dtype], f"{kernel}: grad router_logits")
        _close(gbase, want[L + 1], BWD_TOL[dtype], f"{kernel}: grad base")
        if gamma is not None:
            _close(ggamma, want[L + 2], BWD_TOL[dtype] if dtype == torch.float32 else (5e-2, 5e-2),
                   f"{kernel}: grad gamma")
    # Per-token results: the same operations up to the order of the expert sum.
    warp, block = results["warp"], results["block"]
    torch.testing.assert_close(warp[0].float(), block[0].float(), rtol=FWD_TOL[dtype][0], atol=FWD_TOL[dtype][1])


# ------------------------------------------------------------------------------------------------
# latent_normalize / latent_denormalize

# (B, H, W, D): several 32×32 tiles with partial edges in both N and D.
LATENT_SHAPES = [(1, 1, 1, 8), (2, 5, 7, 37), (1, 6, 7, 72),
                 # even sizes: 16-bit types move adjacent pairs (64×64 tiles), W odd keeps the
                 # channels-first side on single elements
                 (2, 4, 6, 72), (1, 10, 8, 130), (1, 2, 3, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LATENT_SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_latent_normalize_roundtrip_and_backward(kern, dtype, shape, strided):
    B, H, W, D = shape
    N = H * W
    torch.manual_seed(B * 1000 + N + D)
    mean, var = torch.randn(D, H, W), torch.rand(D, H, W) + 0.2
    z = torch.randn(B, N, D, dtype=torch.float64).to(dtype)
    if strided:
        z = torch.randn(B, D, N, dtype=torch.float64).to(dtype).transpose(1, 2)
    eps = 1e-5
    x = kern.latent_normalize(z, mean, var, eps)
    _close(x, fu.latent_normalize_reference(z, mean, var, eps), FWD_TOL[dtype], "latent_normalize")
    xs = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if strided else x  # channels-last view
    back = kern.latent_denormalize(xs, mean, var, eps)
    _close(back, fu.latent_denormalize_reference(xs, mean, var, eps), FWD_TOL[dtype], "latent_denormalize")

    g_cf = torch.randn(B, D, H, W, dtype=torch.float64).to(dtype)
    g_tok = torch.randn(B, N, D, dtype=torch.float64).to(dtype)
    z64 = z.double().requires_grad_()
    want_z = torch.autograd.grad(fu.latent_normalize_reference(z64, mean.double(), var.double(), eps), z64,
                                 g_cf.double())[0]
    _close(kern.latent_normalize_backward(g_cf, var, eps), want_z, BWD_TOL[dtype], "latent_normalize_backward")
    x64 = xs.double().requires_grad_()
    want_x = torch.autograd.grad(fu.latent_denormalize_reference(x64, mean.double(), var.double(), eps), x64,
                                 g_tok.double())[0]
    _close(kern.latent_denormalize_backward(g_tok, var, eps), want_x, BWD_TOL[dtype], "latent_denormalize_backward")


def test_latent_normalize_backward_checks_the_grid_of_var(kern):
    # var [D, W, H] has the right H·W but the wrong grid: the CUDA kernel takes the width from var
    D, H, W = 8, 3, 5
    g = torch.randn(2, D, H, W)
    var = torch.rand(D, W, H) + 0.5
    for op in (kern.latent_normalize_backward, torch.ops.raekern.latent_normalize_backward):
        with pytest.raises(ValueError, match="'var' must have shape \\[D, H, W\\]"):
            op(g, var, 1e-5)



@pytest.mark.parametrize("dtype", DTYPES)
def test_stacked_form_returns_one_gradient(kern, dtype):
    """An [L, B, T, D] tensor as the one entry of the layer list (the ops' stacked form): the CUDA
    launchers split it into views, and the backwards return one [L, B, T, D] gradient equal to the
    list form's L gradients stacked."""
    torch.manual_seed(7)
    E = (torch.randn(3, 2, 5, 24, dtype=torch.float64) * 2 + 1).to(dtype)
    logits, base = torch.randn(2, 5, 3), torch.randn(2, 5, 24).to(dtype)
    gamma, grad = torch.randn(24), torch.randn(2, 5, 24).to(dtype)
    assert torch.equal(kern.depth_route([E], logits, base, "l2", "tanh", gamma, 0.0),
                       kern.depth_route(list(E.unbind(0)), logits, base, "l2", "tanh", gamma, 0.0))
    stacked = kern.depth_route_backward(grad, [E], logits, base, "l2", "tanh", gamma, 0.0)
    listed = kern.depth_route_backward(grad, list(E.unbind(0)), logits, base, "l2", "tanh", gamma, 0.0)
    assert len(stacked[0]) == 1 and torch.equal(stacked[0][0], torch.stack(listed[0]))
    for a, b in zip(stacked[1:], listed[1:]):
        assert torch.equal(a, b)
    H = (torch.randn(3, 2, 6, 24, dtype=torch.float64) * 2 + 3).to(dtype)
    args = (None, 1, True, 1e-5, "mean", True, False)
    assert torch.equal(kern.layer_stack_fuse([H], *args, 0, 0, None, None, 1e-5),
                       kern.layer_stack_fuse(list(H.unbind(0)), *args, 0, 0, None, None, 1e-5))
    g = torch.randn(2, 5, 24).to(dtype)
    dl_s, _ = kern.layer_stack_fuse_backward(g, [H], *args, None, 1e-5, False)
    dl_l, _ = kern.layer_stack_fuse_backward(g, list(H.unbind(0)), *args, None, 1e-5, False)
    assert len(dl_s) == 1 and torch.equal(dl_s[0], torch.stack(dl_l))
