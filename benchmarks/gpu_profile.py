"""Which kernels each raekern op launches, and the device time of each: the breakdown a bandwidth
number alone cannot give (the first H200 run showed the memory-bound ops at 13-35 % of copy bandwidth
without saying whether the main kernel, a small solve, or a conversion in the Python wrapper holds the
time). Run by benchmarks/gpu_check.sh after the benchmarks; on a CPU it lists the ATen/raekern ops.

    python benchmarks/gpu_profile.py [--device cuda] [--family guidance --family norm ...] [--calls 5]

One table per case (the first case of each distinct op name at the family's full shapes): every
kernel (CPU: op) seen while the "raekern" implementation runs `--calls` times, with calls per op call
and µs per op call. Timing here is the profiler's (no CUDA graph, no L2 flush): compare rows within a
case, not with the bench tables.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# The checkout's raekern (where gpu_check.sh and CI put the built library), not only an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raekern.bench import registry  # noqa: E402

DEFAULT_FAMILIES = ("guidance", "fusion", "norm", "mlp", "attention")


def _device_us(evt, device: str) -> float:
    if device == "cuda":
        return getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
    return evt.self_cpu_time_total


def profile_case(case: registry.Case, device: str, calls: int) -> list[tuple[str, float, float]]:
    """[(kernel or op name, launches per call, µs per call)], largest time first."""
    fn = case.impls["raekern"]
    for _ in range(3):  # warm-up: allocator, autotuning, lazy module loads
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        on_device = str(getattr(evt, "device_type", "")).endswith("CUDA")
        if (device == "cuda") != on_device:
            continue
        us = _device_us(evt, device)
        if us > 0:
            rows.append((evt.key, evt.count / calls, us / calls))
    return sorted(rows, key=lambda r: -r[2])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--family", action="append", help=f"default: {' '.join(DEFAULT_FAMILIES)}")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="the families' small shapes")
    args = ap.parse_args(argv)
    failed = 0
    for family in args.family or DEFAULT_FAMILIES:
        seen = set()
        for case in registry.cases(family, args.device, args.quick):
            if case.name in seen or "raekern" not in case.impls:
                continue
            seen.add(case.name)
            try:
                rows = profile_case(case, args.device, args.calls)
            except Exception as e:  # one op that cannot run is reported, the others still profiled
                print(f"\n{case.family} / {case.name} {case.shape} {case.dtype}: ERROR {type(e).__name__}: {e}")
                failed += 1
                continue
            total = sum(r[2] for r in rows)
            print(f"\n{case.family} / {case.name}  {case.shape}  {str(case.dtype).replace('torch.', '')}"
                  f"  ({total:.1f} us per call over {len(rows)} {'kernels' if args.device == 'cuda' else 'ops'})")
            for name, per_call, us in rows[:12]:
                print(f"  {us:9.1f} us  {100 * us / total:5.1f} %  x{per_call:<5.2g} {name[:110]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
