"""pytest-benchmark suite of the norm family (rms_norm, layer_norm, norm_modulate, gated residuals)
on RAE / DiT-DH shapes (cases: raekern/bench/norm.py).

    python -m pytest benchmarks/bench_norm.py                                        # timings
    RAEKERN_BENCH_QUICK=1 python -m pytest benchmarks/bench_norm.py --benchmark-disable   # smoke
RAEKERN_BENCH_DEVICE=cuda runs it on a GPU. Shared machinery: raekern/bench/pytest_suite.py.
"""
import pytest

from raekern.bench.pytest_suite import params, run_case


@pytest.mark.parametrize("case,impl", params("norm"))
def test_norm(benchmark, case, impl):
    run_case(benchmark, case, impl)
