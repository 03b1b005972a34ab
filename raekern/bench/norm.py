"""Benchmark cases of the norm family on RAE / DiT-DH shapes.

B·N ∈ {2048, 8192} tokens (quick: 2048), D ∈ {768, 1024, 1152, 2048} (quick: 1152), fp32 and bf16.
Each case times raekern against eager PyTorch (the plain-PyTorch references) and torch.compile of the
same math. ``bytes`` counts each tensor that must be read or written once; small per-sample operands
and statistics are left out. Backward cases time ``torch.autograd.grad`` through a graph built once
(retain_graph), so every implementation pays the same autograd overhead.
"""
from __future__ import annotations

from typing import Callable

import torch

from raekern import ops as R
from raekern.bench.registry import Case, compiled, register, with_switch

# Every (shape, dtype) compiles its own graph; the default limit of 8 would silently fall back to eager.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 4096)

TOKENS = (2048, 8192)
WIDTHS = (768, 1024, 1152, 2048)
DTYPES = (torch.float32, torch.bfloat16)
B = 8  # samples; N = tokens / B (256 for B·N = 2048, as DiT-DH at 256 px)


class _Inputs:
    """Inputs of one case, built on first use; only the most recent case's tensors stay alive, so a
    full sweep never holds more than one shape in memory."""

    _live: tuple[tuple, dict] | None = None

    def __init__(self, key: tuple, build: Callable[[], dict]):
        self.key, self.build = key, build

    def __call__(self) -> dict:
        live = _Inputs._live
        if live is None or live[0] != self.key:
            _Inputs._live = None  # free the previous case's tensors first
            _Inputs._live = (self.key, self.build())
        return _Inputs._live[1]


def _build(device, dtype, M, D, per_token):
    N = M // B
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    ada = rnd(B, N if per_token else 1, 6 * D, scale=0.1)  # an adaLN output; chunks are strided views
    shift, scale, gate = ada.chunk(6, dim=-1)[:3]
    return dict(x=rnd(B, N, D), y=rnd(B, N, D), shift=shift, scale=scale, gate=gate,
                w=torch.ones(D, device=device, dtype=torch.float32), gout=rnd(B, N, D), gxo=rnd(B, N, D))


def _fwd_impls(fn_r, fn_ref, inputs, device="cpu"):
    comp = compiled(fn_ref)
    impls = {"raekern": lambda: fn_r(inputs()), "eager": lambda: fn_ref(inputs()),
             "compile": lambda: comp(inputs())}
    # The one-block-per-row CUDA forward (the only one on the first H200 run) against the default
    # warp-per-row kernel, in the same run.
    return with_switch(impls, device, "block_kernel", "RAEKERN_NORM_FORWARD", "block")


def _bwd_impls(graph, fn_r, fn_ref, inputs, device="cpu"):
    """graph(fwd)(inputs) -> (outputs, leaves, grads); each implementation builds its graph once."""
    makers = {"raekern": graph(fn_r), "eager": graph(fn_ref), "compile": graph(compiled(fn_ref))}
    cache: dict[str, tuple] = {}

    def impl(name):
        def run():
            d = inputs()
            if name not in cache or cache[name][0] is not d:
                cache[name] = (d, makers[name](d))
            outs, leaves, grads = cache[name][1]
            return torch.autograd.grad(outs, leaves, grads, retain_graph=True)
        return run

    # The one-block-per-task CUDA backward (the only one on the first H200 run) against the default
    # warp-per-row kernel, in the same run (the backward kernel is chosen at launch: same graph).
    return with_switch({name: impl(name) for name in makers}, device, "block_kernel", "RAEKERN_NORM_BACKWARD",
                       "block")


def _leaf(t):
    return t.detach().requires_grad_()


def _fused_graph(f):
    def make(d):
        x, y, ada_w = _leaf(d["x"]), _leaf(d["y"]), _leaf(d["w"])
        mods = [_leaf(d[k]) for k in ("gate", "shift", "scale")]
        xo, out = f(x, mods[0], y, mods[1], mods[2], ada_w)
        return [xo, out], [x, y, *mods, ada_w], [d["gxo"], d["gout"]]
    return make


def _nm_graph(f):
    def make(d):
        x, w = _leaf(d["x"]), _leaf(d["w"])
        sh, sc = _leaf(d["shift"]), _leaf(d["scale"])
        return [f(x, sh, sc, w)], [x, sh, sc, w], [d["gout"]]
    return make


def _fused_r(x, g, y, sh, sc, w):
    return R.gated_residual_norm_modulate(x, g, y, sh, sc, kind="rms", weight=w)


def _fused_ref(x, g, y, sh, sc, w):
    return R.gated_residual_norm_modulate_reference(x, g, y, sh, sc, kind="rms", weight=w)


def _nm_r(x, sh, sc, w):
    return R.norm_modulate(x, sh, sc, kind="rms", weight=w)


def _nm_ref(x, sh, sc, w):
    return R.norm_modulate_reference(x, sh, sc, kind="rms", weight=w)


@register("norm")
def norm_cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    tokens = TOKENS[:1] if quick else TOKENS
    widths = (1152,) if quick else WIDTHS
    cases: list[Case] = []
    for dtype in DTYPES:
        es = torch.finfo(dtype).bits // 8
        for M in tokens:
            for D in widths:
                shape = f"B·N={M} D={D}"
                row = M * D * es
                for per_token in (False, True):
                    layout = "per-token" if per_token else "per-sample"
                    inp = _Inputs((device, dtype, M, D, per_token),
                                  lambda dtype=dtype, M=M, D=D, pt=per_token: _build(device, dtype, M, D, pt))
                    mod_bytes = 2 * row if per_token else 0  # shift + scale read per token
                    gate_bytes = row if per_token else 0
                    if not per_token:
                        cases.append(Case("norm", "rms_norm fwd", shape, dtype, _fwd_impls(
                            lambda d: R.rms_norm(d["x"], d["w"]),
                            lambda d: R.rms_norm_reference(d["x"], d["w"]), inp, device), bytes=2 * row))
                        cases.append(Case("norm", "layer_norm fwd", shape, dtype, _fwd_impls(
                            lambda d: R.layer_norm(d["x"]), lambda d: R.layer_norm_reference(d["x"]), inp, device),
                            bytes=2 * row, notes="non-affine (RAE features)"))
                        cases.append(Case("norm", "gated_residual fwd", shape, dtype, _fwd_impls(
                            lambda d: R.gated_residual(d["x"], d["gate"], d["y"]),
                            lambda d: R.gated_residual_reference(d["x"], d["gate"], d["y"]), inp, device),
                            bytes=3 * row))
                    cases.append(Case("norm", f"norm_modulate rms {layout} fwd", shape, dtype, _fwd_impls(
                        lambda d: _nm_r(d["x"], d["shift"], d["scale"], d["w"]),
                        lambda d: _nm_ref(d["x"], d["shift"], d["scale"], d["w"]), inp, device),
                        bytes=2 * row + mod_bytes))
                    cases.append(Case(
                        "norm", f"gated_residual_norm_modulate rms {layout} fwd", shape, dtype, _fwd_impls(
                            lambda d: _fused_r(d["x"], d["gate"], d["y"], d["shift"], d["scale"], d["w"]),
                            lambda d: _fused_ref(d["x"], d["gate"], d["y"], d["shift"], d["scale"], d["w"]),
                            inp, device), bytes=4 * row + mod_bytes + gate_bytes))
                    # backward: read grads, normalised input (+ y, per-token gate/scale), write dx (+ dy,
                    # per-token dshift/dscale/dgate)
                    cases.append(Case("norm", f"norm_modulate rms {layout} bwd", shape, dtype, _bwd_impls(
                        _nm_graph, _nm_r, _nm_ref, inp, device),
                        bytes=3 * row + (3 * row if per_token else 0)))
                    cases.append(Case(
                        "norm", f"gated_residual_norm_modulate rms {layout} bwd", shape, dtype, _bwd_impls(
                            _fused_graph, _fused_r, _fused_ref, inp, device), bytes=6 * row + (5 * row if per_token else 0)))
    return cases
