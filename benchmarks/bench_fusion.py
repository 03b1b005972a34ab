"""pytest-benchmark suite of the fusion family (layer_stack_fuse, depth_route, latent_normalize) on
RAE / RAEv2 / DRoRAE shapes (cases: raekern/bench/fusion.py).

    python -m pytest benchmarks/bench_fusion.py                                        # timings
    RAEKERN_BENCH_QUICK=1 python -m pytest benchmarks/bench_fusion.py --benchmark-disable   # smoke
RAEKERN_BENCH_DEVICE=cuda runs it on a GPU. Shared machinery: raekern/bench/pytest_suite.py.
"""
import pytest

from raekern.bench.pytest_suite import params, run_case


@pytest.mark.parametrize("case,impl", params("fusion"))
def test_fusion(benchmark, case, impl):
    run_case(benchmark, case, impl)
