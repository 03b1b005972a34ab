"""Benchmark cases for the sampler: one guided sampling step of a DiT-DH, raekern's sampler against
the same step as the released RAE v1 code does it in plain PyTorch.

What differs between the two implementations of the same math:
- "raekern": ``Sampler.step`` — branches batched per model (AutoGuidance: main and weak model each on
  B rows), the guidance combine and the Euler update in one fused ``guidance_step``; the DiT runs on
  raekern's ops when they are built (``raekern.models`` backend "raekern"), else on PyTorch.
- "eager": RAE v1's ``forward_with_autoguidance`` / ``forward_with_cfg`` + torchdiffeq Euler as
  transcribed in ``raekern.sampling.reference``: the batch doubled as ``[x; x]`` with ``[y; null]``
  (for AutoGuidance too, both models then run on 2B rows), ``torch.where`` interval masks, separate
  elementwise update, models on plain PyTorch.

GPU: ``ditdh-xl`` with ``ditdh-s`` at B = 64 in bf16, one step (the full 49-step pipeline is
``benchmarks/bench_sampling.py::test_pipeline`` on CUDA). First measured on an H200 on 2026-11-30.
"""
from __future__ import annotations

import torch

from raekern.bench.registry import Case, register

FAMILY = "sampling"


def _models(device: str, quick: bool, dtype: torch.dtype):
    """(main_raekern, weak_raekern, main_torch, weak_torch, latent_shape): same weights, two backends."""
    from raekern import models as M

    if device == "cuda" and not quick:
        main_cfg, weak_cfg, kw = "ditdh-xl", "ditdh-s", {}
    else:  # small DiT-DH for the CPU: released structure, reduced width/depth
        main_cfg, weak_cfg = "ditdh-s", "ditdh-s"
        kw = dict(input_size=8, in_channels=64, hidden_size=(128, 256), num_heads=(2, 4))
    backend = "raekern" if M.raekern_backend_available() else "torch"
    out = []
    for name, depth, seed in ((main_cfg, None if device == "cuda" and not quick else (4, 2), 0),
                              (weak_cfg, None if device == "cuda" and not quick else (2, 2), 1)):
        torch.manual_seed(seed)
        over = dict(kw, **({} if depth is None else {"depth": depth}))
        ref = M.build(name, device=device, dtype=dtype, backend="torch", **over).eval()
        fast = M.build(name, device=device, dtype=dtype, backend=backend, **over).eval()
        fast.load_state_dict(ref.state_dict())
        out.append((fast, ref))
    m = out[0][1]
    shape = (m.in_channels, m.input_size, m.input_size)
    return out[0][0], out[1][0], out[0][1], out[1][1], shape, backend


def _eager_step(main, weak, policy_name: str, scale: float, x, y, t: float, t_next: float):
    from raekern.sampling.reference import rae_v1_velocity_fn

    f = rae_v1_velocity_fn(main, cfg_scale=scale, method=policy_name, weak_model=weak)
    null = torch.full_like(y, 1000)

    def step():
        with torch.no_grad():
            xx = torch.cat([x, x], 0)
            tt = torch.ones(xx.shape[0], device=x.device) * t
            v = f(xx, tt, torch.cat([y, null], 0))
            return (xx + (t_next - t) * v)[: x.shape[0]]
    return step


@register(FAMILY)
def sampling_cases(device: str, quick: bool) -> list[Case]:
    from raekern.sampling import guidance as G
    from raekern.sampling.grids import rae_v1_grid
    from raekern.sampling.sampler import Sampler, make_noise

    # CPU: fp32 (the target) and bf16 (what an AMX CPU samples in); GPU: bf16.
    dtypes = (torch.bfloat16,) if device == "cuda" else (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    B = 64 if device == "cuda" and not quick else 4
    cases = []
    for dtype in dtypes:
        main, weak, main_t, weak_t, shape, backend = _models(device, quick, dtype)
        grid = rae_v1_grid(50, latent_shape=shape)
        k = 10
        t, t_next = grid.times()[k], grid.times()[k + 1]
        x = make_noise((B, *shape), 0, device=device, dtype=dtype)
        y = torch.arange(B, device=device) % 1000
        for name, policy, models, scale in (("autoguidance", G.AutoGuidance(1.42), {"weak": weak}, 1.42),
                                            ("cfg", G.CFG(1.5), {}, 1.5)):
            s = Sampler(main, policy, grid, models=models, progress=False)

            def fast(s=s, x=x, y=y, k=k):
                return s.step(x, y, k)

            cases.append(Case(
                FAMILY, f"guided step {name}", f"B={B} latent={'x'.join(map(str, shape))}", dtype,
                {"raekern": fast, "eager": _eager_step(main_t, weak_t, name, scale, x, y, t, t_next)},
                baseline_of_interest=("eager",),
                notes=f"DiT-DH backend {backend!r}; eager = RAE v1's released step in plain PyTorch",
                cuda_graph=False))
    if device == "cuda" and not quick:
        # The GPU target: the whole 49-step AutoGuidance sampling, ours (CUDA graphs) vs the released loop.
        from raekern.sampling.reference import rae_v1_reference_sample

        s = Sampler(main, G.AutoGuidance(1.42), grid, models={"weak": weak}, cuda_graph=True, progress=False)
        cases.append(Case(
            FAMILY, "sampling 49 steps autoguidance", f"B={B} latent={'x'.join(map(str, shape))}", dtype,
            {"raekern": lambda: s(x, y),
             "eager": lambda: rae_v1_reference_sample(main_t, x, y, num_steps=50, cfg_scale=1.42,
                                                      method="autoguidance", weak_model=weak_t)},
            baseline_of_interest=("eager",), notes="target: raekern >= 2x eager",
            timing=(1, 1, 1), cuda_graph=False))  # seconds per call: warm-up (graph capture), one probe, one timed run
    return cases
