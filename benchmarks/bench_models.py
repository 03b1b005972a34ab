"""pytest-benchmark suite of whole models: DiT-DH-S forward and training step, raekern vs its torch
backend (eager and compiled) (cases: raekern/bench/models.py).

    python -m pytest benchmarks/bench_models.py                                        # timings
    RAEKERN_BENCH_QUICK=1 python -m pytest benchmarks/bench_models.py --benchmark-disable   # smoke
RAEKERN_BENCH_DEVICE=cuda runs it on a GPU. Shared machinery: raekern/bench/pytest_suite.py.
"""
import pytest

from raekern.bench.pytest_suite import params, run_case


@pytest.mark.parametrize("case,impl", params("models"))
def test_models(benchmark, case, impl):
    run_case(benchmark, case, impl, rounds=3)
