"""Benchmark cases of the fusion family (DESIGN §6): RAEv2 layer fusion at the released K = 7
DINOv3-L shape (B = 8, T = 261, D = 1024), forward and backward, DRoRAE depth routing and the latent
transposes, each against eager PyTorch and torch.compile of the same math."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raekern.bench.registry import Case, compiled, register, with_switch
from raekern.ops import fusion as fu


def _fuse_math(layers, P, eps):
    ys = [F.layer_norm(h[:, P:], (h.shape[-1],), eps=eps) for h in layers]
    return sum(ys) / len(ys) + ys[-1].mean(dim=1, keepdim=True)


def _route_math(experts, logits, base, gamma):
    w = F.normalize(logits.float(), dim=-1).to(base.dtype)
    f = sum(w[..., l:l + 1] * e for l, e in enumerate(experts))
    return base + gamma * torch.tanh(f)


def _normalize_math(z, mean, var):
    B, N, D = z.shape
    x = z.transpose(1, 2).reshape(B, D, *mean.shape[1:])
    return (x - mean) * torch.rsqrt(var + 1e-5)


def _lazy_grads(make_out, inputs, grad):
    """Gradients of make_out() w.r.t. inputs, timed without the forward: the forward (and for the
    compile baseline, the compilation) happens on the first call, inside the warm-up, and only for
    implementations that are timed (`raekern bench --skip compile` then compiles nothing)."""
    out = []

    def run():
        if not out:
            out.append(make_out())
        return torch.autograd.grad(out[0], inputs, grad, retain_graph=True)
    return run


def _with_block_kernel(device, impls):
    """On CUDA, also the block-per-token kernels (the only ones of the first H200 run), against the
    default warp-per-token ones in the same run."""
    return with_switch(impls, device, "block_kernel", "RAEKERN_FUSION_KERNEL", "block")


@register("fusion")
def fusion_cases(device: str, quick: bool) -> list[Case]:
    cases: list[Case] = []
    for dtype in (torch.float32, torch.bfloat16):
        cases += _cases_for(device, dtype, quick)
    return cases


def _cases_for(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    """One dtype's cases (a function, so each case's closures keep their own tensors)."""
    K, B, T, D, P = (7, 8, 261, 1024, 5) if not quick else (3, 2, 37, 64, 5)
    N = T - P
    cases: list[Case] = []
    es = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device="cpu").manual_seed(0)
    layers = [torch.randn(B, T, D, generator=gen).to(device, dtype) for _ in range(K)]
    shape = f"K={K} B={B} T={T} D={D}"
    eager = lambda: _fuse_math(layers, P, 1e-5)  # noqa: E731
    comp = compiled(lambda hs: _fuse_math(hs, P, 1e-5))
    cases.append(Case(
        "fusion", "layer_stack_fuse fwd", shape, dtype,
        impls=_with_block_kernel(device, {
            "raekern": lambda: fu.layer_stack_fuse(layers, skip_tokens=P, eps=1e-5, add_last_token_mean=True),
            "eager": eager, "compile": lambda: comp(layers)}),
        bytes=(K + 1) * B * N * D * es, notes="RAEv2 K=7 (mean + last-layer token mean)"))

    req = [h.detach().clone().requires_grad_() for h in layers]
    g = torch.randn(B, N, D, generator=gen).to(device, dtype)
    fwd = {"raekern": lambda: fu.layer_stack_fuse(req, skip_tokens=P, eps=1e-5, add_last_token_mean=True),
           "eager": lambda: _fuse_math(req, P, 1e-5), "compile": lambda: comp(req)}
    cases.append(Case(
        "fusion", "layer_stack_fuse bwd", shape, dtype,
        impls=_with_block_kernel(device, {k: _lazy_grads(f, req, g) for k, f in fwd.items()}),
        # K layers read (patch tokens) and grad; the K layer gradients are full [B, T, D] (prefix rows 0)
        bytes=(K * N + N + K * T) * B * D * es, notes="gradients of all K layers"))

    L = 12
    Dr = 768 if not quick else 64
    experts = [torch.randn(B, N, Dr, generator=gen).to(device, dtype) for _ in range(L)]
    logits = torch.randn(B, N, L, generator=gen).to(device, dtype)
    base = torch.randn(B, N, Dr, generator=gen).to(device, dtype)
    gamma = torch.randn(Dr, generator=gen).to(device, dtype)
    rcomp = compiled(_route_math)
    route_fwd = {"raekern": lambda: fu.depth_route(experts, logits, base, gamma=gamma),
                 "eager": lambda: _route_math(experts, logits, base, gamma),
                 "compile": lambda: rcomp(experts, logits, base, gamma)}
    cases.append(Case(
        "fusion", "depth_route fwd", f"L={L} B={B} N={N} D={Dr}", dtype, impls=_with_block_kernel(device, route_fwd),
        bytes=(L + 2) * B * N * Dr * es, notes="DRoRAE l2 energy + tanh gate"))

    rin = [t.detach().clone().requires_grad_() for t in (*experts, logits, base, gamma)]
    r_ex, r_lg, r_base, r_gm = rin[:L], rin[L], rin[L + 1], rin[L + 2]
    gr = torch.randn(B, N, Dr, generator=gen).to(device, dtype)
    rfwd = {"raekern": lambda: fu.depth_route(r_ex, r_lg, r_base, gamma=r_gm),
            "eager": lambda: _route_math(r_ex, r_lg, r_base, r_gm), "compile": lambda: rcomp(r_ex, r_lg, r_base, r_gm)}
    cases.append(Case(
        "fusion", "depth_route bwd", f"L={L} B={B} N={N} D={Dr}", dtype,
        impls=_with_block_kernel(device, {k: _lazy_grads(f, rin, gr) for k, f in rfwd.items()}),
        bytes=(2 * L + 2) * B * N * Dr * es, notes="gradients of experts, logits, base and gamma"))

    # DepthRoutedFusion's form: the experts as one [L, B, N, D] leaf (its batched GEMM's output). raekern
    # takes it whole and returns one stacked gradient; the eager and compiled math take its L views,
    # and their autograd stacks the L gradients back, as a user's transcription would.
    sin = [torch.stack(experts).requires_grad_()] + [t.detach().clone().requires_grad_() for t in (logits, base, gamma)]
    s_ex, s_lg, s_base, s_gm = sin
    sfwd = {"raekern": lambda: fu.depth_route(s_ex, s_lg, s_base, gamma=s_gm),
            "eager": lambda: _route_math(list(s_ex.unbind(0)), s_lg, s_base, s_gm),
            "compile": lambda: rcomp(list(s_ex.unbind(0)), s_lg, s_base, s_gm)}
    cases.append(Case(
        "fusion", "depth_route bwd stacked", f"L={L} B={B} N={N} D={Dr}", dtype,
        impls=_with_block_kernel(device, {k: _lazy_grads(f, sin, gr) for k, f in sfwd.items()}),
        bytes=(2 * L + 2) * B * N * Dr * es, notes="experts as one [L, B, N, D] tensor (DepthRoutedFusion)"))

    H = int(N ** 0.5)
    z = torch.randn(B, H * H, D, generator=gen).to(device, dtype)
    mean = torch.randn(D, H, H, generator=gen).to(device)
    var = (torch.rand(D, H, H, generator=gen) + 0.5).to(device)
    ncomp = compiled(_normalize_math)
    cases.append(Case(
        "fusion", "latent_normalize", f"B={B} N={H * H} D={D}", dtype,
        impls={"raekern": lambda: fu.latent_normalize(z, mean, var),
               "eager": lambda: _normalize_math(z, mean, var).to(dtype),
               "compile": lambda: ncomp(z, mean, var).to(dtype)},
        bytes=2 * B * H * H * D * es + 2 * D * H * H * mean.element_size()))  # + fp32 mean/var, read once
    return cases
