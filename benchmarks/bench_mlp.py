"""pytest-benchmark suite of the mlp family (SwiGLU) on DiT-DH hidden sizes (cases:
raekern/bench/mlp.py).

    python -m pytest benchmarks/bench_mlp.py                                        # timings
    RAEKERN_BENCH_QUICK=1 python -m pytest benchmarks/bench_mlp.py --benchmark-disable   # smoke
RAEKERN_BENCH_DEVICE=cuda runs it on a GPU. Shared machinery: raekern/bench/pytest_suite.py.
"""
import pytest

from raekern.bench.pytest_suite import params, run_case


@pytest.mark.parametrize("case,impl", params("mlp"))
def test_mlp(benchmark, case, impl):
    run_case(benchmark, case, impl)
