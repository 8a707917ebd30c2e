"""Benchmarks (pytest-benchmark suites) and the report generator (``python -m bench.report``)."""
