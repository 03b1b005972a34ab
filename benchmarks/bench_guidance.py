"""pytest-benchmark suite of the guidance family (guidance_step, gfcg_select) on RAE / RAEv2
latents (cases: raekern/bench/guidance.py).

    python -m pytest benchmarks/bench_guidance.py                                        # timings
    RAEKERN_BENCH_QUICK=1 python -m pytest benchmarks/bench_guidance.py --benchmark-disable   # smoke
RAEKERN_BENCH_DEVICE=cuda runs it on a GPU. Shared machinery: raekern/bench/pytest_suite.py.
"""
import pytest

from raekern.bench.pytest_suite import params, run_case


@pytest.mark.parametrize("case,impl", params("guidance"))
def test_guidance(benchmark, case, impl):
    run_case(benchmark, case, impl)
