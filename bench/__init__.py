"""Benchmarks of what steering costs (the loop, the scorer, the gateway, load, leaks); figures in docs/benchmarks.md."""
