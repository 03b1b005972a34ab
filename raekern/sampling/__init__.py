"""Sampling: time grids, guidance policies and samplers (DESIGN §4.2).

    from raekern.sampling import sample, CFG, rae_v1_grid
    z = sample(dit, (B, 768, 16, 16), labels, CFG(1.5), rae_v1_grid(), seed=0)

Submodules: ``grids`` (time grids and the shift), ``guidance`` (policies), ``sampler`` (the loop),
``reference`` (plain-PyTorch transcriptions of the released samplers), ``pipelines`` (labels →
images), ``distributed`` (sharded torchrun sampling), ``cli`` (`raekern sample`).
"""
from raekern.sampling.grids import TimeGrid, make_grid, rae_v1_grid, raev2_grid, shift_alpha, time_shift, uniform_grid
from raekern.sampling.guidance import (APG, CFG, GFCG, AutoGuidance, Branch, CFGZeroStar, GuidancePolicy,
                                       GuidanceRescale, InternalGuidance, NoGuidance)
from raekern.sampling.sampler import Sampler, indexed_noise, make_noise, sample

__all__ = [
    "APG", "AutoGuidance", "Branch", "CFG", "CFGZeroStar", "GFCG", "GuidancePolicy", "GuidanceRescale",
    "InternalGuidance", "NoGuidance", "Sampler", "TimeGrid", "indexed_noise", "make_grid", "make_noise",
    "rae_v1_grid", "raev2_grid", "sample", "shift_alpha", "time_shift", "uniform_grid",
]
