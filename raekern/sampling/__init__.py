"""Sampling: time grids, guidance policies and samplers (DESIGN §4.2)."""
