"""The Query latency benchmark runs against a real server with access control on and
reports every figure, the think-time load and the closed-loop saturation."""

from __future__ import annotations

import contextlib
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from benchmarks.query import CALLS, generate_load, main, percentile, store_releases
from server.access import AccessControl, Role
from server.aggregation import Aggregator, QueryHandler
from server.grpc_server import serve
from server.storage import Store


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
                "--think-ms", "20",
                "--saturation-seconds", "1",
                "--client-processes", "1",
                "--profile-seconds", "0",
            ]
        )  # fmt: skip
    results = json.loads(out.read_text())
    for key in (
        "p50_ms", "p99_ms", "max_ms", "rps", "errors", "calls", "analysts", "releases", "seconds",
        "cores", "per_call", "p99_ratio_to_health", "target_met", "server", "think_ms",
        "load_average_before", "load_average_after", "health_only", "auth",
    ):  # fmt: skip
        assert key in results
    assert results["errors"] == 0, results["error_samples"]
    assert (results["releases"], results["analysts"], results["seconds"]) == (10, 3, 1.0)
    assert results["think_ms"] == 20.0 and results["target"]["think_ms"] == 20.0
    assert results["auth"]["mode"] == "token" and results["auth"]["role"] == "viewer"
    assert len(results["load_average_before"]) == len(results["load_average_after"]) == 3
    assert set(results["per_call"]) == set(CALLS)
    for row in results["per_call"].values():
        assert row["calls"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert results["calls"] == sum(results["per_call"][c]["calls"] for c in CALLS[:2])
    assert results["p99_ratio_to_health"] > 0
    assert isinstance(results["target_met"], bool) and results["profile"] is None
    assert results["target_met"] == (results["p99_ms"] <= 20.0)
    assert set(results["server"]["handler_wall"]) == {"ListReleases", "GetRelease"}
    saturation = results["saturation"]
    # Three analysts with no think time go past the deployed rate limit (50 calls/s per
    # token): refused, counted as errors and named as the limit's.
    assert saturation["think_ms"] == 0.0
    assert saturation["errors"] == saturation["rate_limited"], saturation["error_samples"]
    assert saturation["calls"] > 0 and 0 < saturation["p50_ms"] <= saturation["p99_ms"]
    assert saturation["rps"] == saturation["calls"] / saturation["seconds"]
    assert saturation["littles_law_mean_ms"] > 0 and saturation["mean_ms_all_calls"] > 0
    assert results["health_only"]["think_ms"] == 20.0
    text = printed.getvalue()
    assert "grpc_health" in text and "target p99" in text and "saturation" in text


def test_refused_calls_are_counted_as_errors(tmp_path: Path) -> None:
    db = tmp_path / "fedlens.db"
    release_ids = store_releases(db, 2)
    store = Store(f"sqlite:///{db}")
    access = AccessControl(store)
    _, good = access.issue("analyst", Role.VIEWER, now=datetime(2026, 1, 1, tzinfo=UTC))
    running = serve(Aggregator(store), QueryHandler(store), access=access)
    try:
        bad = good[:-4] + ("abcd" if not good.endswith("abcd") else "dcba")
        latencies, errors, _ = generate_load(
            running.address, release_ids, [bad], analysts=1, seconds=0.2, processes=1, seed=0
        )
        assert errors and all("AuthenticationError: unknown token" in e for e in errors)
        assert not latencies["ListReleases"] and not latencies["GetRelease"]
        assert latencies["grpc_health"]  # open, as deployed
        latencies, errors, _ = generate_load(
            running.address,
            release_ids,
            [good],
            analysts=1,
            seconds=0.2,
            processes=1,
            seed=0,
            think_s=0.01,  # within the deployed rate limit
        )
        assert errors == [] and all(latencies[name] for name in CALLS)
    finally:
        running.stop(None)
        store.close()


def test_percentile_interpolates() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert math.isnan(percentile([], 50))


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for bad in (["--analysts", "0"], ["--think-ms", "-1"], ["--saturation-seconds", "-1"]):
        with pytest.raises(SystemExit):
            main(["--json", str(tmp_path / "x.json"), *bad])
