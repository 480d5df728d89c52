"""Reproducible benchmarks: ``python -m benchmarks.NAME --json OUT``.

Each benchmark measures a fedlens path against a baseline in the same run and reports
ratios, with the machine's core count, so figures from noisy shared machines compare.
"""
