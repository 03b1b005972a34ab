"""Guidance policies: small objects that declare the network branches a guidance method needs and
turn their outputs into one fused :func:`raekern.ops.guidance_step` call per solver stage.

Conventions: rectified flow, ``x_t = (1 − t)·x0 + t·ε``, t = 1 noise; C = conditional branch,
U = unconditional (null label) branch, W = weak model, R = branch at the GFCG reference class.
Intervals are ``(t_lo, t_hi)`` in RF time; guidance is active iff ``t_lo <= t <= t_hi`` in float32
(per sample, so a batch may mix times; see :func:`in_interval`); outside the interval a policy returns
the conditional prediction C.

Contract with the sampler (raekern.sampling.sampler):
- ``policy.branches``: the branches to evaluate, in the order their outputs are passed to ``step``
  (one ``[K*B, *S]`` tensor or a list of K tensors). The sampler groups them into one batched call
  per model.
- ``policy.needs_reference`` / ``policy.select_reference(x0, labels) -> (ref_labels, weights)`` /
  ``policy.reference_from_previous_step``: GFCG's classifier pass (DESIGN §4.3).
- ``policy.step(x, outputs, t, *, param, solver, t_next, x_prev, u_prev, step_index, num_steps,
  state, out_param="velocity", return_x0=False) -> GuidanceOutput``. ``state`` is a dict the sampler
  keeps for one sampling run (APG's momentum lives there). Heun: see :mod:`raekern.ops.guidance`.

Formulas (scale conventions as the papers write them; docs/guidance.md has the long form):

=====================  ============================================================================
NoGuidance             G = C
CFG(w)                 G = U + w·(C − U)  (form="anchor": G = C + w·(C − U))
AutoGuidance(w)        G = W + w·(C − W)        (weak model, same label)
InternalGuidance(s)    G = x_base + s·(x_full − x_base), t ∈ [0.1, 1] (RAEv2 depth-8 head, one call);
                       with cfg_scale: internal guidance on the cond and null halves, then CFG
GFCG                   G = C + w_b·(C − R) with w_b = clip(w_max·exp(−κ·(p_y − p_r)), w_min, w_max)
  mode="cfg3"          G = U + cfg·(C − U) + w_b·(C − R)                            (three branches)
  mode="cfg_substitute" G = R + cfg·(C − R) + w_b·(C − R)   (R replaces the null label; two branches)
  mode="autoguidance"  G = W(r) + ag·(C − W(r)) + w_b·(C − W(r)) (weak model at the reference class)
APG(w)                 D = C − U (+ β·D_prev), D ← D·min(1, r/‖D‖), D ← D − (1 − η)·proj_C(D),
                       G = C + (w − 1)·D, statistics in x0 space (paper's Algorithm 1)
CFGZeroStar(w)         s* = <C,U>/(‖U‖² + 1e-8) in velocity space, G = s*·U + w·(C − s*·U),
                       zero velocity for steps < zero_init_steps (variant="comfyui": s*·U formed in
                       x0 space, as ComfyUI's node does)
GuidanceRescale(p, φ)  G ← G·(φ·std(C)/std(G) + 1 − φ), stds in x0 space (unbiased)
=====================  ============================================================================

Every rule is applied with the base branch C and weights ``w − 1`` internally, so a guidance
interval (a per-sample mask) leaves exactly C.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from raekern.ops.guidance import GuidanceOutput, gfcg_select, guidance_step

__all__ = [
    "Branch",
    "GuidancePolicy",
    "NoGuidance",
    "CFG",
    "AutoGuidance",
    "GFCG",
    "InternalGuidance",
    "APG",
    "CFGZeroStar",
    "GuidanceRescale",
    "GuidanceOutput",
    "in_interval",
]

NULL_LABEL = 1000


@dataclass(frozen=True)
class Branch:
    """One network evaluation: which model, which label, which output of a multi-output model."""

    model: str = "main"  # "main" | "weak" (AutoGuidance's guiding model)
    label: str = "cond"  # "cond" | "null" | "ref" (GFCG reference class)
    output: int = 0  # RAEv2's DiT returns (x_full, x_base): 0 or 1


def _fail(cls: str, arg: str, msg: str, exc=ValueError):
    raise exc(f"raekern.sampling.{cls}: argument '{arg}' {msg}")


def _check_interval(cls: str, interval):
    if interval is None:
        return None
    if not (isinstance(interval, (tuple, list)) and len(interval) == 2
            and all(isinstance(v, (int, float)) for v in interval) and interval[0] <= interval[1]):
        _fail(cls, "interval", f"must be (t_lo, t_hi) with t_lo <= t_hi, got {interval!r}")
    return (float(interval[0]), float(interval[1]))


def _f32(v: float) -> float:
    """v rounded to float32 (round to nearest even), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # rounds past the largest float32
        return math.copysign(math.inf, v)


def in_interval(t, interval):
    """Whether ``t_lo <= t <= t_hi``, decided in float32 for a float or a tensor t (a bool tensor).

    The released samplers compare a float32 t tensor with Python-float bounds, which torch does in
    float32: float32(0.8) > 0.8, so the RAEv2 grid point float32(0.8) is inside (0, 0.8) there and
    outside in float64. Every interval decision (the policies' masks, the sampler's skipping of
    inactive branches) goes through here so that they agree with the released code and each other.
    """
    lo, hi = _f32(float(interval[0])), _f32(float(interval[1]))
    if isinstance(t, torch.Tensor):
        tt = t.to(torch.float32)
        return (tt >= lo) & (tt <= hi)
    return lo <= _f32(float(t)) <= hi


def _check_scale(cls: str, arg: str, v):
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        _fail(cls, arg, f"must be a float, got {v!r}", TypeError)
    return float(v)


class GuidancePolicy:
    """Base class. Subclasses set ``branches`` and implement :meth:`arguments`."""

    branches: tuple[Branch, ...] = (Branch(),)
    needs_reference: bool = False
    reference_from_previous_step: bool = True
    interval: tuple[float, float] | None = None
    null_label: int = NULL_LABEL

    def select_reference(self, x0, labels):  # pragma: no cover - only GFCG policies need it
        raise NotImplementedError(f"{type(self).__name__} does not use a reference class")

    def arguments(self, x: torch.Tensor, t, *, step_index: int, num_steps: int, state: dict) -> dict:
        """Keyword arguments of guidance_step (terms, weights, base, options) for this step."""
        return dict(terms=[], weights=[], base=0)

    def mask(self, x: torch.Tensor, t) -> torch.Tensor | None:
        """[B] float mask of the samples whose t lies in the interval (None: every sample active; with
        a float t inside the interval too, so such a step multiplies no mask into its weights)."""
        if self.interval is None:
            return None
        B = x.shape[0]
        if isinstance(t, torch.Tensor):
            return in_interval(t.reshape(-1), self.interval).expand(B).to(torch.float64)
        if in_interval(t, self.interval):
            return None
        return torch.zeros((B,), dtype=torch.float64, device=x.device)

    def step(self, x, outputs, t, *, param="velocity", solver="euler", t_next=None, x_prev=None,
             u_prev=None, step_index=0, num_steps=1, state=None, out_param="velocity",
             return_x0=False) -> GuidanceOutput:
        if state is None:
            state = {}
        kw = self.arguments(x, t, step_index=step_index, num_steps=num_steps, state=state)
        res = guidance_step(x, outputs, t, param=param, solver=solver, t_next=t_next, x_prev=x_prev,
                            u_prev=u_prev, out_param=out_param,
                            return_x0=return_x0 or self.needs_reference, **kw)
        if res.momentum is not None:
            # Both Heun stages of a step start from the buffer the step began with.
            state[self._state_key()] = {"step": step_index, "prev": kw.get("momentum"), "new": res.momentum}
        return res

    def _state_key(self) -> str:
        return f"momentum:{id(self)}"


class NoGuidance(GuidancePolicy):
    """G = C (one branch)."""

    branches = (Branch(),)


class _TwoBranch(GuidancePolicy):
    """G = C + weight·(C − N): the shape of CFG, AutoGuidance, internal guidance, APG, CFG-Zero*."""

    def _weight(self) -> float:
        return self.scale - 1.0

    def arguments(self, x, t, *, step_index, num_steps, state):
        return dict(terms=[(0, 1)], weights=[self._weight()], base=0, mask=self.mask(x, t))


class CFG(_TwoBranch):
    """Classifier-free guidance: ``U + w·(C − U)`` (form="reference", diffusers/REPA/RAE) or
    ``C + w·(C − U)`` (form="anchor", Ho & Salimans). Branches: (cond, null)."""

    branches = (Branch(label="cond"), Branch(label="null"))

    def __init__(self, scale: float, form: str = "reference", interval=None, num_classes: int = NULL_LABEL):
        self.scale = _check_scale("CFG", "scale", scale)
        if form not in ("reference", "anchor"):
            _fail("CFG", "form", f"must be 'reference' or 'anchor', got {form!r}")
        self.form = form
        self.interval = _check_interval("CFG", interval)
        self.null_label = int(num_classes)

    def _weight(self):
        return self.scale - 1.0 if self.form == "reference" else self.scale


class AutoGuidance(_TwoBranch):
    """AutoGuidance: ``W + w·(C − W)`` with W the weak model at the same label (RAE: DiT^DH-S,
    w = 1.42 at 256 px, 1.5 at 512 px). Branches: (main cond, weak cond)."""

    branches = (Branch(model="main", label="cond"), Branch(model="weak", label="cond"))

    def __init__(self, scale: float, interval=None):
        self.scale = _check_scale("AutoGuidance", "scale", scale)
        self.interval = _check_interval("AutoGuidance", interval)


class InternalGuidance(GuidancePolicy):
    """RAEv2 internal ("REPA") guidance from one forward returning ``(x_full, x_base)``:
    ``x_base + s·(x_full − x_base)`` for ``t ∈ interval`` (released: s = 1.78, interval (0.1, 1)).

    With ``cfg_scale`` (RAEv2's ``forward_with_ig_and_cfg``): internal guidance on the cond and null
    halves (the null half with ``uncond_scale``, default ``scale``), then CFG
    ``IG_u + cfg·(IG_c − IG_u)``; the interval gates the internal guidance only.
    """

    def __init__(self, scale: float, interval=(0.1, 1.0), cfg_scale: float | None = None,
                 uncond_scale: float | None = None, num_classes: int = NULL_LABEL):
        self.scale = _check_scale("InternalGuidance", "scale", scale)
        self.interval = _check_interval("InternalGuidance", interval)
        self.cfg_scale = None if cfg_scale is None else _check_scale("InternalGuidance", "cfg_scale", cfg_scale)
        self.uncond_scale = self.scale if uncond_scale is None else _check_scale(
            "InternalGuidance", "uncond_scale", uncond_scale)
        self.null_label = int(num_classes)
        if self.cfg_scale is None:
            self.branches = (Branch(output=0), Branch(output=1))
        else:
            self.branches = (Branch(label="cond", output=0), Branch(label="cond", output=1),
                             Branch(label="null", output=0), Branch(label="null", output=1))

    def arguments(self, x, t, *, step_index, num_steps, state):
        m = self.mask(x, t)
        if self.cfg_scale is None:
            return dict(terms=[(0, 1)], weights=[self.scale - 1.0], base=0, mask=m)
        # G = w·IG_c + (1 − w)·IG_u with IG = F + (s − 1)(F − B), written on base F_c:
        # F_c + w(s−1)(F_c − B_c) + (w − 1)(F_c − F_u) + (1 − w)(s_u − 1)(F_u − B_u).
        w, s, su = self.cfg_scale, self.scale, self.uncond_scale
        B = x.shape[0]
        one = torch.ones(B, dtype=torch.float64, device=x.device)
        gate = one if m is None else m
        weights = torch.stack([w * (s - 1.0) * gate, (w - 1.0) * one, (1.0 - w) * (su - 1.0) * gate], dim=1)
        return dict(terms=[(0, 1), (0, 2), (2, 3)], weights=weights, base=0)


class GFCG(GuidancePolicy):
    """Gradient-free classifier guidance as raekern defines it (DESIGN §4.3, docs/guidance.md).

    The classifier sees the guided x0 estimate (of the previous step by default, so every branch
    runs in one batched call; ``reference_from_previous_step=False``: this step's conditional x0).
    ``gfcg_select`` picks the reference class r (most probable class other than the label y) and
    ``w_b = clip(w_max·exp(−kappa·(p_y − p_r)), w_min, w_max)``; every mode adds ``w_b·(C − R)`` to
    its host rule, R being the branch evaluated at r:

    - "alone":          G = C + w_b·(C − R)                                 branches (C, R)
    - "cfg3":           G = U + cfg·(C − U) + w_b·(C − R)                   branches (C, U, R)
    - "cfg_substitute": G = R + cfg·(C − R) + w_b·(C − R)                   branches (C, R)
    - "autoguidance":   G = W(r) + ag·(C − W(r)) + w_b·(C − W(r))           branches (C, W at r)

    ``classifier(x0 [B, *S]) -> logits [B, num_classes]`` runs under ``torch.no_grad``. Before the
    first reference is known (``select_reference(None, labels)``) r = y and w_b = 0: plain host rule.
    """

    needs_reference = True

    def __init__(self, classifier: Callable, w_max: float, kappa: float, mode: str = "alone",
                 cfg_scale: float = 1.0, ag_scale: float = 1.0, reference_from_previous_step: bool = True,
                 interval=None, w_min: float = 0.0, num_classes: int = NULL_LABEL):
        if not callable(classifier):
            _fail("GFCG", "classifier", f"must be callable (x0 -> logits), got {type(classifier).__name__}",
                  TypeError)
        self.classifier = classifier
        self.w_max = _check_scale("GFCG", "w_max", w_max)
        self.kappa = _check_scale("GFCG", "kappa", kappa)
        self.w_min = _check_scale("GFCG", "w_min", w_min)
        if self.w_min > self.w_max:
            _fail("GFCG", "w_min", f"must be <= w_max ({self.w_max}), got {self.w_min}")
        modes = ("alone", "cfg3", "cfg_substitute", "autoguidance")
        if mode not in modes:
            _fail("GFCG", "mode", f"must be one of {list(modes)}, got {mode!r}")
        self.mode = mode
        self.cfg_scale = _check_scale("GFCG", "cfg_scale", cfg_scale)
        self.ag_scale = _check_scale("GFCG", "ag_scale", ag_scale)
        self.reference_from_previous_step = bool(reference_from_previous_step)
        self.interval = _check_interval("GFCG", interval)
        self.null_label = int(num_classes)
        self._weights: torch.Tensor | None = None
        self.branches = {
            "alone": (Branch(label="cond"), Branch(label="ref")),
            "cfg3": (Branch(label="cond"), Branch(label="null"), Branch(label="ref")),
            "cfg_substitute": (Branch(label="cond"), Branch(label="ref")),
            "autoguidance": (Branch(model="main", label="cond"), Branch(model="weak", label="ref")),
        }[mode]

    @torch.no_grad()
    def select_reference(self, x0, labels):
        if x0 is None:
            self._weights = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
            return labels, self._weights
        logits = self.classifier(x0)
        ref, w, _, _ = gfcg_select(logits, labels, w_max=self.w_max, kappa=self.kappa, w_min=self.w_min)
        if ref.device.type != "cpu":
            # The GPU kernel does not synchronise to validate targets: a label outside the classifier's
            # classes reads ref = -1 and NaN weights. Checked (one sync) outside CUDA-graph capture,
            # which the sampler's warm-up step is; under capture such a row is neutralised, so that
            # -1 never reaches an embedding table as a label (a device-side assert).
            if not (ref.is_cuda and torch.cuda.is_current_stream_capturing()) and bool((ref < 0).any()):
                raise ValueError(f"raekern.sampling.GFCG: argument 'labels' must be classes of the classifier "
                                 f"[0, {logits.shape[-1]}), got {labels.tolist()}")
            ref = torch.where(ref < 0, labels, ref)
            w = torch.nan_to_num(w, nan=0.0)
        self._weights = w
        return ref, w

    def arguments(self, x, t, *, step_index, num_steps, state):
        B = x.shape[0]
        w = self._weights
        if w is None:
            w = torch.zeros(B, dtype=torch.float64, device=x.device)
        if w.shape != (B,):
            _fail("GFCG", "weights", f"from select_reference have shape {tuple(w.shape)}, expected [{B}]")
        w = w.to(torch.float64)
        m = self.mask(x, t)
        if self.mode == "alone":
            return dict(terms=[(0, 1)], weights=[w], base=0, mask=m)
        if self.mode == "cfg3":
            return dict(terms=[(0, 1), (0, 2)], weights=[self.cfg_scale - 1.0, w], base=0, mask=m)
        host = self.cfg_scale if self.mode == "cfg_substitute" else self.ag_scale
        return dict(terms=[(0, 1)], weights=[w + (host - 1.0)], base=0, mask=m)


class APG(_TwoBranch):
    """Adaptive projected guidance (Sadat et al., Algorithm 1), statistics in x0 space:
    ``D = C − U``; with ``momentum`` β: ``D ← D + β·D_prev`` (buffer kept in ``state``); with
    ``norm_threshold`` r > 0: ``D ← D·min(1, r/‖D‖)``; ``D ← D − (1 − eta)·proj_C(D)``;
    ``G = C + (w − 1)·D``. Branches (cond, null)."""

    branches = (Branch(label="cond"), Branch(label="null"))

    def __init__(self, scale: float, eta: float = 0.0, norm_threshold: float = 0.0, momentum: float = 0.0,
                 interval=None, stats_space: str = "x0", num_classes: int = NULL_LABEL):
        self.scale = _check_scale("APG", "scale", scale)
        self.eta = _check_scale("APG", "eta", eta)
        self.norm_threshold = _check_scale("APG", "norm_threshold", norm_threshold)
        if self.norm_threshold < 0:
            _fail("APG", "norm_threshold", f"must be >= 0, got {norm_threshold}")
        self.beta = _check_scale("APG", "momentum", momentum)
        self.interval = _check_interval("APG", interval)
        self.stats_space = stats_space
        self.null_label = int(num_classes)

    def arguments(self, x, t, *, step_index, num_steps, state):
        kw = super().arguments(x, t, step_index=step_index, num_steps=num_steps, state=state)
        kw.update(apg_eta=self.eta, apg_norm_threshold=self.norm_threshold or None, stats_space=self.stats_space)
        if self.beta != 0.0:
            e, m = state.get(self._state_key()), None
            if e is not None and e["step"] == step_index:
                m = e["prev"]
            elif e is not None and e["step"] == step_index - 1:
                m = e["new"]
            if m is not None and m.shape[1:] != x.shape:
                m = None
            kw.update(apg_beta=self.beta, momentum=m)
        return kw


class CFGZeroStar(_TwoBranch):
    """CFG-Zero* (Fan et al.): ``s* = <C,U>/(‖U‖² + 1e-8)`` per sample in velocity space,
    ``G = s*·U + w·(C − s*·U)``; the first ``zero_init_steps`` steps (``step_index <
    zero_init_steps``, diffusers' convention) output zero velocity. ``variant="comfyui"`` forms s*·U
    in x0 space (ComfyUI's post-CFG node; differs by ``x_t·(1 − s*)(1 − w)`` in x0)."""

    branches = (Branch(label="cond"), Branch(label="null"))

    def __init__(self, scale: float, zero_init_steps: int = 1, interval=None, variant: str = "official",
                 num_classes: int = NULL_LABEL):
        self.scale = _check_scale("CFGZeroStar", "scale", scale)
        if not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            _fail("CFGZeroStar", "zero_init_steps", f"must be an int >= 0, got {zero_init_steps!r}")
        self.zero_init_steps = zero_init_steps
        if variant not in ("official", "comfyui"):
            _fail("CFGZeroStar", "variant", f"must be 'official' or 'comfyui', got {variant!r}")
        self.variant = variant
        self.interval = _check_interval("CFGZeroStar", interval)
        self.null_label = int(num_classes)

    def arguments(self, x, t, *, step_index, num_steps, state):
        kw = super().arguments(x, t, step_index=step_index, num_steps=num_steps, state=state)
        kw.update(zero_star=True if self.variant == "official" else "x0", stats_space="velocity")
        if step_index < self.zero_init_steps:
            kw["zero_init"] = True
        return kw


class GuidanceRescale(GuidancePolicy):
    """Guidance rescale (Lin et al.) around any policy: ``G ← G·(φ·std(C)/std(G) + 1 − φ)``, stds
    (unbiased, per sample) in ``space`` (x0 by default; "velocity"/"eps" for diffusers' model-output
    variants). C is the inner policy's first (conditional) branch."""

    def __init__(self, inner: GuidancePolicy, phi: float = 0.7, space: str = "x0"):
        if not isinstance(inner, GuidancePolicy):
            _fail("GuidanceRescale", "inner", f"must be a GuidancePolicy, got {type(inner).__name__}", TypeError)
        self.inner = inner
        self.phi = _check_scale("GuidanceRescale", "phi", phi)
        if space not in ("x0", "velocity", "eps"):
            _fail("GuidanceRescale", "space", f"must be 'x0', 'velocity' or 'eps', got {space!r}")
        self.space = space

    branches = property(lambda self: self.inner.branches)
    needs_reference = property(lambda self: self.inner.needs_reference)
    reference_from_previous_step = property(lambda self: self.inner.reference_from_previous_step)
    interval = property(lambda self: self.inner.interval)
    null_label = property(lambda self: self.inner.null_label)

    def select_reference(self, x0, labels):
        return self.inner.select_reference(x0, labels)

    def _state_key(self) -> str:
        return self.inner._state_key()

    def arguments(self, x, t, *, step_index, num_steps, state):
        kw = self.inner.arguments(x, t, step_index=step_index, num_steps=num_steps, state=state)
        kw.update(rescale_phi=self.phi, rescale_space=self.space, rescale_ref=0)
        return kw
