"""Benchmarks: ratios measured side by side in one run. Not tests; see bench/RESULTS.md."""
