"""Property-based tests (issue #11.2): every op against its reference over random shapes, strides
and dtypes within the documented limits (hypothesis; bounded example counts, small shapes)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _reliability_helpers import FLOAT_DTYPES, SPECS, close, first

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout (what a caller's views look like)."""
    if kind == "contiguous" or t.dim() == 0 or t.numel() == 0:
        return t
    if kind == "lastdim_stride2" and t.dtype.is_floating_point:
        return torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0]  # NaN gaps: a stray read shows
    if kind == "permuted" and t.dim() == 2:
        return t.t().contiguous().t()
    if kind == "permuted" and t.dim() > 2:
        return t.transpose(0, -2).contiguous().transpose(0, -2)
    if kind == "expanded" and t.dim() >= 2:
        return t[:1].expand_as(t)
    if kind == "offset":
        return torch.cat([torch.zeros(3, dtype=t.dtype), t.reshape(-1)])[3:].view(t.shape)  # storage offset 3
    return t


@st.composite
def op_inputs(draw, spec):
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    b = draw(st.integers(1, 3))
    n = draw(st.integers(spec.min_n, 19))
    d = draw(st.integers(1, 5)) * 8 if spec.d_multiple == 8 else draw(st.integers(spec.min_d, 40))
    seed = draw(st.integers(0, 2 ** 16))
    kinds = ("contiguous", "lastdim_stride2", "permuted", "expanded", "offset")
    torch.manual_seed(seed)
    args = spec.make(b, n, d, dtype)
    out = {}
    for k, v in args.items():
        kind = draw(st.sampled_from(kinds))
        if isinstance(v, list):
            out[k] = [_layout(t, kind) for t in v]
        elif isinstance(v, torch.Tensor):
            out[k] = _layout(v, kind)
        else:
            out[k] = v
    return dtype, out


def _property(spec):
    @SETTINGS
    @given(op_inputs(spec))
    def check(case):
        dtype, args = case
        got = spec.call(**args)
        want = spec.ref(**args)
        close(got, want, dtype, tol=spec.tol, what=f"{spec.name} {dtype}")
        outs = got if isinstance(got, tuple) else (got,)
        for o in outs:
            if isinstance(o, torch.Tensor) and o.numel():
                assert o.is_contiguous() or o.dim() < 2, f"{spec.name}: outputs are documented contiguous"
                assert first(next(iter(args.values()))).device == o.device
    return check


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_op_matches_reference_on_random_inputs(spec):
    _property(spec)()
