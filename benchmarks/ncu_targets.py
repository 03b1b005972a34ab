"""One call each of the raekern CUDA kernels furthest from their targets on the first H200 run
(2026-11-30), for Nsight Compute: benchmarks/gpu_check.sh runs this under
`ncu --clock-control none --section SpeedOfLight --section Occupancy ...` so the next change to these
kernels starts from their achieved DRAM throughput, occupancy and limiter instead of a guess.

    python benchmarks/ncu_targets.py [cpu]      # each op once, after one warm-up call (cpu: a smoke run)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# The checkout's raekern (where gpu_check.sh and CI put the built library), not only an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raekern import ops as R  # noqa: E402


def main(dev: str = "cuda") -> None:
    dt = torch.bfloat16
    cuda = dev == "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g)

    x, w = rnd(8, 1024, 1024), torch.ones(1024, device=dev)
    ada = rnd(8, 1, 6 * 1024)
    shift, scale = ada[..., :1024], ada[..., 1024:2048]
    lat = [rnd(32, 768, 16, 16) for _ in range(3)]
    t = torch.linspace(0.9, 0.5, 32, device=dev)
    layers = [rnd(8, 261, 1024) for _ in range(7)]
    experts = [rnd(8, 256, 768).requires_grad_() for _ in range(12)]
    logits, base = rnd(8, 256, 12), rnd(8, 256, 768)

    xr = x.detach().clone().requires_grad_()
    q, k, v = (rnd(1, 1024, 16, 64) for _ in range(3))
    os.environ["RAEKERN_CUDA_ATTENTION"] = "1"  # raekern's kernel even for a plain call (default: SDPA)
    calls = {
        "rms_norm fwd": lambda: R.rms_norm(x, w),
        "norm_modulate per-sample bwd": lambda: torch.autograd.grad(
            R.norm_modulate(xr, shift, scale, kind="rms", weight=w), xr, x)[0],
        "guidance cfg euler": lambda: R.guidance_step(lat[0], [lat[1], lat[2]], t, terms=[(0, 1)], weights=[0.5],
                                                      base=0, solver="euler", t_next=t - 0.02),
        "layer_stack_fuse fwd": lambda: R.layer_stack_fuse(layers, skip_tokens=5),
        "depth_route bwd": lambda: torch.autograd.grad(
            R.depth_route(experts, logits, base, gamma=w[:768].clone()), experts, base)[0],
        # the mma.sync forward with two m-tiles per warp: shared-memory vs tensor-pipe throughput
        "attention fwd (1,16,1024,64)": lambda: R.attention(q, k, v),
    }
    for name, fn in calls.items():
        fn()  # warm-up: ncu profiles the first launches its name filter matches, so each kernel twice
        if cuda:
            torch.cuda.synchronize()
        fn()
        if cuda:
            torch.cuda.synchronize()
        print(f"ran {name}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:2])
