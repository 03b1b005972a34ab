"""pytest-benchmark suite of the fusion family: every case of raekern.bench.fusion × implementation.

    python -m pytest benchmarks/bench_fusion.py                       # timings (GB/s in extra_info)
    python -m pytest benchmarks/bench_fusion.py --benchmark-disable   # quick smoke: each impl runs once
RAEKERN_BENCH_QUICK=1 uses small shapes. The copy case measures the machine's copy bandwidth in the
same run, the denominator of the "fraction of copy bandwidth" figures.
"""
import os

import pytest
import torch

from raekern.bench.registry import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("RAEKERN_BENCH_QUICK", "0") == "1"
CASES = cases("fusion", DEVICE, QUICK)
PARAMS = [pytest.param(c, impl, id=f"{c.name}|{c.shape}|{str(c.dtype)[6:]}|{impl}")
          for c in CASES for impl in c.impls]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case,impl", PARAMS)
def test_fusion(benchmark, case, impl):
    fn = case.impls[impl]
    fn()  # warm-up (compiles the torch.compile baselines)

    def run():
        fn()
        _sync()

    benchmark.extra_info.update(case=case.id, impl=impl, bytes=case.bytes)
    benchmark(run)
    if benchmark.stats is not None and case.bytes:
        benchmark.extra_info["GB/s"] = case.bytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_bandwidth(benchmark, dtype):
    n = (1 << 22) if QUICK else (1 << 26)
    src = torch.randn(n, device=DEVICE).to(dtype)
    dst = torch.empty_like(src)
    benchmark.extra_info["bytes"] = 2 * src.numel() * src.element_size()

    def run():
        dst.copy_(src)
        _sync()

    benchmark(run)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = benchmark.extra_info["bytes"] / benchmark.stats.stats.median / 1e9
