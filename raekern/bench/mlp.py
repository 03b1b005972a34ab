"""Benchmark cases of the mlp family (SwiGLU) on DiT-DH shapes.

Tokens B·N ∈ {2048, 8192} (quick: 2048); hidden H ∈ {1024, 2730, 3072} (quick: 3072): 2730 is
``swiglu_hidden(1024)`` (DiT-DH heads of width 1024: rows of the packed w12 output then start off
the 16-byte grid), 3072 is ``swiglu_hidden(1152)`` (DiT-XL body); fp32 and bf16. Each case times
raekern against eager PyTorch (``F.silu(a) * b`` in the input dtype, as the released models compute
it) and torch.compile of the same math. ``bytes`` counts each tensor read or written once:
forward 3·M·H elements (a, b, out), backward 5·M·H (grad, a, b, da, db). Backward cases time
``torch.autograd.grad`` through a graph built once (retain_graph), so every implementation pays the
same autograd overhead. On CPU also ``transpose_copy`` (tokens 2048 × width 384..6144, fp32), the
operand transposes of the raekern backend's oneDNN Linear backward.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from raekern import ops as R
from raekern.bench.registry import Case, compiled, register

# Every (shape, dtype) compiles its own graph; the default limit of 8 would silently fall back to eager.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 4096)

TOKENS = (2048, 8192)
HIDDEN = (1024, 2730, 3072)
DTYPES = (torch.float32, torch.bfloat16)


class _Inputs:
    """Inputs of one case, built on first use; only the most recent case's tensors stay alive."""

    _live: tuple[tuple, dict] | None = None

    def __init__(self, key: tuple, build: Callable[[], dict]):
        self.key, self.build = key, build

    def __call__(self) -> dict:
        live = _Inputs._live
        if live is None or live[0] != self.key:
            _Inputs._live = None  # free the previous case's tensors first
            _Inputs._live = (self.key, self.build())
        return _Inputs._live[1]


def _build(device, dtype, M, H):
    g = torch.Generator(device="cpu").manual_seed(0)
    ab = (torch.randn(M, 2 * H, generator=g) * 2).to(device=device, dtype=dtype)  # a fused w12 output
    a, b = (t.contiguous() for t in ab.chunk(2, dim=-1))  # RAEv2's separate w1/w2 outputs
    gout = torch.randn(M, H, generator=g).to(device=device, dtype=dtype)
    return dict(ab=ab, a=a, b=b, gout=gout)


def eager_swiglu(a, b):
    return F.silu(a) * b


def eager_swiglu_packed(ab):
    a, b = ab.chunk(2, dim=-1)
    return F.silu(a) * b


def _fwd_impls(fn_r, fn_eager, args, inputs):
    comp = compiled(fn_eager)
    return {"raekern": lambda: fn_r(*args(inputs())), "eager": lambda: fn_eager(*args(inputs())),
            "compile": lambda: comp(*args(inputs()))}


def _bwd_impls(fn_r, fn_eager, keys, inputs):
    makers = {"raekern": fn_r, "eager": fn_eager, "compile": compiled(fn_eager)}
    cache: dict[str, tuple] = {}

    def impl(name):
        def run():
            d = inputs()
            if name not in cache or cache[name][0] is not d:
                leaves = [d[k].detach().requires_grad_() for k in keys]
                cache[name] = (d, (makers[name](*leaves), leaves))
            out, leaves = cache[name][1]
            return torch.autograd.grad(out, leaves, d["gout"], retain_graph=True)
        return run

    return {name: impl(name) for name in makers}


@register("mlp")
def mlp_cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    tokens = TOKENS[:1] if quick else TOKENS
    hidden = (3072,) if quick else HIDDEN
    cases: list[Case] = []
    for dtype in DTYPES:
        es = torch.finfo(dtype).bits // 8
        for M in tokens:
            for H in hidden:
                shape = f"B·N={M} H={H}"
                row = M * H * es
                inp = _Inputs((device, dtype, M, H), lambda dtype=dtype, M=M, H=H: _build(device, dtype, M, H))
                cases.append(Case("mlp", "swiglu_packed fwd", shape, dtype, _fwd_impls(
                    R.swiglu_packed, eager_swiglu_packed, lambda d: (d["ab"],), inp), bytes=3 * row,
                    notes="a, b = halves of a fused w12 output (RAE v1)"))
                cases.append(Case("mlp", "swiglu fwd", shape, dtype, _fwd_impls(
                    R.swiglu, eager_swiglu, lambda d: (d["a"], d["b"]), inp), bytes=3 * row,
                    notes="separate w1/w2 outputs (RAEv2)"))
                cases.append(Case("mlp", "swiglu_packed bwd", shape, dtype, _bwd_impls(
                    R.swiglu_packed, eager_swiglu_packed, ("ab",), inp), bytes=5 * row))
                cases.append(Case("mlp", "swiglu bwd", shape, dtype, _bwd_impls(
                    R.swiglu, eager_swiglu, ("a", "b"), inp), bytes=5 * row))
    if device == "cpu":
        cases += _transpose_cases(quick)
    return cases


def eager_transpose(x):
    return x.t().contiguous()


def _transpose_cases(quick: bool) -> list[Case]:
    """transpose_copy at the DiT-DH-S operand shapes of a Linear's weight gradient (tokens × width:
    the 384-wide body, its 1152-wide qkv, the 2048-wide head and its 6144-wide w12), fp32: the
    operands the oneDNN Linear backward transposes (CPU only; CUDA takes torch's copy)."""
    cases = []
    for C in ((1152,) if quick else (384, 1152, 2048, 6144)):
        M = 2048
        x = torch.randn(M, C, generator=torch.Generator().manual_seed(C))
        comp = compiled(eager_transpose)
        cases.append(Case("mlp", "transpose_copy", f"{M}x{C}", torch.float32,
                          {"raekern": lambda x=x: R.transpose_copy(x), "eager": lambda x=x: eager_transpose(x),
                           "compile": lambda x=x, comp=comp: comp(x)},
                          bytes=2 * M * C * 4, notes="a Linear backward operand (oneDNN GEMM, AMD CPUs)"))
    return cases
