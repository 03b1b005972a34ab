"""Benchmark harness behind `raekern bench` and benchmarks/ (DESIGN §6)."""
from raekern.bench.registry import Case, cases, families, register

__all__ = ["Case", "cases", "families", "register"]
