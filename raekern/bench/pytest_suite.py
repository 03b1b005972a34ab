"""What every ``benchmarks/bench_<family>.py`` shares: a family's registered cases × implementations
as pytest parameters, and one timed call per parameter under pytest-benchmark, grouped by case so
that one table compares raekern with its baselines (eager, torch.compile, SDPA) measured in the
same run. Memory-bound cases record GB/s and the fraction of the copy bandwidth measured in that
run; compute-bound cases record GFLOP/s.

Environment: ``RAEKERN_BENCH_QUICK=1`` picks the quick shapes (CI's smoke run, with
``--benchmark-disable``); ``RAEKERN_BENCH_DEVICE`` the device (default: cuda when available).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import pytest
import torch

from raekern.bench.machine import measure_copy_bandwidth
from raekern.bench.registry import Case, cases


def device() -> str:
    return os.environ.get("RAEKERN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def quick() -> bool:
    return os.environ.get("RAEKERN_BENCH_QUICK", "0") == "1"


def params(family: str, quick_shapes: Optional[bool] = None) -> list:
    """``pytest.param(case, impl)`` for every implementation of every case of ``family``."""
    q = quick() if quick_shapes is None else quick_shapes
    return [pytest.param(c, impl, id=f"{c.id}/{impl}".replace(" ", "_"))
            for c in cases(family, device(), q) for impl in c.impls]


@functools.lru_cache(maxsize=None)
def _copy_gbps(dev: str) -> float:
    return measure_copy_bandwidth(dev)


def run_case(benchmark, case: Case, impl: str, rounds: Optional[int] = None):
    """Warm up (inputs, torch.compile), then time ``case.impls[impl]``; returns its last output.
    ``rounds`` switches to a fixed number of rounds for the slow cases (models, sampling)."""
    fn, dev = case.impls[impl], device()

    def run():
        out = fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    try:
        run()
    except Exception as e:  # noqa: BLE001 - a baseline dynamo cannot trace is reported, not fatal
        if impl.endswith("compile"):
            pytest.skip(f"{impl} does not run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise
    benchmark.group = case.id
    benchmark.extra_info.update(case=case.name, shape=case.shape, dtype=str(case.dtype), impl=impl)
    if rounds:
        out = benchmark.pedantic(run, rounds=1 if quick() else rounds, iterations=1)
    else:
        out = benchmark(run)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:  # --benchmark-disable
        return out
    if case.bytes:
        gbps = case.bytes / stats.median / 1e9
        copy = _copy_gbps(dev)
        benchmark.extra_info.update(gbps=round(gbps, 2), copy_gbps=round(copy, 2),
                                    fraction_of_copy=round(gbps / copy, 3))
    if case.flops:
        benchmark.extra_info["gflops"] = round(case.flops / stats.median / 1e9, 1)
    return out
