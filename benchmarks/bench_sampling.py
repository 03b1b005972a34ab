"""pytest-benchmark suite for the sampler (cases from raekern.bench.sampling).

    python -m pytest benchmarks/bench_sampling.py                       # timings
    python -m pytest benchmarks/bench_sampling.py --benchmark-disable   # quick smoke: each impl once

Compare implementations of one case with ``--benchmark-group-by=param:case``.
"""
import pytest
import torch

from raekern.bench import sampling as S

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_CASES = S.sampling_cases(DEVICE, quick=DEVICE == "cpu")
PARAMS = [(c, impl) for c in _CASES for impl in c.impls]


@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c.name}-{i}" for c, i in PARAMS])
def test_sampling(benchmark, case, impl):
    fn = case.impls[impl]
    benchmark.group = case.id
    benchmark.extra_info.update(shape=case.shape, notes=case.notes)
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1) if DEVICE == "cpu" else benchmark(run)
    if out is not None:
        assert torch.isfinite(out.float()).all()


def test_raekern_step_matches_eager():
    """Both implementations compute the same step (fp32 on CPU, bf16 tolerance on CUDA)."""
    tol = 2e-3 if DEVICE == "cpu" else 5e-2
    for c in _CASES:
        torch.testing.assert_close(c.impls["raekern"]().float(), c.impls["eager"]().float(), rtol=tol, atol=tol)
