"""Seeds of one sampling run: the generator seed of ``make_noise``, and sample i's noise and random
label, each a function of (seed, i) only.

torch's CPU generator (mt19937) keeps only the low 32 bits of the seed it is given, so whatever
reaches ``manual_seed`` must already carry the run seed in those 32 bits (packing ``seed << 32 | i``
silently dropped the seed). Here:

- ``fold_seed(s)``: the run seed folded to 32 bits, ``lo ^ mix32(hi)``. Seeds in [0, 2^32) are
  unchanged (``make_noise(shape, s)`` is ``torch.randn`` after ``manual_seed(s)``), and a larger seed
  never lands on ``s mod 2^32`` (``mix32`` is a bijection with ``mix32(0) = 0``).
- ``noise_seed(s, i) = mix32(fold_seed(s) ^ tag) + i·K mod 2^32`` with K odd: for one run seed a
  bijection in i, so no two samples of one run (i < 2^32) share their noise, and two run seeds
  below 2^32 give sample i different noise.
- ``label_hash(s, i)``: output i of splitmix64 keyed by the whole 64-bit seed and a label tag. No
  torch generator is involved, so a random label is never a draw of some sample's noise generator.

Seeds are read as torch reads them: an int in [−2^63, 2^64), negative values as two's complement.
"""
from __future__ import annotations

import operator

import torch

from raekern._utils.checks import fail

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
GOLDEN64 = 0x9E3779B97F4A7C15  # splitmix64's increment
NOISE_STRIDE = 0x9E3779B9  # odd, so i -> base + i·K is a bijection mod 2^32
NOISE_TAG = 0x6E6F6973  # "nois": the noise domain
LABEL_TAG = 0x6C6162656C5F5F5F  # "label___": the label domain
MAX_INDEX = 1 << 32  # noise seeds are 32 bits: beyond this index two samples would share noise


def check_seed(seed, op: str) -> int:
    """The seed as the 64-bit unsigned value torch's ``manual_seed`` would use."""
    try:
        s = operator.index(seed)
    except TypeError:
        fail(op, "seed", f"must be an int, got {type(seed).__name__}", TypeError)
    if not -(1 << 63) <= s < (1 << 64):
        fail(op, "seed", f"must be in [-2**63, 2**64), got {s}")
    return s & M64


def check_index(i, op: str) -> int:
    try:
        v = operator.index(i)
    except TypeError:
        fail(op, "indices", f"must be ints, got {type(i).__name__}", TypeError)
    if not 0 <= v < MAX_INDEX:
        fail(op, "indices", f"must be in [0, 2**32), got {v}")
    return v


def mix32(h: int) -> int:
    """murmur3's 32-bit finaliser: a bijection on [0, 2^32) with mix32(0) = 0."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def mix64(z: int) -> int:
    """splitmix64's finaliser (a bijection on [0, 2^64))."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def fold_seed(seed, op: str = "sampling.make_noise") -> int:
    """The generator seed of ``make_noise``: 32 bits that keep every bit of the run seed."""
    s = check_seed(seed, op)
    return (s & M32) ^ mix32(s >> 32)


def noise_seed(seed, i, op: str = "sampling.indexed_noise") -> int:
    """The 32-bit generator seed of sample i's noise (a bijection in i for a fixed run seed)."""
    base = mix32(fold_seed(seed, op) ^ NOISE_TAG)
    return (base + check_index(i, op) * NOISE_STRIDE) & M32


def noise_generator(seed, i, op: str = "sampling.indexed_noise") -> torch.Generator:
    return torch.Generator().manual_seed(noise_seed(seed, i, op))


def label_hash(seed, i, op: str = "sampling.class_labels") -> int:
    """64 well-mixed bits for sample i's random label: splitmix64 keyed by (seed, label tag)."""
    key = mix64(check_seed(seed, op) ^ LABEL_TAG)
    return mix64((key + (check_index(i, op) + 1) * GOLDEN64) & M64)
