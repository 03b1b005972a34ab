"""Shared pieces of the reliability suites (issue #11): one table of every public op with inputs a user
would pass, its reference, and time limits that also catch a hang inside a C++ kernel."""
from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from raekern import ops as R
from raekern.ops.guidance import gfcg_select_reference, guidance_step_reference

# (rtol, atol) of every op's forward against its reference, per dtype. These are the documented
# tolerances (docs/reliability.md); fp64 references are exact up to summation order.
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 5e-5),
    torch.bfloat16: (2e-2, 3e-2),
    torch.float16: (3e-3, 3e-3),
}
# attention multiplies two roundings (P and PV), so half precisions get a looser absolute floor
ATTN_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 4e-2),
    torch.float16: (4e-3, 4e-3),
}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def time_limit(seconds: float, what: str = "call"):
    """Fail a call that runs longer than ``seconds``. SIGALRM interrupts Python code; a hang inside a
    C++ kernel never returns to the interpreter, so a watchdog thread additionally dumps every stack
    and ends the process a little later (a loud failure instead of a silent CI timeout)."""
    use_alarm = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()

    def _on_alarm(signum, frame):
        raise TimeoutError(f"{what} took longer than {seconds} s")

    old = None
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 4 + 30, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def close(got, want, dtype, *, tol=TOL, equal_nan=False, what=""):
    """assert_close over a tensor or a tuple of tensors (None entries must match)."""
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, dtype, tol=tol, equal_nan=equal_nan, what=f"{what}[{i}]")
        return
    if want is None:
        assert got is None, what
        return
    rtol, atol = tol[dtype] if got.dtype.is_floating_point else (0, 0)
    if got.dtype.is_floating_point and got.dtype != dtype and got.dtype in tol:
        # e.g. fp32 probabilities from fp64 or bf16 logits: the output's own precision bounds the error
        rtol, atol = max(rtol, tol[got.dtype][0]), max(atol, tol[got.dtype][1])
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


def close_nonfinite(got, want, dtype, *, tol=TOL, what=""):
    """Non-finite outputs in the same places as the reference (NaN and ±Inf count alike: an Inf input
    may legitimately come out as NaN when a kernel forms it as a difference), finite ones close."""
    if isinstance(want, (tuple, list)):
        for i, (g, w) in enumerate(zip(got, want)):
            close_nonfinite(g, w, dtype, tol=tol, what=f"{what}[{i}]")
        return
    if want is None:
        assert got is None, what
        return
    if not want.dtype.is_floating_point:
        return  # indices chosen among NaN scores are unspecified
    bad_w, bad_g = ~torch.isfinite(want), ~torch.isfinite(got)
    assert torch.equal(bad_w, bad_g), f"{what}: non-finite pattern differs ({int(bad_w.sum())} vs {int(bad_g.sum())})"
    close(got.masked_fill(bad_g, 0), want.masked_fill(bad_w, 0), dtype, tol=tol, what=what)


# --------------------------------------------------------------------------------------------------
# the op table


@dataclass
class OpSpec:
    """One public entry point.

    ``make(B, N, D, dtype)`` returns the tensor arguments by name (a list for list-valued arguments);
    ``call(**tensors)`` runs the op and ``ref(**tensors)`` its reference. ``float_args`` are the tensor
    arguments that must be floating and on x's device; ``same_dtype`` those that must also share x's
    dtype; ``bad_rank``/``bad_size`` map an argument to a function producing a wrongly shaped value.
    ``batch_dims`` says which dim of each argument is the batch B (None: no batch dim) so B = 0 and
    N = 0 cases can be built by the same ``make``.
    """
    name: str
    make: Callable[..., dict]
    call: Callable[..., object]
    ref: Callable[..., object]
    float_args: tuple[str, ...]
    same_dtype: tuple[str, ...]
    bad_rank: dict = field(default_factory=dict)
    bad_size: dict = field(default_factory=dict)
    tol: dict = field(default_factory=lambda: TOL)
    differentiable: tuple[str, ...] = ()
    # what an empty batch (B = 0) or empty token axis (N = 0) does: "works" or "raises"
    empty_b: str = "works"
    empty_n: str = "works"
    min_n: int = 1
    min_d: int = 1  # D = 1 rows are constant: see test_layer_norm_of_a_constant_row_is_exactly_the_bias
    d_multiple: int = 1

    def __repr__(self):
        return self.name


def first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def replace(args: dict, name: str, fn) -> dict:
    """Copy of ``args`` with argument ``name`` (its entry 0, for a list) replaced by ``fn(old)``."""
    out = dict(args)
    v = out[name]
    if isinstance(v, (list, tuple)):
        out[name] = [fn(v[0])] + list(v[1:])
    else:
        out[name] = fn(v)
    return out


def _rn(*shape, dtype, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64).mul_(scale).to(dtype)


def _grow_last(t):
    return torch.cat([t, t[..., :1]], dim=-1)


def _unsq(t):
    return t[None]


def _to_scalar(t):
    return t.reshape(-1)[0]


def _norm_specs():
    def x_only(B, N, D, dt):
        return {"x": _rn(B, N, D, dtype=dt), "weight": _rn(D, dtype=dt), "bias": _rn(D, dtype=dt)}

    def x_w(B, N, D, dt):
        return {"x": _rn(B, N, D, dtype=dt), "weight": _rn(D, dtype=dt)}

    def mod(B, N, D, dt):
        return {"x": _rn(B, N, D, dtype=dt), "shift": _rn(B, 1, D, dtype=dt, scale=0.5),
                "scale": _rn(B, N, D, dtype=dt, scale=0.5), "weight": _rn(D, dtype=dt),
                "bias": _rn(D, dtype=dt)}

    def gr(B, N, D, dt):
        return {"x": _rn(B, N, D, dtype=dt), "gate": _rn(B, 1, D, dtype=dt), "y": _rn(B, N, D, dtype=dt)}

    def grnm(B, N, D, dt):
        return {**gr(B, N, D, dt), "shift": _rn(B, D, dtype=dt, scale=0.5), "scale": _rn(D, dtype=dt, scale=0.5),
                "weight": _rn(D, dtype=dt)}

    five = lambda t: t[None, None, None]  # noqa: E731  (rank 4+ is refused by every norm operand)
    return [
        OpSpec("rms_norm", x_w,
               lambda x, weight: R.rms_norm(x, weight, eps=1e-6),
               lambda x, weight: R.rms_norm_reference(x, weight, eps=1e-6),
               ("x", "weight"), (), bad_rank={"x": _to_scalar, "weight": _unsq},
               bad_size={"weight": _grow_last}, differentiable=("x", "weight")),
        OpSpec("layer_norm", x_only,
               lambda x, weight, bias: R.layer_norm(x, weight, bias),
               lambda x, weight, bias: R.layer_norm_reference(x, weight, bias),
               ("x", "weight", "bias"), (), bad_rank={"x": _to_scalar, "weight": _unsq, "bias": _unsq},
               bad_size={"weight": _grow_last, "bias": _grow_last}, differentiable=("x", "weight", "bias"),
               min_d=2),
        OpSpec("norm_modulate", mod,
               lambda x, shift, scale, weight, bias: R.norm_modulate(x, shift, scale, kind="layer",
                                                                     weight=weight, bias=bias),
               lambda x, shift, scale, weight, bias: R.norm_modulate_reference(x, shift, scale, kind="layer",
                                                                               weight=weight, bias=bias),
               ("x", "shift", "scale", "weight", "bias"), ("shift", "scale"),
               bad_rank={"x": _unsq, "shift": five, "scale": five, "weight": _unsq},
               bad_size={"shift": _grow_last, "scale": lambda t: t[:, :1, :1].expand(-1, -1, 3),
                         "weight": _grow_last},
               differentiable=("x", "shift", "scale", "weight", "bias"), min_d=2),
        OpSpec("gated_residual", gr,
               lambda x, gate, y: R.gated_residual(x, gate, y),
               lambda x, gate, y: R.gated_residual_reference(x, gate, y),
               ("x", "gate", "y"), ("gate", "y"),
               bad_rank={"x": _unsq, "gate": five, "y": _unsq},
               bad_size={"gate": _grow_last, "y": _grow_last}, differentiable=("x", "gate", "y")),
        OpSpec("gated_residual_norm_modulate", grnm,
               lambda x, gate, y, shift, scale, weight: R.gated_residual_norm_modulate(
                   x, gate, y, shift, scale, kind="rms", weight=weight),
               lambda x, gate, y, shift, scale, weight: R.gated_residual_norm_modulate_reference(
                   x, gate, y, shift, scale, kind="rms", weight=weight),
               ("x", "gate", "y", "shift", "scale", "weight"), ("gate", "y", "shift", "scale"),
               bad_rank={"x": _unsq, "gate": five, "y": _unsq, "shift": five, "scale": five, "weight": _unsq},
               bad_size={"gate": _grow_last, "y": lambda t: t[:, :, :-1] if t.shape[-1] > 1 else _grow_last(t),
                         "shift": _grow_last, "weight": _grow_last},
               differentiable=("x", "gate", "y", "shift", "scale", "weight")),
    ]


def _fusion_specs():
    def lsf(B, N, D, dt):
        return {"layers": [_rn(B, N + 1, D, dtype=dt) for _ in range(3)], "weights": _rn(3, dtype=torch.float32)}

    def dr(B, N, D, dt):
        return {"experts": [_rn(B, N, D, dtype=dt) for _ in range(3)], "router_logits": _rn(B, N, 3, dtype=dt),
                "base": _rn(B, N, D, dtype=dt), "gamma": _rn(D, dtype=dt, scale=0.5)}

    def stats(D, H, W):
        return _rn(D, H, W, dtype=torch.float32), _rn(D, H, W, dtype=torch.float32).abs() + 0.5

    def ln_make(B, N, D, dt):
        m, v = stats(D, 1, N)
        return {"z": _rn(B, N, D, dtype=dt), "mean": m, "var": v}

    def ldn_make(B, N, D, dt):
        m, v = stats(D, 1, N)
        return {"x": _rn(B, D, 1, N, dtype=dt), "mean": m, "var": v}

    lsf_kw = dict(skip_tokens=1, reduce="weighted")
    dr_kw = dict(energy="l2", bound="tanh")
    return [
        OpSpec("layer_stack_fuse", lsf,
               lambda layers, weights: R.layer_stack_fuse(layers, weights, **lsf_kw),
               lambda layers, weights: R.layer_stack_fuse_reference(layers, weights, **lsf_kw),
               ("layers", "weights"), (), bad_rank={"layers": _unsq, "weights": _unsq},
               bad_size={"layers": _grow_last, "weights": _grow_last}, differentiable=("layers", "weights"),
               empty_n="raises"),  # N = 0 patch tokens: T = skip_tokens, refused naming 'skip_tokens'
        OpSpec("depth_route", dr,
               lambda experts, router_logits, base, gamma: R.depth_route(experts, router_logits, base, gamma=gamma,
                                                                          **dr_kw),
               lambda experts, router_logits, base, gamma: R.depth_route_reference(experts, router_logits, base,
                                                                                    gamma=gamma, **dr_kw),
               ("experts", "router_logits", "base", "gamma"), ("base",),
               bad_rank={"experts": _unsq, "router_logits": _unsq, "base": _unsq, "gamma": _unsq},
               bad_size={"experts": _grow_last, "router_logits": _grow_last, "base": _grow_last,
                         "gamma": _grow_last},
               differentiable=("experts", "router_logits", "base", "gamma")),
        OpSpec("latent_normalize", ln_make,
               lambda z, mean, var: R.latent_normalize(z, mean, var),
               lambda z, mean, var: R.latent_normalize_reference(z, mean, var),
               ("z", "mean", "var"), (), bad_rank={"z": _unsq, "mean": _unsq, "var": _unsq},
               bad_size={"z": (_grow_last, "'z'|'mean'"), "mean": _grow_last, "var": _grow_last}, differentiable=("z",)),
        OpSpec("latent_denormalize", ldn_make,
               lambda x, mean, var: R.latent_denormalize(x, mean, var),
               lambda x, mean, var: R.latent_denormalize_reference(x, mean, var),
               ("x", "mean", "var"), (), bad_rank={"x": _unsq, "mean": _unsq, "var": _unsq},
               bad_size={"x": (_grow_last, "'x'|'mean'"), "mean": _grow_last, "var": _grow_last}, differentiable=("x",)),
    ]


def _attention_specs():
    H = 2

    def att(B, N, D, dt):
        dh = 8 * max(1, min(D, 64) // 8)
        return {"q": _rn(B, N, H, dh, dtype=dt), "k": _rn(B, N + 3, H, dh, dtype=dt),
                "v": _rn(B, N + 3, H, dh, dtype=dt), "q_norm_weight": _rn(dh, dtype=dt),
                "key_padding_mask": torch.rand(B, N + 3) > 0.2}

    def packed(B, N, D, dt):
        dh = 8 * max(1, min(D, 64) // 8)
        return {"qkv": _rn(B, N, 3 * H * dh, dtype=dt)}

    def call(q, k, v, q_norm_weight, key_padding_mask, fn=R.attention):
        return fn(q, k, v, q_norm_weight=q_norm_weight, key_padding_mask=key_padding_mask)

    def ref(q, k, v, q_norm_weight, key_padding_mask):
        return R.attention_reference(q, k, v, q_norm_weight=q_norm_weight, key_padding_mask=key_padding_mask)

    def packed_ref(qkv):
        b, n, c = qkv.shape
        q, k, v = qkv.unflatten(-1, (3, H, c // (3 * H))).unbind(2)
        return R.attention_reference(q, k, v).flatten(-2)

    return [
        OpSpec("attention", att, call, ref, ("q", "k", "v", "q_norm_weight"), ("k", "v"),
               bad_rank={"q": _unsq, "k": _unsq, "v": _unsq, "q_norm_weight": _unsq,
                         "key_padding_mask": _unsq},
               bad_size={"k": _grow_last, "v": lambda t: t[:, :-1], "q_norm_weight": _grow_last,
                         "key_padding_mask": _grow_last},
               tol=ATTN_TOL, differentiable=("q", "k", "v", "q_norm_weight"), d_multiple=8),
        OpSpec("attention_packed", packed, lambda qkv: R.attention_packed(qkv, H), packed_ref, ("qkv",), (),
               bad_rank={"qkv": _unsq}, bad_size={"qkv": lambda t: t[..., :-1]}, tol=ATTN_TOL,
               differentiable=("qkv",), d_multiple=8),
    ]


def _guidance_specs():
    def gs(B, N, D, dt):
        return {"x": _rn(B, N, D, dtype=dt), "branches": [_rn(B, N, D, dtype=dt) for _ in range(2)]}

    kw = dict(terms=[(1, 0)], weights=[1.5], base=1, param="velocity", solver="euler", t_next=0.3,
              return_x0=True)

    def gs_call(x, branches):
        r = R.guidance_step(x, branches, 0.7, **kw)
        return r.out, r.x0

    def gs_ref(x, branches):
        r = guidance_step_reference(x, branches, 0.7, **kw)
        return r.out, r.x0

    def gf(B, N, D, dt):
        C = N + 2
        return {"logits": _rn(B, C, dtype=dt, scale=3.0), "target": torch.randint(0, C, (B,))}

    def gf_call(logits, target):
        return R.gfcg_select(logits, target, w_max=4.0, kappa=2.0)

    def gf_ref(logits, target):
        return gfcg_select_reference(logits, target, w_max=4.0, kappa=2.0)

    return [
        OpSpec("guidance_step", gs, gs_call, gs_ref, ("x", "branches"), ("branches",),
               bad_rank={"branches": _unsq}, bad_size={"branches": _grow_last},
               differentiable=("x", "branches")),
        OpSpec("gfcg_select", gf, gf_call, gf_ref, ("logits",), (),
               bad_rank={"logits": _unsq, "target": _unsq}, bad_size={"target": lambda t: t[:-1] if t.numel() > 1
                                                                        else torch.cat([t, t])},
               tol={**TOL, torch.bfloat16: (1e-5, 1e-5), torch.float16: (1e-5, 1e-5)}),
    ]


def _mlp_specs():
    def pair(B, N, D, dt):
        return {"a": _rn(B, N, D, dtype=dt), "b": _rn(B, N, D, dtype=dt)}

    def packed(B, N, D, dt):
        return {"ab": _rn(B, N, 2 * D, dtype=dt)}

    return [
        OpSpec("swiglu", pair, lambda a, b: R.swiglu(a, b), lambda a, b: R.swiglu_reference(a, b), ("a", "b"),
               ("b",), bad_rank={"a": _to_scalar, "b": _unsq}, bad_size={"b": _grow_last},
               differentiable=("a", "b")),
        OpSpec("swiglu_packed", packed, lambda ab: R.swiglu_packed(ab), lambda ab: R.swiglu_packed_reference(ab),
               ("ab",), (), bad_rank={"ab": _to_scalar}, bad_size={"ab": lambda t: t[..., :-1]},
               differentiable=("ab",)),
    ]


SPECS: list[OpSpec] = (_norm_specs() + _fusion_specs() + _attention_specs() + _guidance_specs()
                       + _mlp_specs())
SPEC = {s.name: s for s in SPECS}
