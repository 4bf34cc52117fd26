"""Helpers for a lent GPU machine: the CUDA checks and the MiniLM runs staged there (`benchmarks/RESULTS.md`)."""
