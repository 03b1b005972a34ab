"""pytest-benchmark suite of the mlp family (SwiGLU): raekern vs eager PyTorch vs torch.compile of
the same math on DiT-DH shapes (cases: raekern/bench/mlp.py).

    python -m pytest benchmarks/bench_mlp.py --benchmark-group-by=group   # full sweep
    python -m pytest benchmarks/bench_mlp.py --benchmark-disable -q       # quick smoke (one shape)

Each result records GB/s and its fraction of the copy bandwidth measured in the same run
(``extra_info``); results of one case share a group, so the table compares the implementations.
RAEKERN_BENCH_QUICK=1 restricts a timed run to the quick shapes; RAEKERN_BENCH_DEVICE picks the device
(default: cuda when available).
"""
from __future__ import annotations

import os

import pytest
import torch

from raekern.bench import registry
from raekern.bench.machine import measure_copy_bandwidth

DEVICE = os.environ.get("RAEKERN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case_impl" not in metafunc.fixturenames:
        return
    quick = bool(metafunc.config.getoption("benchmark_disable", False)) or \
        os.environ.get("RAEKERN_BENCH_QUICK") == "1"
    params, ids = [], []
    for case in registry.cases("mlp", DEVICE, quick=quick):
        for impl in case.impls:
            params.append((case, impl))
            ids.append(f"{case.id}/{impl}".replace(" ", "_"))
    metafunc.parametrize("case_impl", params, ids=ids)


def _timed(fn):
    if DEVICE.startswith("cuda"):
        def run():
            fn()
            torch.cuda.synchronize()
        return run
    return fn


def test_mlp(benchmark, case_impl):
    case, impl = case_impl
    fn = _timed(case.impls[impl])
    fn()  # build inputs, compile, warm caches
    benchmark.group = case.id
    benchmark.extra_info.update(case=case.name, shape=case.shape, dtype=str(case.dtype), impl=impl)
    benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is None or case.bytes is None:  # --benchmark-disable
        return
    seconds = stats.stats.median
    gbps = case.bytes / seconds / 1e9
    copy = measure_copy_bandwidth(DEVICE)
    benchmark.extra_info.update(gbps=round(gbps, 2), copy_gbps=round(copy, 2),
                                fraction_of_copy=round(gbps / copy, 3))
