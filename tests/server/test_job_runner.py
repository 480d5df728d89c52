"""The job runner without Flower: a launcher stands in for the ServerApp's run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fedlens.datasets import load_dataset
from fedlens.errors import ConfigurationError
from fedlens.jobs import JobRequest, JobState
from fedlens.models import build_model
from fedlens.types import SiteLedger
from server.aggregation import Aggregator
from server.job_runner import FlowerLauncher, JobRunner
from server.jobs import JobQueue
from server.storage import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[JobQueue]:
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    pre = load_dataset("breast_cancer").preprocessor
    store.save_model(
        dataset="breast_cancer",
        model="logistic",
        state=build_model("logistic", pre.dimension).state_dict(),
        now=NOW,
        params={"seed": "0", "rounds": "1"},
    )
    for site in ("a", "b"):
        store.mirror_ledger(SiteLedger(site, 4.0, 1e-5, ()), now=NOW)
    yield JobQueue(Aggregator(store))
    store.close()


def test_jobs_run_one_at_a_time_in_order_with_the_deployment_keys(queue: JobQueue) -> None:
    first = queue.submit(JobRequest("feature_stats"), submitted_by="ana")
    second = queue.submit(
        JobRequest("feature_stats", {"explain-epsilon": "0.5"}), submitted_by="bo"
    )
    seen: list[dict[str, Any]] = []

    def launch(config: dict[str, Any]) -> str:
        seen.append(config)
        assert queue.get(config["job-id"]).state is JobState.RUNNING
        queue.finish(config["job-id"], reason="site a declined", refused=True)
        return "finished:completed"

    runner = JobRunner(queue, launch, deployment={"aggregator": "10.0.0.1:5", "phase-timeout": 9})
    assert runner.run_next() is not None and runner.run_next() is not None
    assert runner.run_next() is None
    assert [c["job-id"] for c in seen] == [first.job_id, second.job_id]
    assert all(c["aggregator"] == "10.0.0.1:5" and c["phase-timeout"] == 9 for c in seen)
    assert seen[1]["explain-epsilon"] == 0.5
    assert queue.get(first.job_id).state is JobState.REFUSED


def test_a_run_that_never_reports_leaves_the_job_failed(queue: JobQueue) -> None:
    silent = queue.submit(JobRequest("feature_stats"), submitted_by="ana")
    broken = queue.submit(JobRequest("feature_stats", {"ig-steps": "4"}), submitted_by="ana")
    outcomes = iter(["finished:failed (ServerApp exception)", RuntimeError("flwr not found")])

    def launch(config: dict[str, Any]) -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    runner = JobRunner(queue, launch, deployment={"aggregator": "127.0.0.1:1"}, poll_s=0.05)
    runner.start()
    try:
        deadline = datetime.now(UTC).timestamp() + 10
        while queue.list_jobs(state="queued") or queue.list_jobs(state="running"):
            assert datetime.now(UTC).timestamp() < deadline
            time.sleep(0.05)
    finally:
        runner.stop(timeout_s=5)
    failed = queue.get(silent.job_id)
    assert failed.state is JobState.FAILED and "ServerApp exception" in failed.reason
    crashed = queue.get(broken.job_id)
    assert crashed.state is JobState.FAILED and "flwr not found" in crashed.reason


def test_the_runner_refuses_keys_that_belong_to_the_job(queue: JobQueue, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="explain-epsilon"):
        JobRunner(queue, lambda c: "", deployment={"explain-epsilon": 9.0})
    with pytest.raises(ConfigurationError, match="no Flower app"):
        FlowerLauncher(tmp_path, "local")
