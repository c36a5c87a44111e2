"""Benchmark drivers and pytest-benchmark suites, installed as ``fastdpo.benchmarks``."""
