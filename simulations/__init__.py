"""Synthetic multi-centre cohort, federation simulation and benchmarks."""
