"""Benchmark harness: `python -m bench.run --help`. Results are appended to bench/RESULTS.md."""
