"""The benchmarks run and recover the plain sum (their timings are not checked here)."""

from __future__ import annotations

from benchmarks.secagg import measure


def test_secagg_benchmark_recovers_the_sum_within_the_encoding_error() -> None:
    result = measure(sites=3, length=50, repeats=1)
    assert result["max_abs_error"] < 3 / 1e5
    assert result["site_s"] > 0 and result["server_s"] > 0
