"""Input-validation battery (issue #11.1) over every public op, generated from the op table in
_reliability_helpers: each case either works (and matches the reference) or raises a ValueError /
TypeError whose message names the argument. docs/reliability.md tabulates the outcomes."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from _reliability_helpers import SPECS, close, close_nonfinite, first, replace, time_limit

B, N, D = 2, 5, 16
ERR = (ValueError, TypeError)


def _cases(attr):
    return [pytest.param(s, a, id=f"{s.name}-{a}") for s in SPECS for a in getattr(s, attr)]


def _tensor_args(spec, args):
    return [k for k, v in args.items() if isinstance(first(v), torch.Tensor)]


def _run(spec, args):
    with time_limit(60, spec.name):
        return spec.call(**args)


def _check_vs_ref(spec, args, dtype, **kw):
    got = _run(spec, args)
    want = spec.ref(**args)
    close(got, want, dtype, tol=spec.tol, what=spec.name, **kw)
    return got


def _make(spec, b=B, n=N, d=D, dtype=torch.float32):
    torch.manual_seed(0)
    return spec.make(b, n, d, dtype)


# ------------------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("spec,arg", _cases("bad_rank"))
def test_wrong_rank_names_argument(spec, arg):
    args = replace(_make(spec), arg, spec.bad_rank[arg])
    with pytest.raises(ERR, match=f"'{arg}'"):
        _run(spec, args)


@pytest.mark.parametrize("spec,arg", _cases("bad_size"))
def test_wrong_size_names_argument(spec, arg):
    fn, names = spec.bad_size[arg] if isinstance(spec.bad_size[arg], tuple) else (spec.bad_size[arg], f"'{arg}'")
    args = replace(_make(spec), arg, fn)
    with pytest.raises(ERR, match=names):
        _run(spec, args)


def test_list_arguments_must_agree():
    from raekern import ops as R
    a, b = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match="'layers'"):
        R.layer_stack_fuse([a, b])
    with pytest.raises(ValueError, match="'layers'"):
        R.layer_stack_fuse([])
    with pytest.raises(TypeError, match="'experts'"):
        R.depth_route([a, a.double()], torch.randn(2, 5, 2), a)
    with pytest.raises(TypeError, match="'branches'"):
        R.guidance_step(a, [a, "b"], 0.5, terms=[(0, 1)], weights=[1.0], base=0)


# ------------------------------------------------------------------------------------------ devices / dtypes

def _all_tensor_cases():
    out = []
    for s in SPECS:
        names = _tensor_args(s, _make(s))
        for a in names if len(names) > 1 else ():
            out.append(pytest.param(s, a, id=f"{s.name}-{a}"))
    return out


@pytest.mark.parametrize("spec,arg", _all_tensor_cases())
def test_mixed_devices_name_argument(spec, arg):
    """One argument on another device ('meta' stands in for a second device on a CPU-only machine)."""
    args = _make(spec)
    if arg == _tensor_args(spec, args)[0]:
        # the first argument defines the device; move every other tensor instead
        for other in _tensor_args(spec, args)[1:]:
            args = replace(args, other, lambda t: t.to("meta"))
        names = "|".join(f"'{o}'" for o in _tensor_args(spec, args)[1:])
    else:
        args = replace(args, arg, lambda t: t.to("meta"))
        names = f"'{arg}'"
    with pytest.raises(ERR, match=names):
        _run(spec, args)


BAD_DTYPES = [torch.int32, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn]


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("spec,arg", _cases("float_args"))
def test_unsupported_dtype_names_argument(spec, arg, bad):
    args = replace(_make(spec), arg, lambda t: t.to(bad) if bad != torch.complex64 else torch.complex(t.float(), t.float()))
    with pytest.raises(ERR, match=f"'{arg}'"):
        _run(spec, args)


@pytest.mark.parametrize("spec,arg", _cases("same_dtype"))
def test_mismatched_float_dtype_names_argument(spec, arg):
    args = replace(_make(spec), arg, lambda t: t.double())
    with pytest.raises(ERR, match=f"'{arg}'"):
        _run(spec, args)


def test_index_arguments_need_integer_or_bool_tensors():
    from _reliability_helpers import SPEC
    g = _make(SPEC["gfcg_select"])
    for bad in (g["target"].float(), g["target"].bool()):
        with pytest.raises(TypeError, match="'target'"):
            _run(SPEC["gfcg_select"], {**g, "target": bad})
    a = _make(SPEC["attention"])
    with pytest.raises(TypeError, match="'key_padding_mask'"):
        _run(SPEC["attention"], {**a, "key_padding_mask": a["key_padding_mask"].float()})


def test_gfcg_target_out_of_range_is_refused():
    """A label outside [0, C) would index past the logits row."""
    from raekern import ops as R
    logits = torch.randn(3, 5)
    for bad in (torch.tensor([0, 5, 1]), torch.tensor([0, -1, 1])):
        with pytest.raises((ValueError, IndexError, RuntimeError), match="'target'"):
            R.gfcg_select(logits, bad, w_max=2.0, kappa=1.0)


# ------------------------------------------------------------------------------------------ layouts

def _noncontig_lastdim(t):
    if not t.dtype.is_floating_point or t.dim() == 0:
        return t
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]  # stride 2 along the last dim


def _permuted(t):
    if t.dim() < 2:
        return t
    if t.dim() == 2:
        return t.t().contiguous().t()  # column-major
    return t.transpose(0, -2).contiguous().transpose(0, -2)  # non-contiguous, unit last-dim stride


def _expanded(t):
    if t.dim() < 2 or t.shape[0] == 0:
        return t
    return t[:1].expand_as(t)  # stride 0 over the batch


def _apply_all(args, fn):
    out = {}
    for k, v in args.items():
        if isinstance(v, (list, tuple)):
            out[k] = [fn(t) for t in v]
        elif isinstance(v, torch.Tensor):
            out[k] = fn(v)
        else:
            out[k] = v
    return out


LAYOUTS = {"lastdim_stride2": _noncontig_lastdim, "permuted": _permuted, "expanded_stride0": _expanded}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_strided_and_expanded_inputs_match_reference(spec, dtype, layout):
    args = _apply_all(_make(spec, dtype=dtype), LAYOUTS[layout])
    assert any(not first(v).is_contiguous() for v in args.values() if isinstance(first(v), torch.Tensor)) \
        or layout == "expanded_stride0"
    _check_vs_ref(spec, args, dtype)


def _alias_pairs(spec):
    args = _make(spec)
    flat = [(k, first(v)) for k, v in args.items() if isinstance(first(v), torch.Tensor)]
    return [(a, b) for (a, ta), (b, tb) in itertools.combinations(flat, 2)
            if ta.shape == tb.shape and ta.dtype == tb.dtype]


@pytest.mark.parametrize("spec,pair", [pytest.param(s, p, id=f"{s.name}-{p[0]}={p[1]}")
                                       for s in SPECS for p in _alias_pairs(s)])
def test_aliased_and_self_overlapping_inputs(spec, pair):
    """The same storage passed as two arguments, and inputs whose elements overlap in memory."""
    args = _make(spec)
    a, b = pair
    args = replace(args, b, lambda _: first(args[a]))
    _check_vs_ref(spec, args, torch.float32, equal_nan=True)  # e.g. var = mean < 0 gives NaN in both
    # self-overlapping: consecutive rows share all but one element (as_strided with row stride 1)
    t = first(args[a])
    if t.dim() >= 2 and t.dtype.is_floating_point:
        base = torch.randn(t.numel(), dtype=t.dtype)
        strides = [1] * t.dim()
        strides[-1] = 1
        for i in range(t.dim() - 2, -1, -1):
            strides[i] = 1 if i == t.dim() - 2 else strides[i + 1] * t.shape[i + 1]
        over = base.as_strided(t.shape, strides)
        _check_vs_ref(spec, replace(args, a, lambda _: over), torch.float32, equal_nan=True)


def test_outputs_never_alias_inputs():
    """Ops return fresh tensors: writing into an output never changes an input."""
    from _reliability_helpers import SPEC
    for spec in SPECS:
        args = _make(spec)
        before = {k: [t.clone() for t in v] if isinstance(v, list) else v.clone() for k, v in args.items()}
        outs = spec.call(**args)
        for o in (outs if isinstance(outs, tuple) else (outs,)):
            if isinstance(o, torch.Tensor) and o.numel() and o.dtype.is_floating_point:
                o.fill_(123.0)
        for k, v in args.items():
            for t, t0 in zip(v if isinstance(v, list) else [v], before[k] if isinstance(v, list) else [before[k]]):
                assert torch.equal(t, t0), (spec.name, k)
    assert SPEC


# ------------------------------------------------------------------------------------------ empty tensors

@pytest.mark.parametrize("which", ["B=0", "N=0"])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_empty_tensors(spec, which):
    b, n = (0, N) if which == "B=0" else (B, 0)
    expect = spec.empty_b if which == "B=0" else spec.empty_n
    args = _make(spec, b=b, n=n)
    if expect == "raises":
        with pytest.raises(ValueError, match="'"):
            _run(spec, args)
        return
    got = _run(spec, args)
    want = spec.ref(**args)
    close(got, want, torch.float32, what=spec.name)


# ------------------------------------------------------------------------------------------ NaN / Inf

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_nonfinite_inputs_propagate_like_reference(spec, value):
    """A non-finite entry in the first float input: no hang, no crash, same NaN/Inf pattern as the
    reference and identical finite values elsewhere."""
    args = _make(spec)
    name = spec.float_args[0]

    def poison(t):
        t = t.clone()
        t.view(-1)[0] = value
        return t
    args = replace(args, name, poison)
    got = _run(spec, args)
    close_nonfinite(got, spec.ref(**args), torch.float32, tol=spec.tol, what=spec.name)


# ------------------------------------------------------------------------------------------ > 2^31 elements

BIG = dict(b=1 << 14, n=1 << 9, d=1 << 9)  # B·N·D = 2^32 elements, never allocated


def _shape_tree(x):
    if isinstance(x, (tuple, list)):
        return [_shape_tree(v) for v in x]
    return None if x is None else (tuple(x.shape), x.dtype)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_past_int32_sizes_through_fake_kernels(spec):
    """Sizes past 2^31 elements: the public function, its checks and the fake kernel agree with the
    reference on every output shape (fake tensors: nothing is allocated)."""
    with FakeTensorMode():
        torch.manual_seed(0)
        b, n, d = BIG["b"], BIG["n"], BIG["d"]
        if spec.name == "gfcg_select":
            b, n = 1 << 22, (1 << 10) - 2  # logits [2^22, 2^10]
        if spec.name.startswith("attention"):
            b = 1 << 16  # head dim is capped at 64
        args = spec.make(b, n, d, torch.bfloat16)
        assert max(first(v).numel() for v in args.values()) >= 1 << 31
        got = _shape_tree(spec.call(**args))
        want = _shape_tree(spec.ref(**args))
    assert got == want


def _far_rows(t: torch.Tensor) -> torch.Tensor:
    """A view of t whose rows (dim 0) lie 2^31 elements apart. The storage is reserved but never
    touched except at those rows, so the pages between them cost no memory."""
    far = (1 << 31) + 64
    rows, inner = t.shape[0], t[0].numel()
    store = torch.empty((rows - 1) * far + inner, dtype=t.dtype)
    strides = (far,) + tuple(torch.empty(t.shape[1:]).stride())
    view = store.as_strided(t.shape, strides)
    view.copy_(t)
    return view


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_past_int32_offsets_on_the_cpu_kernels(spec):
    """The real CPU kernel reads a batch row that starts 2^31 elements into its storage: 64-bit index
    arithmetic gives the reference result, 32-bit would read elsewhere (or crash)."""
    args = _make(spec, dtype=torch.bfloat16)
    name = spec.float_args[0]
    if first(args[name]).dim() < 2:
        pytest.skip("first argument has no batch rows")
    args = replace(args, name, _far_rows)
    assert first(args[name]).stride(0) > 1 << 31
    _check_vs_ref(spec, args, torch.bfloat16)


# ------------------------------------------------------------------------------------------ model entry points

def _models():
    import raekern.models as M
    torch.manual_seed(0)
    return {n: M.build(n).eval() for n in ("ditdh-tiny", "ditdh-tiny-v2", "decoder-tiny", "dinov2-tiny-reg")}


_MODELS = {}


def _model(name):
    if not _MODELS:
        _MODELS.update(_models())
    return _MODELS[name]


def _dit_args(m, B=2):
    return torch.randn(B, m.in_channels, m.input_size, m.input_size), torch.rand(B), torch.arange(B) % 10


def _nan_first(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# (case id, model, build the call's args from the good ones, expected: None = works, else (exc, 'arg'))
_DIT_CASES = [
    ("x-rank", lambda x, t, y: (x[0], t, y), (ValueError, "'x'")),
    ("x-size", lambda x, t, y: (x[:, :-1], t, y), (ValueError, "'x'")),
    ("x-int", lambda x, t, y: (x.long(), t, y), (TypeError, "'x'")),
    ("x-complex", lambda x, t, y: (torch.complex(x, x), t, y), (TypeError, "'x'")),
    ("x-float64-vs-fp32-model", lambda x, t, y: (x.double(), t, y), (TypeError, "'x'")),
    ("x-other-device", lambda x, t, y: (x.to("meta"), t.to("meta"), y.to("meta")), (ValueError, "'x'")),
    ("t-rank", lambda x, t, y: (x, t[:, None], y), (ValueError, "'t'")),
    ("t-other-device", lambda x, t, y: (x, t.to("meta"), y), (ValueError, "'t'")),
    ("y-float", lambda x, t, y: (x, t, y.float()), (ValueError, "'y'")),
    ("y-out-of-range", lambda x, t, y: (x, t, y + 10 ** 6), (ValueError, "'y'")),
    ("y-negative", lambda x, t, y: (x, t, y - 5), (ValueError, "'y'")),
    ("B=0", lambda x, t, y: (x[:0], t[:0], y[:0]), None),
    ("non-contiguous-x", lambda x, t, y: (x.transpose(2, 3).contiguous().transpose(2, 3), t, y), None),
    ("expanded-x", lambda x, t, y: (x[:1].expand_as(x), t[:1].expand_as(t), y), None),
    ("nan-x", lambda x, t, y: (_nan_first(x), t, y), None),
]


@pytest.mark.parametrize("name", ["ditdh-tiny", "ditdh-tiny-v2"])
@pytest.mark.parametrize("case,mutate,expect", _DIT_CASES, ids=[c[0] for c in _DIT_CASES])
def test_dit_entry_point(name, case, mutate, expect):
    m = _model(name)
    args = mutate(*_dit_args(m))
    with torch.no_grad(), time_limit(60, name):
        if expect is not None:
            with pytest.raises(expect[0], match=expect[1]):
                m(*args)
            return
        out = m(*args)
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert o.shape == args[0].shape
        if case == "nan-x":
            assert torch.isnan(o[0]).any()  # the poisoned sample propagates NaN ...
            assert torch.isfinite(o[1]).all()  # ... and leaves the other sample alone
        else:
            assert torch.isfinite(o).all()


_DEC_CASES = [
    ("rank", lambda z: z[0], (ValueError, "'tokens'")),
    ("size", lambda z: z[:, :-1], (ValueError, "'tokens'")),
    ("int", lambda z: z.long(), (ValueError, "'tokens'")),
    ("float64-vs-fp32-model", lambda z: z.double(), (TypeError, "'tokens'")),
    ("other-device", lambda z: z.to("meta"), (ValueError, "'tokens'")),
    ("B=0", lambda z: z[:0], None),
    ("expanded", lambda z: z[:1].expand_as(z), None),
]


@pytest.mark.parametrize("case,mutate,expect", _DEC_CASES, ids=[c[0] for c in _DEC_CASES])
def test_decoder_entry_point(case, mutate, expect):
    m = _model("decoder-tiny")
    z = mutate(torch.randn(2, m.num_patches, m.latent_dim))
    with torch.no_grad():
        if expect is not None:
            with pytest.raises((expect[0], TypeError, ValueError), match=expect[1]):
                m(z)
            return
        out = m(z)
    assert out.shape[0] == z.shape[0] and torch.isfinite(out).all()


_ENC_CASES = [
    ("rank", lambda im: im[0], (ValueError, "'images'")),
    ("channels", lambda im: im[:, :2], (ValueError, "'images'")),
    ("uint8", lambda im: (im * 255).to(torch.uint8), (TypeError, "'images'")),
    ("complex", lambda im: torch.complex(im, im), (TypeError, "'images'")),
    ("B=0", lambda im: im[:0], None),
    ("other-resolution", lambda im: im[..., :42, :42], None),
]


@pytest.mark.parametrize("case,mutate,expect", _ENC_CASES, ids=[c[0] for c in _ENC_CASES])
def test_encoder_entry_point(case, mutate, expect):
    m = _model("dinov2-tiny-reg")
    im = mutate(torch.rand(2, 3, 56, 56))
    with torch.no_grad():
        if expect is not None:
            with pytest.raises(expect[0], match=expect[1]):
                m(im)
            return
        out = m(im)
    assert out[0].shape[0] == im.shape[0] and torch.isfinite(out[0]).all()


def test_sampler_entry_point():
    from raekern.sampling import CFG, rae_v1_grid, sample
    m = _model("ditdh-tiny")
    shape = (2, m.in_channels, m.input_size, m.input_size)
    grid = rae_v1_grid(3, latent_shape=shape[1:])
    lab = torch.tensor([1, 2])
    with torch.no_grad():
        with pytest.raises(TypeError, match="'labels'"):
            sample(m, shape, lab.float(), CFG(1.5), grid, progress=False)
        with pytest.raises(ValueError, match="'labels'"):
            sample(m, shape, torch.tensor([1, 2, 3]), CFG(1.5), grid, progress=False)
        with pytest.raises(TypeError, match="'noise'"):
            sample(m, torch.zeros(shape, dtype=torch.long), lab, CFG(1.5), grid, progress=False)
        with pytest.raises(ValueError, match="'x'|'y'|'labels'"):  # noise follows the labels' device
            sample(m, shape, lab.to("meta"), CFG(1.5), grid, progress=False)
        empty = sample(m, (0,) + shape[1:], lab[:0], CFG(1.5), grid, progress=False)
        assert empty.shape == (0,) + shape[1:]
        noise = torch.randn(shape)
        noise[0, 0, 0, 0] = float("nan")
        with time_limit(60, "sampling from NaN noise"):
            out = sample(m, noise, lab, CFG(1.5), grid, progress=False)
        assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()
