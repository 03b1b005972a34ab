"""Guidance written as text (the CLI's ``--guidance``), parsed into raekern.sampling.guidance policies.

Each spec is ``method[:args]`` with positional values first and ``key=value`` after, separated by
commas; several specs combine (``cfg:1.5 interval:0.2,0.8 rescale:0.7``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

GUIDANCE_HELP = """\
guidance methods (--guidance, repeatable; RF time t: 1 = noise, 0 = data; C = conditional branch,
U = unconditional (null label) branch, W = weak model, R = branch at the GFCG reference class;
every formula is applied to the branch outputs and gives the same result in velocity, x0 or eps
space unless marked "space-dependent"):
  none                   G = C
  cfg:W[,form=anchor]    classifier-free guidance  G = U + W·(C − U)   (form=anchor: G = C + W·(C − U))
  ag:W                   AutoGuidance (needs --weak-ckpt)  G = W_weak + W·(C_main − W_weak)
                         (released RAE v1 256 px: ag:1.42, 512 px: ag:1.5)
  internal:W[,cfg=Wc][,uncond=Wu]
                         RAEv2 internal guidance from one forward (x_full, x_base):
                         G = x_base + W·(x_full − x_base), on t ∈ [0.1, 1] unless interval: is given
                         (released RAEv2: internal:1.78); with cfg=: internal guidance on the cond
                         and null halves (null half with Wu, default W), then U' + Wc·(C' − U')
  gfcg:w_max=..,kappa=..[,mode=alone|cfg3|cfg_substitute|autoguidance][,cfg=W][,ag=W][,ref=previous|current]
                         gradient-free classifier guidance (needs a classifier): the classifier sees the
                         x0 estimate, r = most probable class other than the label y,
                         w = clip(w_max·exp(−kappa·(p_y − p_r)), 0, w_max); every mode adds w·(C − R):
                         alone:          G = C + w·(C − R)
                         cfg3:           G = U + cfg·(C − U) + w·(C − R)          (three branches)
                         cfg_substitute: G = R + cfg·(C − R) + w·(C − R)   (R replaces the null label)
                         autoguidance:   G = W_weak(r) + ag·(C − W_weak(r)) + w·(C − W_weak(r))
                                         (needs --weak-ckpt; no extra network cost)
                         ref=previous (default) takes r from the previous step's guided x0, so all
                         branches run in one batched call (step 0: w = 0); ref=current takes it from
                         this step's conditional x0 (the C branch runs first)
  apg:W[,eta=0][,norm=r][,momentum=b]
                         adaptive projected guidance (space-dependent, statistics in x0 space):
                         D = C − U (+ b·D_prev), D ← D·min(1, r/‖D‖), D ← D − (1 − eta)·proj_C(D),
                         G = C + (W − 1)·D
  cfgzero:W[,steps=1]    CFG-Zero* (space-dependent, velocity space): s* = <C,U>/‖U‖²,
                         G = s*·U + W·(C − s*·U); zero velocity for the first `steps` steps
  rescale:PHI            guidance rescale around the chosen method (space-dependent, x0 space):
                         G ← G·(PHI·std(C)/std(G) + 1 − PHI)
  interval:LO,HI         apply the guidance only for LO <= t <= HI, compared in float32 as the released
                         samplers do (otherwise G = C); for internal: gates the internal guidance
"""


def _fail(arg: str, msg: str):
    raise ValueError(f"raekern sample: argument '{arg}' {msg}")


def parse_spec(spec: str) -> tuple[str, list[str], dict[str, str]]:
    """'cfg:1.5,form=anchor' → ('cfg', ['1.5'], {'form': 'anchor'})."""
    method, _, rest = spec.strip().partition(":")
    pos, kw = [], {}
    for item in [s for s in rest.split(",") if s.strip()]:
        if "=" in item:
            k, _, v = item.partition("=")
            kw[k.strip()] = v.strip()
        else:
            pos.append(item.strip())
    return method.strip().lower(), pos, kw


def _num(v: str, what: str) -> float:
    try:
        return float(v)
    except ValueError:
        _fail("guidance", f"expects a number for {what}, got {v!r}")


# The key=value options each method takes (anything else is a typo that must not pass silently).
KEYS = {"none": (), "cfg": ("form",), "ag": (), "internal": ("cfg", "uncond"),
        "gfcg": ("w_max", "kappa", "mode", "cfg", "ag", "ref"), "apg": ("eta", "norm", "momentum"),
        "cfgzero": ("steps",), "interval": (), "rescale": ()}


def describe(specs: Sequence[str]) -> dict:
    """Parse specs into one description: {'method', 'args', 'kw', 'interval', 'rescale'}."""
    main, interval, rescale = None, None, None
    for spec in specs:
        m, pos, kw = parse_spec(spec)
        unknown = sorted(set(kw) - set(KEYS.get(m, kw)))
        if unknown:
            allowed = ", ".join(f"{k}=" for k in KEYS[m]) or "no key=value options"
            _fail("guidance", f"has an unknown option {unknown[0]!r} for {m} in {spec!r} ({m} takes {allowed})")
        if m == "none" and pos:
            _fail("guidance", f"none takes no values, got {spec!r}")
        if m == "gfcg" and pos:  # gfcg has no scale: its numbers are named (w_max=, kappa=, cfg=, ag=)
            _fail("guidance", f"gfcg takes only key=value options ({', '.join(f'{k}=' for k in KEYS['gfcg'])}), "
                  f"got {spec!r}; e.g. gfcg:w_max=2,kappa=10")
        if m in ("interval", "rescale") and (interval if m == "interval" else rescale) is not None:
            # Keeping only the last of two would silently drop a setting the user wrote.
            _fail("guidance", f"gives {m}: twice ({spec!r} is the second); give it once")
        if m == "interval":
            if len(pos) != 2:
                _fail("guidance", f"interval needs two values LO,HI, got {spec!r}")
            interval = (_num(pos[0], "interval"), _num(pos[1], "interval"))
        elif m == "rescale":
            if len(pos) != 1:
                _fail("guidance", f"rescale needs one value PHI, got {spec!r}")
            rescale = _num(pos[0], "rescale")
        elif m in ("none", "cfg", "ag", "internal", "gfcg", "apg", "cfgzero"):
            if main is not None:
                _fail("guidance", f"combines two methods ({main[0]} and {m}); use gfcg's mode= to "
                      "combine GFCG with CFG or AutoGuidance")
            main = (m, pos, kw)
        else:
            _fail("guidance", f"has an unknown method {m!r} in {spec!r}; see `raekern sample --help`")
    if main is None:
        main = ("none", [], {})
    return {"method": main[0], "args": main[1], "kw": main[2], "interval": interval, "rescale": rescale}


def build_policy(specs: Sequence[str], *, classifier: Callable | None = None, has_weak: bool = False,
                 num_classes: int = 1000):
    """Build the policy for the specs. ``classifier``: x0 latents → logits (GFCG)."""
    from raekern.sampling import guidance as G

    d = describe(specs)
    m, pos, kw, interval = d["method"], d["args"], d["kw"], d["interval"]

    def scale() -> float:
        if len(pos) != 1:
            _fail("guidance", f"{m} needs one scale, e.g. {m}:1.5")
        return _num(pos[0], f"{m}'s scale")

    ikw = {} if interval is None else {"interval": interval}
    if interval is not None and m == "none":
        _fail("guidance", "interval: needs a guidance method")
    if m == "none":
        policy = G.NoGuidance()
    elif m == "cfg":
        policy = G.CFG(scale(), form=kw.get("form", "reference"), num_classes=num_classes, **ikw)
    elif m == "ag":
        if not has_weak:
            _fail("guidance", "ag: needs a weak model (--weak-ckpt or a preset that has one)")
        policy = G.AutoGuidance(scale(), **ikw)
    elif m == "internal":
        ig = {} if "cfg" not in kw else {"cfg_scale": _num(kw["cfg"], "cfg")}
        if "uncond" in kw:
            ig["uncond_scale"] = _num(kw["uncond"], "uncond")
        policy = G.InternalGuidance(scale(), interval=interval if interval is not None else (0.1, 1.0),
                                    num_classes=num_classes, **ig)
    elif m == "gfcg":
        if classifier is None:
            _fail("guidance", "gfcg needs a classifier (--classifier-ckpt or a preset that has one)")
        mode = kw.get("mode", "alone")
        if mode == "autoguidance" and not has_weak:
            _fail("guidance", "gfcg mode=autoguidance needs a weak model (--weak-ckpt)")
        ref = kw.get("ref", "previous")
        if ref not in ("previous", "current"):
            _fail("guidance", f"gfcg ref= must be 'previous' or 'current', got {ref!r}")
        gkw = dict(w_max=_num(kw.get("w_max", "2.0"), "w_max"), kappa=_num(kw.get("kappa", "10"), "kappa"),
                   mode=mode, reference_from_previous_step=(ref == "previous"), num_classes=num_classes,
                   **ikw)
        if "cfg" in kw:
            gkw["cfg_scale"] = _num(kw["cfg"], "cfg")
        if "ag" in kw:
            gkw["ag_scale"] = _num(kw["ag"], "ag")
        policy = G.GFCG(classifier, **gkw)
    elif m == "apg":
        policy = G.APG(scale(), eta=_num(kw.get("eta", "0"), "eta"),
                       norm_threshold=_num(kw.get("norm", "0"), "norm"),
                       momentum=_num(kw.get("momentum", "0"), "momentum"), num_classes=num_classes, **ikw)
    elif m == "cfgzero":
        steps = _num(kw.get("steps", "1"), "steps")
        if not math.isfinite(steps) or steps != int(steps) or steps < 0:  # int() of inf/nan raises
            _fail("guidance", f"cfgzero steps= must be a whole number >= 0, got {kw['steps']!r}")
        policy = G.CFGZeroStar(scale(), zero_init_steps=int(steps),
                               num_classes=num_classes, **ikw)
    else:  # pragma: no cover - describe() rejects the rest
        _fail("guidance", f"unknown method {m!r}")
    if d["rescale"] is not None:
        policy = G.GuidanceRescale(policy, d["rescale"])
    return policy
