"""Benchmarks, run by hand (`python -m bench.bench_get`); never part of pass/fail."""
