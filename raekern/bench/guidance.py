"""Benchmark cases of the guidance family: the fused step against eager PyTorch and torch.compile of
the same math, on RAE (768×16×16) and RAEv2 (1024×16×16) latents, B = 32 (B = 2 when quick).

Bytes counted: every input read once and every output written once (the minimum any implementation
must move); the fused op reads its inputs twice when a statistic is needed (APG, CFG-Zero*, rescale).
"""
from __future__ import annotations

import functools

import torch

from raekern.bench.registry import Case, compiled, register, with_switch
from raekern.ops.guidance import guidance_step

SHAPES = {"rae": (768, 16, 16), "raev2": (1024, 16, 16)}


def _bc(v, x):
    return v.view(-1, *([1] * (x.dim() - 1)))


# Eager transcriptions of each rule, computed in fp32 like the fused op (what a user would write).
def _cfg_euler(x, C, U, t, tn, w):
    xf, c, u = x.float(), C.float(), U.float()
    g = u + w * (c - u)
    return (xf + _bc(tn - t, xf) * g).to(x.dtype)


def _internal_x0_euler(x, F, Bs, t, tn, s):
    xf = x.float()
    x0 = Bs.float() + s * (F.float() - Bs.float())
    u = (xf - x0) / _bc(t, xf)
    return (xf + _bc(tn - t, xf) * u).to(x.dtype)


def _gfcg_cfg3(x, C, U, R, t, tn, w_cfg, wb):
    xf, c, u, r = x.float(), C.float(), U.float(), R.float()
    g = u + w_cfg * (c - u) + _bc(wb, xf) * (c - r)
    return (xf + _bc(tn - t, xf) * g).to(x.dtype)


def _apg(x, C, U, M, t, tn, w, eta, r, beta):
    xf = x.float()
    tt = _bc(t, xf)
    c0 = xf - tt * C.float()
    u0 = xf - tt * U.float()
    d = c0 - u0 + beta * M
    m_new = d
    nrm = d.flatten(1).norm(dim=1)
    d = d * _bc(torch.clamp(r / nrm, max=1.0), xf)
    pi = (d * c0).flatten(1).sum(1) / c0.flatten(1).norm(dim=1).clamp_min(1e-12) ** 2
    d = d - (1 - eta) * _bc(pi, xf) * c0
    g0 = c0 + (w - 1) * d
    u = (xf - g0) / tt
    return (xf + _bc(tn - t, xf) * u).to(x.dtype), m_new


def _cfg_zero_star(x, C, U, t, tn, w):
    xf, c, u = x.float(), C.float(), U.float()
    s = (c * u).flatten(1).sum(1) / ((u * u).flatten(1).sum(1) + 1e-8)
    su = _bc(s, xf) * u
    g = su + w * (c - su)
    return (xf + _bc(tn - t, xf) * g).to(x.dtype)


def _cfg_rescale(x, C, U, t, tn, w, phi):
    xf = x.float()
    tt = _bc(t, xf)
    c0 = xf - tt * C.float()
    u0 = xf - tt * U.float()
    g0 = u0 + w * (c0 - u0)
    f = phi * c0.flatten(1).std(dim=1) / g0.flatten(1).std(dim=1) + (1 - phi)
    g0 = g0 * _bc(f, xf)
    u = (xf - g0) / tt
    return (xf + _bc(tn - t, xf) * u).to(x.dtype)


@register("guidance")
def guidance_cases(device: str, quick: bool) -> list[Case]:
    B = 2 if quick else 32
    out: list[Case] = []
    gen = torch.Generator().manual_seed(0)
    for lat, S in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            def rnd():
                return torch.randn(B, *S, generator=gen).to(device=device, dtype=dtype)
            x, C, U, R = rnd(), rnd(), rnd(), rnd()
            M = torch.randn(1, B, *S, generator=gen).to(device)
            t = torch.linspace(0.9, 0.5, B, device=device)
            tn = t - 0.02
            wb = torch.rand(B, device=device)
            n = x.numel()
            es = x.element_size()
            shape = f"B={B} {lat} {'x'.join(map(str, S))}"
            common = dict(solver="euler", t_next=tn)

            def add(name, raekern_fn, eager_fn, nbytes):
                impls = {"raekern": raekern_fn, "eager": eager_fn, "compile": _compiled_call(eager_fn)}
                # the generic combine loop (the first H200 run's) beside it
                with_switch(impls, device, "generic_combine", "RAEKERN_GUIDANCE_COMBINE", "generic")
                out.append(Case("guidance", name, shape, dtype, impls, bytes=nbytes))

            add("cfg euler", lambda x=x, C=C, U=U, t=t, tn=tn: guidance_step(
                x, [C, U], t, terms=[(0, 1)], weights=[0.5], base=0, **{**common, "t_next": tn}),
                _bind(_cfg_euler, x, C, U, t, tn, 1.5), 4 * n * es)
            add("internal x0 euler", lambda x=x, C=C, U=U, t=t, tn=tn: guidance_step(
                x, [C, U], t, param="x0", terms=[(0, 1)], weights=[0.78], base=0, solver="euler", t_next=tn),
                _bind(_internal_x0_euler, x, C, U, t, tn, 1.78), 4 * n * es)
            add("gfcg cfg3", lambda x=x, C=C, U=U, R=R, t=t, tn=tn, wb=wb: guidance_step(
                x, [C, U, R], t, terms=[(0, 1), (0, 2)], weights=[0.5, wb], base=0, solver="euler", t_next=tn),
                _bind(_gfcg_cfg3, x, C, U, R, t, tn, 1.5, wb), 5 * n * es)
            add("apg", lambda x=x, C=C, U=U, M=M, t=t, tn=tn: guidance_step(
                x, [C, U], t, terms=[(0, 1)], weights=[2.0], base=0, apg_eta=0.0, apg_norm_threshold=15.0,
                apg_beta=-0.5, momentum=M, solver="euler", t_next=tn),
                _bind(_apg, x, C, U, M[0], t, tn, 3.0, 0.0, 15.0, -0.5), 4 * n * es + 2 * n * 4)
            add("cfg-zero*", lambda x=x, C=C, U=U, t=t, tn=tn: guidance_step(
                x, [C, U], t, terms=[(0, 1)], weights=[1.0], base=0, zero_star=True, stats_space="velocity",
                solver="euler", t_next=tn),
                _bind(_cfg_zero_star, x, C, U, t, tn, 2.0), 4 * n * es)
            add("cfg rescale", lambda x=x, C=C, U=U, t=t, tn=tn: guidance_step(
                x, [C, U], t, terms=[(0, 1)], weights=[3.0], base=0, rescale_phi=0.7, solver="euler", t_next=tn),
                _bind(_cfg_rescale, x, C, U, t, tn, 4.0, 0.7), 4 * n * es)
    return out


def _bind(fn, *args):
    return functools.partial(fn, *args)


def _compiled_call(bound: functools.partial):
    # compile the math itself (tensors become graph inputs), lazily at the first call
    fn, args = bound.func, bound.args
    cf = None

    def call():
        nonlocal cf
        if cf is None:
            cf = compiled(fn)
        return cf(*args)

    return call
