"""pytest-benchmark suite of the sampler: one guided sampling step of a small DiT-DH, raekern vs the
same step in plain PyTorch (cases: raekern/bench/sampling.py; on the CPU always the quick shapes).

    python -m pytest benchmarks/bench_sampling.py                       # timings
    python -m pytest benchmarks/bench_sampling.py --benchmark-disable   # smoke: each impl once
Shared machinery: raekern/bench/pytest_suite.py.
"""
import pytest
import torch

from raekern.bench.pytest_suite import device, params, run_case
from raekern.bench.registry import cases

CPU = device() == "cpu"


@pytest.mark.parametrize("case,impl", params("sampling", quick_shapes=True if CPU else None))
def test_sampling(benchmark, case, impl):
    out = run_case(benchmark, case, impl, rounds=3 if CPU else None)
    if out is not None:
        assert torch.isfinite(out.float()).all()


def test_raekern_matches_eager():
    """Both implementations compute the same thing: elementwise in fp32 on the CPU; on CUDA (bf16
    state, where rounding differs between a fused and an unfused update) by relative L2 error."""
    for c in cases("sampling", device(), quick=CPU):
        a, b = c.impls["raekern"]().float(), c.impls["eager"]().float()
        if CPU:
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
        else:
            assert ((a - b).norm() / b.norm()).item() < 0.05, c.id
