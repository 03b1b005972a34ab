"""Fusion family: layer_stack_fuse, depth_route, latent_(de)normalize, LatentStats and the modules."""
import pytest
import torch

import raekern.ops as ops
from raekern.ops import fusion as fu

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def close(a, b, dtype):
    torch.testing.assert_close(a.float() if dtype != torch.float64 else a,
                               b.float() if dtype != torch.float64 else b, **TOL[dtype])


def layers(L, B, T, D, dtype, device="cpu", scale=1.0, offset=0.0, grad=False):
    return [(torch.randn(B, T, D, device=device, dtype=torch.float64) * scale + offset).to(dtype)
            .requires_grad_(grad) for _ in range(L)]


# ------------------------------------------------------------------------------------------------
# layer_stack_fuse

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D,P", [(1, 1, 8, 0), (2, 262, 37, 5), (1, 273, 64, 5), (3, 9, 1, 1)])
@pytest.mark.parametrize("mode", ["mean", "sum+raw", "layer_w", "token_w+last_mean", "last_mean"])
def test_layer_stack_fuse_matches_reference(device, dtype, B, T, D, P, mode):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only (the CUDA launcher refuses it by design)")
    L = 3
    hs = layers(L, B, T, D, dtype, device, scale=3.0, offset=5.0)
    N = T - P
    kw = dict(skip_tokens=P, eps=1e-5)
    if mode == "sum+raw":
        kw.update(reduce="sum", normalize=False)
    elif mode == "layer_w":
        kw.update(weights=torch.randn(L, device=device))
    elif mode == "token_w+last_mean":
        kw.update(weights=torch.randn(B, N, L, device=device), add_last_token_mean=True)
    elif mode == "last_mean":
        kw.update(add_last_token_mean=True)
    if D == 1 and kw.get("normalize", True):
        kw["normalize"] = False  # LayerNorm over one channel is identically 0
    out = ops.layer_stack_fuse(hs, **kw)
    ref = fu.layer_stack_fuse_reference(hs, **kw)
    assert out.shape == (B, N, D) and out.dtype == dtype
    close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_stack_fuse_channels_first_with_stats(dtype):
    B, H, W, D, P, L = 2, 4, 5, 40, 5, 4
    hs = layers(L, B, H * W + P, D, dtype)
    mean, var = torch.randn(D, H, W), torch.rand(D, H, W) + 0.1
    kw = dict(skip_tokens=P, add_last_token_mean=True, channels_first=True, latent_mean=mean, latent_var=var)
    out = ops.layer_stack_fuse(hs, **kw)
    assert out.shape == (B, D, H, W)
    close(out, fu.layer_stack_fuse_reference(hs, **kw), dtype)
    # Without statistics it is the plain transpose; square grids are inferred.
    hs2 = layers(2, B, 16 + 1, D, dtype)
    close(ops.layer_stack_fuse(hs2, skip_tokens=1, channels_first=True),
          fu.layer_stack_fuse_reference(hs2, skip_tokens=1, channels_first=True), dtype)


def test_layer_stack_fuse_stacked_and_strided_inputs():
    L, B, T, D = 4, 2, 21, 48
    stacked = torch.randn(L, B, T, D)
    ref = fu.layer_stack_fuse_reference(stacked, skip_tokens=5)
    torch.testing.assert_close(ops.layer_stack_fuse(stacked, skip_tokens=5), ref)
    # Non-contiguous: every layer a strided view (D-stride 2, token-major transposed storage).
    wide = torch.randn(L, B, T, 2 * D)[..., ::2]
    tr = [torch.randn(B, D, T).transpose(1, 2) for _ in range(L)]
    for hs in (list(wide.unbind(0)), tr):
        torch.testing.assert_close(ops.layer_stack_fuse(hs, skip_tokens=5),
                                   fu.layer_stack_fuse_reference(hs, skip_tokens=5))
    # Stride 0: a layer broadcast over the batch and tokens.
    row = torch.randn(1, 1, D).expand(B, T, D)
    hs = [row, torch.randn(B, T, D)]
    torch.testing.assert_close(ops.layer_stack_fuse(hs, skip_tokens=1, add_last_token_mean=True),
                               fu.layer_stack_fuse_reference(hs, skip_tokens=1, add_last_token_mean=True))


def test_layer_stack_fuse_large_offsets_keep_precision():
    # DINO hidden states have channels in the hundreds; the two-pass variance must not cancel.
    hs = layers(2, 1, 9, 256, torch.float32, offset=300.0, scale=0.05)
    exact = fu.layer_stack_fuse_reference([h.double() for h in hs])
    torch.testing.assert_close(ops.layer_stack_fuse(hs).double(), exact, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_stack_fuse_backward_matches_reference(dtype):
    B, T, D, P, L = 2, 19, 24, 3, 3
    base = layers(L, B, T, D, dtype, scale=2.0, offset=1.0)
    for kw in (dict(add_last_token_mean=True), dict(weights=True), dict(token_weights=True),
               dict(channels_first=True, grid=(4, 4), stats=True, add_last_token_mean=True)):
        kw = dict(kw)
        w = None
        if kw.pop("weights", False):
            w = torch.randn(L)
        if kw.pop("token_weights", False):
            w = torch.randn(B, T - P, L)
        if kw.pop("stats", False):
            kw.update(latent_mean=torch.randn(D, 4, 4), latent_var=torch.rand(D, 4, 4) + 0.5)
        grads = []
        for fn in (ops.layer_stack_fuse, fu.layer_stack_fuse_reference):
            hs = [h.detach().clone().requires_grad_() for h in base]
            ww = w.clone().requires_grad_() if w is not None else None
            out = fn(hs, ww, skip_tokens=P, **kw)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            out.backward(g)
            grads.append([h.grad for h in hs] + ([ww.grad] if ww is not None else []))
        for a, b in zip(*grads):
            close(a, b, dtype)
        assert (grads[0][0][:, :P] == 0).all()


def test_layer_stack_fuse_gradcheck():
    B, T, D, P, L = 1, 6, 5, 2, 3
    hs = layers(L, B, T, D, torch.float64, grad=True)
    w = torch.randn(B, T - P, L, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(D, 2, 2, dtype=torch.float64), torch.rand(D, 2, 2, dtype=torch.float64) + 0.5

    def f(*args):
        return ops.layer_stack_fuse(list(args[:L]), args[L], skip_tokens=P, add_last_token_mean=True,
                                    channels_first=True, latent_mean=mean, latent_var=var)

    assert torch.autograd.gradcheck(f, (*hs, w))
    wl = torch.randn(L, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.layer_stack_fuse(list(a[:L]), a[L], skip_tokens=P), (*hs, wl))
    assert torch.autograd.gradcheck(
        lambda *a: ops.layer_stack_fuse(list(a), skip_tokens=P, normalize=False, reduce="sum",
                                        add_last_token_mean=True), tuple(hs))


def test_layer_stack_fuse_opcheck():
    hs = layers(3, 2, 7, 8, torch.float32, grad=True)
    w = torch.randn(2, 5, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.raekern.layer_stack_fuse,
                          (hs, w, 2, True, 1e-6, "weighted", True, False, 0, 0, None, None, 1e-5))
    m, v = torch.randn(8, 1, 5), torch.rand(8, 1, 5) + 0.5
    torch.library.opcheck(torch.ops.raekern.layer_stack_fuse,
                          (hs, None, 2, True, 1e-6, "mean", False, True, 1, 5, m, v, 1e-5))


def test_layer_stack_fuse_compile():
    hs = layers(3, 2, 11, 16, torch.float32, grad=True)
    w = torch.randn(3, requires_grad=True)

    def f(hs, w):
        return ops.layer_stack_fuse(hs, w, skip_tokens=1, add_last_token_mean=True).square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(hs, w)
    out.backward()
    g_c = [h.grad.clone() for h in hs] + [w.grad.clone()]
    for t in hs + [w]:
        t.grad = None
    ref = f(hs, w)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(g_c, [h.grad for h in hs] + [w.grad]):
        torch.testing.assert_close(a, b)


def test_layer_stack_fuse_inductor_compile():
    stacked = torch.randn(2, 2, 10, 16)
    f = torch.compile(lambda x: ops.layer_stack_fuse(x, skip_tokens=1, channels_first=True, grid=(3, 3)),
                      fullgraph=True)
    torch.testing.assert_close(f(stacked), fu.layer_stack_fuse_reference(stacked, skip_tokens=1,
                                                                          channels_first=True, grid=(3, 3)))


def test_layer_stack_fuse_compile_dynamic_without_grid():
    """The square grid is derived from the token count and stays symbolic (SymInt grid in the schema):
    one graph serves every square token count."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda ls: ops.layer_stack_fuse(ls, skip_tokens=1, channels_first=True),
                      fullgraph=True, dynamic=True, backend=backend)
    for T in (17, 10, 37):
        hs = [torch.randn(2, T, 8)]
        torch.testing.assert_close(f(hs), fu.layer_stack_fuse_reference(hs, skip_tokens=1, channels_first=True))
    assert len(graphs) == 1


def test_layer_stack_fuse_weight_grad_is_bit_identical_run_to_run():
    """Tasks are claimed dynamically: the [L] weight gradient is summed per task, in task order."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        hs = [torch.randn(4, 260, 64, generator=g, dtype=torch.float64) for _ in range(3)]
        w0, up = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(4, 256, 64, generator=g,
                                                                                dtype=torch.float64)
        seen = set()
        for _ in range(12):
            w = w0.clone().requires_grad_()
            (dw,) = torch.autograd.grad(ops.layer_stack_fuse(hs, w, skip_tokens=4), [w], up)
            seen.add(tuple(dw.tolist()))
        assert len(seen) == 1
    finally:
        torch.set_num_threads(n)


def test_double_backward_is_refused():
    hs = layers(2, 2, 7, 8, torch.float64, grad=True)
    (g,) = torch.autograd.grad(ops.layer_stack_fuse(hs, skip_tokens=1).pow(3).sum(), hs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.pow(2).sum(), hs[0])


@pytest.mark.parametrize("kw, arg", [
    (dict(grid=(4,), channels_first=True), "grid"),
    (dict(grid=(2, 2)), "grid"),  # a grid without channels_first would be ignored
    (dict(grid=(2.0, 2), channels_first=True), "grid"),
    (dict(eps=-10.0), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(latent_eps=-1.0), "latent_eps"),
    (dict(skip_tokens=True), "skip_tokens"),
])
def test_layer_stack_fuse_argument_errors(kw, arg):
    layers = [torch.randn(2, 5, 8) for _ in range(2)]
    with pytest.raises((ValueError, TypeError), match=f"'{arg}'"):
        fu.layer_stack_fuse(layers, **{"skip_tokens": 1, **kw})


def test_latent_ops_refuse_a_negative_eps():
    z, m, v = torch.randn(1, 4, 3), torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    for fn, x in ((fu.latent_normalize, z), (fu.latent_denormalize, torch.randn(1, 3, 2, 2))):
        with pytest.raises(ValueError, match="'eps'"):
            fn(x, m, v, eps=-5.0)


def test_depth_route_norm_cap_nan_reaches_the_gradients():
    torch.manual_seed(7)
    experts = [torch.randn(1, 3, 40, requires_grad=True) for _ in range(3)]
    with torch.no_grad():
        experts[1][0, 0, 5] = float("nan")
    logits = torch.randn(1, 3, 3, requires_grad=True)
    base = torch.randn(1, 3, 40, requires_grad=True)
    out = fu.depth_route(experts, logits, base, bound="norm_cap", cap=0.5)
    out.backward(torch.randn_like(out))
    for g in (*(e.grad for e in experts), base.grad, logits.grad):
        assert torch.isnan(g[0, 0]).any() and torch.isfinite(g[0, 1:]).all()


def test_layer_stack_fuse_errors():
    hs = layers(2, 2, 7, 8, torch.float32)
    with pytest.raises(ValueError, match="'layers'"):
        ops.layer_stack_fuse([hs[0], torch.randn(2, 7, 9)])
    with pytest.raises(TypeError, match="'layers'"):
        ops.layer_stack_fuse([hs[0], hs[1].double()])
    with pytest.raises(ValueError, match="'layers'"):
        ops.layer_stack_fuse([])
    with pytest.raises(ValueError, match="'layers'"):
        ops.layer_stack_fuse(torch.randn(0, 2, 5, 8))  # L = 0 as one tensor
    with pytest.raises(TypeError, match="'layers'"):
        ops.layer_stack_fuse("x")
    with pytest.raises(ValueError, match="'skip_tokens'"):
        ops.layer_stack_fuse(hs, skip_tokens=7)
    with pytest.raises(ValueError, match="'weights'"):
        ops.layer_stack_fuse(hs, torch.randn(3))  # layer count mismatch
    with pytest.raises(ValueError, match="'weights'"):
        ops.layer_stack_fuse(hs, reduce="weighted")
    with pytest.raises(ValueError, match="'reduce'"):
        ops.layer_stack_fuse(hs, reduce="max")
    with pytest.raises(ValueError, match="'latent_mean'"):
        ops.layer_stack_fuse(hs, skip_tokens=3, channels_first=True, latent_mean=torch.randn(8, 3, 3),
                             latent_var=torch.rand(8, 2, 2))
    with pytest.raises(ValueError, match="'latent_var'"):
        ops.layer_stack_fuse(hs, skip_tokens=3, channels_first=True, latent_mean=torch.randn(8, 2, 2),
                             latent_var=torch.rand(8, 2, 3))
    with pytest.raises(ValueError, match="'grid'"):
        ops.layer_stack_fuse(hs, channels_first=True)  # 7 tokens: no square grid
    # The C++ op checks the same things when called directly.
    with pytest.raises(ValueError, match="'layers'"):
        torch.ops.raekern.layer_stack_fuse([hs[0], torch.randn(2, 7, 9)], None, 0, True, 1e-6, "mean", False,
                                           False, 0, 0, None, None, 1e-5)
    with pytest.raises(ValueError, match="'skip_tokens'"):
        torch.ops.raekern.layer_stack_fuse(hs, None, 9, True, 1e-6, "mean", False, False, 0, 0, None, None, 1e-5)


# ------------------------------------------------------------------------------------------------
# depth_route

ROUTES = [
    dict(energy="l2", bound="tanh", gamma="D"),
    dict(energy="l2", bound="tanh", gamma="scalar"),
    dict(energy="l2", bound="tanh"),
    dict(energy="softmax", bound="norm_cap", cap=0.05),
    dict(energy="l2", bound="norm_cap", cap=50.0),
    dict(energy="none", bound="none"),
]


def _route_kw(kw, D, dtype=torch.float32):
    kw = dict(kw)
    if kw.get("gamma") == "D":
        kw["gamma"] = torch.randn(D, dtype=dtype)
    elif kw.get("gamma") == "scalar":
        kw["gamma"] = torch.randn((), dtype=dtype)
    return kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,D", [(1, 1, 8), (2, 257, 36), (1, 268, 64)])
@pytest.mark.parametrize("route", range(len(ROUTES)))
def test_depth_route_matches_reference(dtype, B, N, D, route):
    L = 5
    ex = layers(L, B, N, D, dtype)
    base = torch.randn(B, N, D).to(dtype)
    logits = torch.randn(B, N, L)
    kw = _route_kw(ROUTES[route], D)
    out = ops.depth_route(ex, logits, base, **kw)
    close(out, fu.depth_route_reference(ex, logits, base, **kw), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [1024, 1048])
def test_depth_route_wide_rows(dtype, D):
    # Rows of many 16-lane blocks (the CPU kernels' vector path, 16-bit rows in 32-channel steps; 1048
    # ends in a 16-lane step and a partial one), forward and every gradient.
    L, B, N = 3, 2, 520
    ex0 = layers(L, B, N, D, dtype)
    base0, logits0, gamma0 = torch.randn(B, N, D).to(dtype), torch.randn(B, N, L), torch.randn(D)
    g = torch.randn(B, N, D).to(dtype)
    res = []
    for fn in (ops.depth_route, fu.depth_route_reference):
        args = [t.clone().requires_grad_() for t in (*ex0, logits0, base0, gamma0)]
        out = fn(args[:L], args[L], args[L + 1], gamma=args[L + 2])
        out.backward(g)
        res.append([out] + [a.grad for a in args])
    for a, b in zip(*res):
        close(a, b, dtype)


def test_depth_route_stacked_strided_and_broadcast():
    L, B, N, D = 3, 2, 17, 24
    stacked = torch.randn(L, B, N, 2 * D)[..., ::2]
    logits = torch.randn(B, L, N).transpose(1, 2)
    base = torch.randn(1, N, D).expand(B, N, D)
    kw = dict(gamma=torch.randn(D))
    torch.testing.assert_close(ops.depth_route(stacked, logits, base, **kw),
                               fu.depth_route_reference(stacked, logits, base, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", range(len(ROUTES)))
def test_depth_route_backward_matches_reference(dtype, route):
    L, B, N, D = 3, 2, 9, 20
    ex0 = layers(L, B, N, D, dtype)
    base0, logits0 = torch.randn(B, N, D).to(dtype), torch.randn(B, N, L)
    kw0 = _route_kw(ROUTES[route], D)
    g = torch.randn(B, N, D).to(dtype)
    grads = []
    for fn in (ops.depth_route, fu.depth_route_reference):
        ex = [e.clone().requires_grad_() for e in ex0]
        base, logits = base0.clone().requires_grad_(), logits0.clone().requires_grad_()
        kw = dict(kw0)
        if torch.is_tensor(kw.get("gamma")):
            kw["gamma"] = kw["gamma"].clone().requires_grad_()
        fn(ex, logits, base, **kw).backward(g)
        grads.append([e.grad for e in ex] + [logits.grad, base.grad] +
                     ([kw["gamma"].grad] if torch.is_tensor(kw.get("gamma")) else []))
    for a, b in zip(*grads):
        close(a, b, dtype) if a.dtype == dtype else close(a, b, torch.float32 if dtype == torch.float32 else dtype)


@pytest.mark.parametrize("route", range(len(ROUTES)))
def test_depth_route_gradcheck(route):
    L, B, N, D = 3, 1, 3, 6
    ex = layers(L, B, N, D, torch.float64, grad=True)
    base = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(B, N, L, dtype=torch.float64, requires_grad=True)
    kw = _route_kw(ROUTES[route], D, torch.float64)
    gamma = kw.pop("gamma", None)
    args = (*ex, logits, base) + ((gamma.requires_grad_(),) if gamma is not None else ())

    def f(*a):
        return ops.depth_route(list(a[:L]), a[L], a[L + 1], gamma=a[L + 2] if gamma is not None else None, **kw)

    assert torch.autograd.gradcheck(f, args)


def test_depth_route_opcheck_and_compile():
    L, B, N, D = 3, 2, 5, 8
    ex = layers(L, B, N, D, torch.float32, grad=True)
    base = torch.randn(B, N, D, requires_grad=True)
    logits = torch.randn(B, N, L, requires_grad=True)
    gamma = torch.randn(D, requires_grad=True)
    torch.library.opcheck(torch.ops.raekern.depth_route, (ex, logits, base, "l2", "tanh", gamma, 0.0))
    torch.library.opcheck(torch.ops.raekern.depth_route, (ex, logits, base, "softmax", "norm_cap", None, 0.1))
    f = torch.compile(lambda *a: ops.depth_route(list(a[:L]), a[L], a[L + 1], gamma=a[L + 2]).sum(),
                      fullgraph=True, backend="aot_eager")
    f(*ex, logits, base, gamma).backward()
    assert gamma.grad is not None and logits.grad is not None


def _graph_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        todo += [f for f, _ in n.next_functions]
    return [type(n).__name__ for n in seen]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_stacked_inputs_get_one_stacked_gradient(dtype):
    """One [L, B, T, D] tensor goes to the kernels as is (their stacked form): the same outputs and,
    bit for bit, the same gradients as its L slices given as a list, returned as one [L, B, T, D]
    gradient: no unbind in the graph, so autograd never stacks L gradients into a copy."""
    g = torch.Generator().manual_seed(3)
    E = torch.randn(4, 2, 8, 64, generator=g).to(dtype).requires_grad_()
    base = torch.randn(2, 8, 64, generator=g).to(dtype).requires_grad_()
    logits = torch.randn(2, 8, 4, generator=g).requires_grad_()
    gamma = torch.randn(64, generator=g).to(dtype).requires_grad_()
    H = torch.randn(3, 2, 9, 64, generator=g).to(dtype).requires_grad_()
    weights = torch.randn(3, generator=g).requires_grad_()
    cases = (
        (E, lambda x: ops.depth_route(x, logits, base, gamma=gamma), (logits, base, gamma)),
        (H, lambda x: ops.layer_stack_fuse(x, weights, skip_tokens=1, add_last_token_mean=True), (weights,)),
    )
    for stacked, fn, others in cases:
        y = fn(stacked)
        assert not any("Unbind" in n or "Stack" in n for n in _graph_nodes(y)), _graph_nodes(y)
        gy = torch.randn(y.shape, generator=g).to(dtype)
        got = torch.autograd.grad(y, (stacked, *others), gy)
        parts = [p.detach().clone().requires_grad_() for p in stacked.unbind(0)]
        y_list = fn(parts)
        want = torch.autograd.grad(y_list, (*parts, *others), gy)
        assert torch.equal(y, y_list)
        assert got[0].shape == stacked.shape and torch.equal(got[0], torch.stack(want[:len(parts)]))
        for a, b in zip(got[1:], want[len(parts):]):
            assert torch.equal(a, b)


def test_stacked_form_opcheck_gradcheck_compile():
    """The stacked form ([L, B, T, D] as a one-entry list) through opcheck, fp64 gradcheck and
    torch.compile(fullgraph=True) with its backward."""
    E = torch.randn(3, 2, 5, 8, requires_grad=True)
    base, logits = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 3, requires_grad=True)
    gamma = torch.randn(8, requires_grad=True)
    torch.library.opcheck(torch.ops.raekern.depth_route, ([E], logits, base, "l2", "tanh", gamma, 0.0))
    H = torch.randn(3, 2, 6, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.raekern.layer_stack_fuse,
                          ([H], None, 1, True, 1e-6, "mean", True, False, 0, 0, None, None, 1e-5))
    E64 = torch.randn(3, 1, 3, 6, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    l64 = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, lg, b: ops.depth_route(e, lg, b), (E64, l64, b64))
    H64 = torch.randn(2, 1, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: ops.layer_stack_fuse(h, skip_tokens=1, add_last_token_mean=True),
                                    (H64,))
    f = torch.compile(lambda e, h: ops.depth_route(e, logits, base, gamma=gamma).sum() +
                      ops.layer_stack_fuse(h, skip_tokens=1).sum(), fullgraph=True, backend="aot_eager")
    f(E, H).backward()
    assert E.grad is not None and E.grad.shape == E.shape and H.grad is not None and H.grad.shape == H.shape


def test_depth_route_errors():
    L, B, N, D = 3, 2, 5, 8
    ex = layers(L, B, N, D, torch.float32)
    base, logits = torch.randn(B, N, D), torch.randn(B, N, L)
    with pytest.raises(ValueError, match="'router_logits'"):
        ops.depth_route(ex, torch.randn(B, N, L + 1), base)  # layer count mismatch
    with pytest.raises(ValueError, match="'experts'"):
        ops.depth_route([ex[0], ex[1][:, :4]], logits[..., :2], base)
    with pytest.raises(ValueError, match="'base'"):
        ops.depth_route(ex, logits, base[:, :4])
    with pytest.raises(ValueError, match="'energy'"):
        ops.depth_route(ex, logits, base, energy="sparsemax")
    with pytest.raises(ValueError, match="'bound'"):
        ops.depth_route(ex, logits, base, bound="clip")
    with pytest.raises(ValueError, match="'gamma'"):
        ops.depth_route(ex, logits, base, gamma=torch.randn(D + 1))
    with pytest.raises(ValueError, match="'cap'"):
        ops.depth_route(ex, logits, base, bound="norm_cap")
    with pytest.raises(ValueError, match="'router_logits'"):
        torch.ops.raekern.depth_route(ex, torch.randn(B, N, 2), base, "l2", "tanh", None, 0.0)
    with pytest.raises(ValueError, match="'experts'"):
        ops.depth_route(torch.randn(0, B, N, D), torch.randn(B, N, 0), base)


def test_depth_route_zero_gate_is_identity():
    ex = layers(4, 2, 7, 16, torch.float32)
    base = torch.randn(2, 7, 16)
    out = ops.depth_route(ex, torch.randn(2, 7, 4), base, gamma=torch.zeros(16))
    assert torch.equal(out, base)


# ------------------------------------------------------------------------------------------------
# latent_normalize / latent_denormalize

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,W,D", [(1, 1, 1, 8), (2, 16, 16, 37), (3, 7, 5, 64)])
def test_latent_normalize_roundtrip(dtype, B, H, W, D):
    z = torch.randn(B, H * W, D).to(dtype)
    mean, var = torch.randn(D, H, W), torch.rand(D, H, W) + 0.1
    x = ops.latent_normalize(z, mean, var)
    assert x.shape == (B, D, H, W)
    close(x, fu.latent_normalize_reference(z, mean, var), dtype)
    y = ops.latent_denormalize(x, mean, var)
    close(y, fu.latent_denormalize_reference(x, mean, var), dtype)
    if dtype in (torch.float64, torch.float32):
        close(y, z, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,W,D", [(2, 12, 15, 40), (4, 16, 16, 1024), (4, 12, 28, 784), (8, 12, 32, 800)])
def test_latent_normalize_blocked(dtype, B, H, W, D):
    # The CPU kernels' 16x16 register tiles: partial token and channel blocks, and a full-size tile grid.
    # The last two are over 4 MiB, where full tiles are written with streaming stores and partial
    # token / channel blocks (336 = 10.5 tiles, 784 = 3 blocks + 16 channels) with masked ones.
    z = torch.randn(B, H * W, D).to(dtype)
    mean, var = torch.randn(D, H, W), torch.rand(D, H, W) + 0.1
    x = ops.latent_normalize(z, mean, var)
    close(x, fu.latent_normalize_reference(z, mean, var), dtype)
    close(ops.latent_denormalize(x, mean, var), fu.latent_denormalize_reference(x, mean, var), dtype)
    zr = z.clone().requires_grad_()
    g = torch.randn(B, D, H, W).to(dtype)
    (gz,) = torch.autograd.grad(ops.latent_normalize(zr, mean, var), zr, g)
    (gr,) = torch.autograd.grad(fu.latent_normalize_reference(zr, mean, var), zr, g)
    close(gz, gr, dtype)


def test_latent_normalize_strided_inputs():
    B, H, W, D = 2, 4, 4, 24
    mean, var = torch.randn(D, H, W), torch.rand(D, H, W) + 0.1
    z = torch.randn(B, D, H * W).transpose(1, 2)
    torch.testing.assert_close(ops.latent_normalize(z, mean, var), fu.latent_normalize_reference(z, mean, var))
    x = torch.randn(B, H, W, D).permute(0, 3, 1, 2)
    torch.testing.assert_close(ops.latent_denormalize(x, mean, var), fu.latent_denormalize_reference(x, mean, var))
    xb = torch.randn(1, D, 1, 1).expand(B, D, H, W)
    torch.testing.assert_close(ops.latent_denormalize(xb, mean, var),
                               fu.latent_denormalize_reference(xb, mean, var))


def test_latent_normalize_grad_opcheck_compile():
    B, H, W, D = 2, 3, 2, 5
    mean = torch.randn(D, H, W, dtype=torch.float64)
    var = torch.rand(D, H, W, dtype=torch.float64) + 0.1
    z = torch.randn(B, H * W, D, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, D, H, W, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: ops.latent_normalize(z, mean, var), (z,))
    assert torch.autograd.gradcheck(lambda x: ops.latent_denormalize(x, mean, var), (x,))
    torch.library.opcheck(torch.ops.raekern.latent_normalize, (z.float().detach().requires_grad_(),
                                                               mean.float(), var.float(), 1e-5))
    torch.library.opcheck(torch.ops.raekern.latent_denormalize, (x.float().detach().requires_grad_(),
                                                                 mean.float(), var.float(), 1e-5))
    f = torch.compile(lambda z: ops.latent_denormalize(ops.latent_normalize(z, mean, var), mean, var),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(z), z)


def test_latent_normalize_errors():
    z, mean, var = torch.randn(2, 16, 8), torch.randn(8, 4, 4), torch.rand(8, 4, 4)
    with pytest.raises(ValueError, match="'mean'"):
        ops.latent_normalize(z, torch.randn(8, 4, 5), var)
    with pytest.raises(ValueError, match="'var'"):
        ops.latent_normalize(z, mean, torch.rand(7, 4, 4))
    with pytest.raises(ValueError, match="'z'"):
        ops.latent_normalize(z[0], mean, var)
    with pytest.raises(ValueError, match="'mean'"):
        ops.latent_denormalize(torch.randn(2, 8, 2, 8), mean, var)
    with pytest.raises(ValueError, match="'var'"):
        torch.ops.raekern.latent_normalize(z, mean, torch.rand(8, 4, 3), 1e-5)


# ------------------------------------------------------------------------------------------------
# modules and statistics

from raekern.models.fusion import (  # noqa: E402
    DepthRoutedFusion, LatentStats, LayerMeanFusion, set_training_phase)


def test_layer_mean_fusion_released_configs():
    hs = [torch.randn(2, 21, 32) for _ in range(25)]  # HF-style: entry 0 = embeddings, 24 blocks
    m = LayerMeanFusion.raev2_dinov3l(7, index_offset=1)
    sel = [hs[i + 1] for i in (11, 13, 15, 17, 19, 21, 23)]
    ref = fu.layer_stack_fuse_reference(sel, skip_tokens=5, eps=1e-5, add_last_token_mean=True)
    torch.testing.assert_close(m(hs), ref)
    m.use_raekern = False
    torch.testing.assert_close(m(hs), ref)
    v1 = LayerMeanFusion.rae_dinov2b()
    torch.testing.assert_close(v1(hs[:12]), torch.nn.functional.layer_norm(hs[11][:, 5:], (32,), eps=1e-6))
    mean, var = torch.randn(32, 4, 4), torch.rand(32, 4, 4) + 0.5
    cf = LayerMeanFusion.raev2_dinov3l(7, index_offset=1, channels_first=True, latent_mean=mean, latent_var=var)
    torch.testing.assert_close(cf(hs), fu.latent_normalize_reference(ref, mean, var))
    with pytest.raises(ValueError, match="'hidden_states'"):
        m(hs[:10])


def test_depth_routed_fusion_starts_at_rae_latent_and_trains():
    torch.manual_seed(0)
    L, B, T, D = 4, 2, 13, 16
    m = DepthRoutedFusion(D, L, 24, skip_tokens=1)
    hs = [torch.randn(B, T, D) for _ in range(L)]
    base = torch.nn.functional.layer_norm(hs[-1][:, 1:], (D,), eps=1e-6)
    torch.testing.assert_close(m(hs), base)  # γ = 0
    with torch.no_grad():
        m.gamma.normal_()
    out = m(hs)
    m.use_raekern = False
    ref = m(hs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    m.use_raekern = True
    m(hs).square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert DepthRoutedFusion().w1.shape == (12, 768, 1536)


@pytest.mark.parametrize("onednn", [False, True])
def test_depth_routed_fusion_backends_agree_with_gradients(monkeypatch, onednn):
    """The raekern backend's experts (L oneDNN GEMMs on the fp32 CPU path that AMD CPUs take, forced
    here, or torch's baddbmm) against the torch backend: output and every parameter's gradient."""
    from raekern.models import layers as LY
    if onednn and not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("no oneDNN linear in this torch build")
    monkeypatch.setattr(LY, "_ONEDNN_FP32", onednn)
    torch.manual_seed(1)
    L, B, T, D = 3, 2, 11, 16
    m = DepthRoutedFusion(D, L, 24, skip_tokens=1)
    with torch.no_grad():
        m.gamma.normal_()
        m.b1.normal_()
        m.b2.normal_()
    hs = [torch.randn(B, T, D) for _ in range(L)]
    res = []
    for use in (True, False):
        m.use_raekern = use
        m.zero_grad(set_to_none=True)
        y = m(hs)
        y.square().mean().backward()
        res.append([y] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        m.use_raekern = True
        torch.testing.assert_close(m(hs), res[1][0], atol=1e-5, rtol=1e-5)  # the no-grad path


@pytest.mark.parametrize("kw, arg", [(dict(gate="chanel"), "gate"), (dict(energy="l1"), "energy"),
                                     (dict(bound="clip"), "bound"), (dict(bound="norm_cap"), "cap"),
                                     (dict(bound="norm_cap", cap=-1.0), "cap"), (dict(cap=0.5), "cap")])
def test_fusion_modules_check_their_configuration(kw, arg):
    with pytest.raises(ValueError, match=f"'{arg}'"):
        DepthRoutedFusion(8, 2, 4, **kw)
    with pytest.raises(ValueError, match="'k'"):
        LayerMeanFusion.raev2_dinov3l(4)


def test_set_training_phase():
    enc, fus, dec = torch.nn.Linear(2, 2), DepthRoutedFusion(8, 2, 4), torch.nn.Linear(2, 2)
    p1 = set_training_phase(1, encoder=enc, fusion=fus, decoder=dec)
    assert {id(p) for p in p1} == {id(p) for p in dec.parameters()}
    p2 = set_training_phase(2, encoder=enc, fusion=fus, decoder=dec)
    assert {id(p) for p in p2} == {id(p) for p in fus.parameters()} and not dec.weight.requires_grad
    assert not dec.training and fus.training and not enc.training
    p3 = set_training_phase(3, encoder=enc, fusion=fus, decoder=dec)
    assert len(p3) == len(list(fus.parameters())) + 2 and not enc.weight.requires_grad
    with pytest.raises(ValueError, match="'phase'"):
        set_training_phase(4)


def test_latent_stats_streaming_merge_and_save(tmp_path):
    data = torch.randn(37, 6, 3, 2, dtype=torch.float64) * 3 + 100
    s = LatentStats()
    for chunk in data.split(5):
        s.update(chunk.float())
    a, b = LatentStats(), LatentStats()
    a.update(data[:11].float())
    b.update(data[11:].float())
    a.merge(b)
    exp_mean, exp_var = data.float().double().mean(0), data.float().double().var(0, unbiased=False)
    for st in (s, a):
        assert st.count == 37
        torch.testing.assert_close(st.mean, exp_mean.float())
        torch.testing.assert_close(st.var, exp_var.float(), rtol=1e-5, atol=1e-6)
    tok = LatentStats((6, 3, 2)).update(data.float().flatten(2).transpose(1, 2))
    torch.testing.assert_close(tok.mean, exp_mean.float())
    s.save(tmp_path / "stat.pt")
    d = LatentStats.load(tmp_path / "stat.pt")
    assert set(d) == {"mean", "var"} and torch.equal(d["mean"], s.mean)
    with pytest.raises(ValueError, match="'z'"):
        s.update(torch.randn(2, 5, 3, 2))


def _stats_worker(rank, path, data):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        # per-epoch use: reduce, add more data, reduce again (each rank's data counted once)
        s = LatentStats().update(data[rank:6:2])
        s.all_reduce()
        first = (s.count, s.mean)
        s.update(data[6 + rank::2])
        s.all_reduce()
        # a rank with no data takes the others' shape; nobody is left waiting
        late = LatentStats()
        if rank == 1:
            late.update(data[:3])
        late.all_reduce()
        # different shapes: the same error on every rank
        odd = LatentStats().update(torch.randn(2, 3 + rank, 2, 2))
        try:
            odd.all_reduce()
            err = None
        except ValueError as e:
            err = str(e)
        torch.save((first, s.count, s.mean, s.var, late.count, late.mean, err), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_latent_stats_all_reduce(tmp_path):
    import torch.multiprocessing as mp
    data = torch.randn(9, 4, 2, 2)
    path = str(tmp_path / "store")
    mp.spawn(_stats_worker, args=(path, data), nprocs=2, join=True)
    for r in range(2):
        first, count, mean, var, late_count, late_mean, err = torch.load(f"{path}.{r}")
        assert first[0] == 6
        torch.testing.assert_close(first[1], data[:6].double().mean(0).float())
        assert count == 9
        torch.testing.assert_close(mean, data.double().mean(0).float())
        torch.testing.assert_close(var, data.double().var(0, unbiased=False).float())
        assert late_count == 3
        torch.testing.assert_close(late_mean, data[:3].double().mean(0).float())
        assert err is not None and "different shapes" in err


def test_latent_stats_errors_before_any_data(tmp_path):
    s = LatentStats()
    for what in ("mean", "var"):
        with pytest.raises(ValueError, match="no statistics yet"):
            getattr(s, what)
    with pytest.raises(ValueError, match="no statistics yet"):
        s.save(tmp_path / "s.pt")
    torch.save({"mean": torch.zeros(2, 2, 2), "var": torch.ones(3, 2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        LatentStats.load(tmp_path / "bad.pt")


def test_depth_route_infinite_logit_keeps_finite_logit_gradients():
    # energy 'none' takes the logits as weights: an inf weight makes f = w·0 NaN in the vector tail past
    # D (17 = 16 + 1), which must not reach the lane sums of the logit gradient
    ex, base = [torch.randn(1, 1, 17) for _ in range(2)], torch.randn(1, 1, 17)
    grads = []
    for fn in (ops.depth_route, fu.depth_route_reference):
        lg = torch.tensor([[[float("inf"), 1.0]]], requires_grad=True)
        out = fn(ex, lg, base, energy="none", bound="tanh")
        out.backward(torch.ones_like(out))
        grads.append(lg.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_numpy_scalars_are_accepted_and_bools_refused():
    np = pytest.importorskip("numpy")
    layers = [torch.randn(2, 5, 8) for _ in range(3)]
    torch.testing.assert_close(ops.layer_stack_fuse(layers, skip_tokens=np.int64(1)),
                               ops.layer_stack_fuse(layers, skip_tokens=1))
    cf = [torch.randn(2, 6, 8) for _ in range(2)]
    torch.testing.assert_close(ops.layer_stack_fuse(cf, channels_first=True, grid=(np.int32(2), np.int64(3))),
                               ops.layer_stack_fuse(cf, channels_first=True, grid=(2, 3)))
    ex, lg, base = [torch.randn(1, 3, 8) for _ in range(2)], torch.randn(1, 3, 2), torch.randn(1, 3, 8)
    torch.testing.assert_close(ops.depth_route(ex, lg, base, bound="norm_cap", cap=np.float32(0.5)),
                               ops.depth_route(ex, lg, base, bound="norm_cap", cap=0.5))
    for cap in (True, "1", float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="argument 'cap'"):
            ops.depth_route(ex, lg, base, bound="norm_cap", cap=cap)

