"""The Query latency benchmark runs against a real server and reports every figure."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from benchmarks.query import CALLS, main, percentile


def test_tiny_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "query.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(
            [
                "--json", str(out),
                "--releases", "10",
                "--analysts", "3",
                "--seconds", "1",
                "--client-processes", "1",
                "--profile-seconds", "0",
            ]
        )  # fmt: skip
    results = json.loads(out.read_text())
    for key in (
        "p50_ms", "p99_ms", "rps", "errors", "calls", "analysts", "releases", "seconds",
        "cores", "per_call", "p99_ratio_to_health", "target_met", "server",
    ):  # fmt: skip
        assert key in results
    assert results["errors"] == 0, results["error_samples"]
    assert (results["releases"], results["analysts"], results["seconds"]) == (10, 3, 1.0)
    assert set(results["per_call"]) == set(CALLS)
    for row in results["per_call"].values():
        assert row["calls"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert results["calls"] == sum(results["per_call"][c]["calls"] for c in CALLS[:2])
    assert results["p99_ratio_to_health"] > 0
    assert isinstance(results["target_met"], bool) and results["profile"] is None
    assert set(results["server"]["handler_wall"]) == {"ListReleases", "GetRelease"}
    assert "grpc_health" in printed.getvalue() and "target p99" in printed.getvalue()


def test_percentile_interpolates() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert math.isnan(percentile([], 50))


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--json", str(tmp_path / "x.json"), "--analysts", "0"])
