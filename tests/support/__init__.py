"""Helpers shared by the tests (and the benchmarks): harness, host client, tokens, clusters."""
