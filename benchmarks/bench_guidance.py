"""pytest-benchmark suite of the guidance family (cases in raekern/bench/guidance.py).

    pytest benchmarks/bench_guidance.py                       # full cases (B = 32)
    RAEKERN_BENCH_QUICK=1 pytest benchmarks/bench_guidance.py --benchmark-disable   # smoke
"""
import os

import pytest

from raekern.bench import cases

QUICK = os.environ.get("RAEKERN_BENCH_QUICK", "0") == "1"
DEVICE = os.environ.get("RAEKERN_BENCH_DEVICE", "cpu")
CASES = cases("guidance", DEVICE, quick=QUICK)


@pytest.mark.parametrize("impl", ["raekern", "eager", "compile"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_guidance(benchmark, case, impl):
    fn = case.impls[impl]
    fn()  # warm-up (torch.compile compiles here)
    benchmark.extra_info.update(bytes=case.bytes, shape=case.shape, impl=impl)
    benchmark(fn)
