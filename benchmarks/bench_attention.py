"""pytest-benchmark suite for the attention family: every registered case × implementation.

    python -m pytest benchmarks/bench_attention.py --benchmark-only          # timings
    python -m pytest benchmarks/bench_attention.py --benchmark-disable -q    # quick smoke
Set RAEKERN_BENCH_QUICK=1 for one shape per case; RAEKERN_BENCH_DEVICE=cuda on a GPU.
"""
import os

import pytest
import torch

import raekern  # noqa: F401
from raekern.bench.registry import cases

DEVICE = os.environ.get("RAEKERN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("RAEKERN_BENCH_QUICK", "0") == "1"
_CASES = cases("attention", DEVICE, QUICK)
PARAMS = [pytest.param(c, impl, id=f"{c.id}/{impl}") for c in _CASES for impl in c.impls]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_attention(benchmark, case, impl):
    fn = case.impls[impl]
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    benchmark.extra_info.update(flops=case.flops, impl=impl, shape=case.shape, dtype=str(case.dtype))
    benchmark.pedantic(run, rounds=3 if QUICK else 10, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and case.flops:
        benchmark.extra_info["gflops"] = case.flops / stats.stats.min / 1e9
