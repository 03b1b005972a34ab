"""pytest-benchmark suite of the attention family: raekern vs SDPA (and eager / torch.compile with
unfused QK-norm and RoPE) (cases: raekern/bench/attention.py).

    python -m pytest benchmarks/bench_attention.py                                        # timings
    RAEKERN_BENCH_QUICK=1 python -m pytest benchmarks/bench_attention.py --benchmark-disable   # smoke
RAEKERN_BENCH_DEVICE=cuda runs it on a GPU. Shared machinery: raekern/bench/pytest_suite.py.
"""
import pytest

from raekern.bench.pytest_suite import params, run_case


@pytest.mark.parametrize("case,impl", params("attention"))
def test_attention(benchmark, case, impl):
    run_case(benchmark, case, impl)
