"""Facts about the machine a benchmark runs on, measured in the same run as the cases."""
from __future__ import annotations

import time

import torch

_cache: dict[tuple[str, int], float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: str | torch.device = "cpu", nbytes: int | None = None,
                           repeats: int = 10, cached: bool = True) -> float:
    """Copy bandwidth in GB/s (1e9 bytes/s) counting read + write: ``dst.copy_(src)`` of a buffer far
    larger than the last-level cache (256 MiB on CPU, 1 GiB on GPU), best of ``repeats``.

    Memory-bound kernels report their achieved GB/s as a fraction of this number. The result is
    cached per (device, size) for the process; pass ``cached=False`` to measure again.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    key = (str(device), nbytes)
    if cached and key in _cache:
        return _cache[key]
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    gbps = 2 * n * 4 / best / 1e9
    _cache[key] = gbps
    return gbps
