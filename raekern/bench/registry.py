"""Benchmark cases, one module per op family (raekern/bench/<family>.py), shared by
`raekern bench` and the pytest-benchmark suites in benchmarks/.

A family module registers a function returning its cases for a device:

    @register("norm")
    def norm_cases(device: str, quick: bool) -> list[Case]: ...

Each Case holds several implementations of the same math ("raekern", "eager", "compile", "sdpa", ...)
as zero-argument callables, plus the bytes that must move (memory-bound ops) or the flops (attention),
so the runner can report GB/s or TFLOP/s, the fraction of the machine's copy bandwidth or peak, and
ratios between implementations measured in the same run.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

FAMILY_MODULES = ("norm", "fusion", "attention", "guidance", "mlp", "models", "sampling")

_REGISTRY: dict[str, Callable[[str, bool], list["Case"]]] = {}


@dataclass
class Case:
    family: str
    name: str  # e.g. "rms_norm fwd"
    shape: str  # human-readable, e.g. "B·N=4096 D=1152"
    dtype: torch.dtype
    impls: dict[str, Callable[[], object]]
    bytes: int | None = None  # bytes that must move (memory-bound ops)
    flops: int | None = None  # useful flops (compute-bound ops)
    baseline_of_interest: tuple[str, ...] = ("eager", "compile")
    notes: str = ""
    extra: dict = field(default_factory=dict)
    # (rounds, warm-up calls, repeats) for cases of seconds per call (whole sampling runs); None: the
    # runner's defaults.
    timing: tuple[int, int, int] | None = None
    # On a GPU, time device work (CUDA-graph replay, L2 flushed; machine.time_cuda_graph) rather than
    # the host loop. Off for whole models and samplers: their host overhead is part of what is
    # compared, and a sampler that captures its own graphs cannot be captured.
    cuda_graph: bool = True

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}/{self.shape}/{str(self.dtype).replace('torch.', '')}"


def with_switch(impls: dict, device: str, name: str, var: str, value: str) -> dict:
    """On CUDA, impls[name] = the "raekern" implementation with switch `var`=`value` (a measured kernel
    kept beside the default one, timed in the same run); impls unchanged elsewhere. Returns impls."""
    if device.startswith("cuda"):
        run = impls["raekern"]
        impls[name] = lambda: with_env(var, value, run)
    return impls


def with_env(var: str, value: str, fn: Callable[[], object]) -> object:
    """fn() with environment variable `var` set to `value` (restored after): how a case times a kernel
    that the library would not pick by default, since raekern reads these switches at each launch
    (a CUDA graph captures what ran)."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[var]
        else:
            os.environ[var] = old


def register(family: str):
    def deco(fn):
        _REGISTRY[family] = fn
        return fn

    return deco


def _import_all() -> None:
    for fam in FAMILY_MODULES:
        try:
            importlib.import_module(f"raekern.bench.{fam}")
        except ModuleNotFoundError as e:
            if e.name != f"raekern.bench.{fam}":
                raise


def families() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def cases(family: str, device: str = "cpu", quick: bool = False) -> list[Case]:
    _import_all()
    if family not in _REGISTRY:
        raise ValueError(f"raekern bench: unknown family {family!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[family](device, quick)


def compiled(fn: Callable) -> Callable:
    """torch.compile of the same math, the baseline every fused op must beat."""
    return torch.compile(fn, fullgraph=True, dynamic=False)
