"""An analyst's job end to end with the real Flower runtime: train once, submit a question
through the Query service, let the job runner answer it with an explain-only Flower run,
and get an identical question answered from the stored release at no privacy cost."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from fedlens.jobs import Job, JobRequest, JobState
from fedlens.query_client import QueryClient
from fedlens.runconfig import RunConfig
from server.access import AccessControl, Role
from server.aggregation import Aggregator, QueryHandler
from server.deployment import CONNECTION, LocalFederation, SiteSpec
from server.grpc_server import serve
from server.job_runner import FlowerLauncher, JobRunner
from server.jobs import JobQueue
from server.storage import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _wait(client: QueryClient, job_id: str, timeout_s: float) -> Job:
    deadline = time.monotonic() + timeout_s
    job = client.get_job(job_id)
    while not job.state.finished and time.monotonic() < deadline:
        time.sleep(1.0)
        job = client.get_job(job_id)
    return job


def test_a_job_runs_through_flower_and_its_twin_is_answered_from_cache(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    access = AccessControl(store)
    aggregator = Aggregator(store)
    jobs = JobQueue(aggregator)
    server = serve(aggregator, QueryHandler(store), access=access, jobs=jobs)
    admin = access.issue("coordinator", Role.ADMIN, now=NOW)[1]
    analyst = access.issue("ana", Role.ANALYST, now=NOW)[1]
    sites = [
        SiteSpec(
            name=f"site-{i}",
            node_config={
                "partition-id": i,
                "num-partitions": 2,
                "state-dir": str(tmp_path / f"site-{i}"),
                "epsilon": 10.0,
                "delta": 1e-5,
                "threads": 1,
            },
        )
        for i in range(2)
    ]
    training = RunConfig(
        dataset="breast_cancer",
        num_sites=2,
        rounds=1,
        explain_kind="feature_stats",
        aggregator=server.address,
        out_dir=str(tmp_path / "out"),
        phase_timeout_s=60.0,
    )
    federation = LocalFederation(tmp_path / "flower", sites)
    # The ServerApp's token, from its environment (never the run configuration).
    federation.env["FEDLENS_TOKEN"] = admin
    try:
        with federation, QueryClient(server.address, token=analyst) as client:
            trained = federation.run(training.to_flower(), timeout_s=600)
            summary = json.loads((tmp_path / "out" / "summary.json").read_text())
            assert trained.completed, (trained, summary)
            before = {m.site_id: len(m.events) for m in client.list_budgets()}
            assert before == {"site-0": 2, "site-1": 2}  # one training round, one release

            # The launcher `fedlens server --flower-connection` uses: flwr run on the SuperLink.
            launcher = FlowerLauncher(
                federation.app_dir, CONNECTION, timeout_s=600, env=federation.env
            )
            runner = JobRunner(
                jobs,
                launcher,
                deployment={"aggregator": server.address, "phase-timeout": 60.0},
                poll_s=0.5,
            )
            question = JobRequest("global_attribution", {"ig-steps": "8"})
            job = client.submit_job(question)
            assert job.state is JobState.QUEUED and job.submitted_by.startswith("ana (")
            runner.start()
            done = _wait(client, job.job_id, 600)
            runner.stop(timeout_s=60)
            assert done.state is JobState.DONE, done
            assert not done.from_cache
            release = client.get_release(done.release_id)
            assert release.kind == "global_attribution"
            assert sorted(c.site_id for c in release.costs) == ["site-0", "site-1"]
            after = {m.site_id: m for m in client.list_budgets()}
            assert {s: len(m.events) for s, m in after.items()} == {"site-0": 3, "site-1": 3}

            twin = client.submit_job(JobRequest("global_attribution", {"ig-steps": "8"}))
            assert twin.state is JobState.DONE and twin.from_cache
            assert twin.release_id == done.release_id
            assert jobs.claim_next() is None  # nothing left to run
            assert {m.site_id: m.events for m in client.list_budgets()} == {
                s: m.events for s, m in after.items()
            }
    finally:
        server.stop()
        store.close()
    # The job's audit trail: queued, running, done; the twin answered from cache.
    trail = [(e.action, e.outcome) for e in store.audit_entries() if "job" in e.action]
    assert trail == [
        ("submit_job", "queued"),
        ("run_job", "running"),
        ("run_job", "done"),
        ("submit_job", "cached"),
    ]
