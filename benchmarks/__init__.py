"""Benchmarks behind ``make bench`` (``python -m benchmarks.run``); see BENCHMARKS.md."""
