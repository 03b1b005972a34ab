"""pytest-benchmark suite of the models family (cases from raekern/bench/models.py).

    python -m pytest benchmarks/bench_models.py                      # full (DiT-DH-S at B=8)
    RAEKERN_BENCH_QUICK=1 python -m pytest benchmarks/bench_models.py --benchmark-disable   # smoke
Set RAEKERN_BENCH_DEVICE=cuda to run on a GPU.
"""
import os

import pytest

from raekern.bench.registry import cases

DEVICE = os.environ.get("RAEKERN_BENCH_DEVICE", "cpu")
QUICK = os.environ.get("RAEKERN_BENCH_QUICK", "0") == "1"
CASES = cases("models", DEVICE, quick=QUICK)
PARAMS = [pytest.param(c, impl, id=f"{c.name}|{c.shape}|{impl}") for c in CASES for impl in c.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_models(benchmark, case, impl):
    fn = case.impls[impl]
    try:
        fn()  # warm-up (compilation, allocator)
    except Exception as e:  # noqa: BLE001 - e.g. an op dynamo cannot trace yet
        if impl.endswith("compile"):
            pytest.skip(f"{impl} does not run: {type(e).__name__}: {str(e).splitlines()[0]}")
        raise
    benchmark.extra_info.update(case=case.id, impl=impl, flops=case.flops)
    benchmark.pedantic(fn, rounds=3 if not QUICK else 1, iterations=1)
    if case.flops and benchmark.stats is not None:
        benchmark.extra_info["gflops"] = case.flops / benchmark.stats.stats.mean / 1e9
