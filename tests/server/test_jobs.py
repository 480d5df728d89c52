"""The analysts' job queue over real gRPC with access control: refusals before anything
is spent, pricing against the mirrored ledgers, answers from identical earlier jobs,
roles and the audit log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from fedlens.datasets import load_dataset
from fedlens.errors import (
    BudgetExceededError,
    ConfigurationError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    StaleRoundError,
)
from fedlens.jobs import JobRequest, JobState
from fedlens.models import build_model
from fedlens.query_client import QueryClient
from fedlens.types import ReleasedValue, SiteLedger
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc, query_pb2, query_pb2_grpc
from privacy import LedgerEvent, PrivacyLedger, gaussian_noise_multiplier
from server.access import AccessControl, Role
from server.aggregation import Aggregator, QueryHandler
from server.grpc_server import RunningServer, serve
from server.jobs import MAX_TEXT, JobQueue
from server.storage import Store
from tests.server.stored import save_release

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SITES = ("site-0", "site-1", "site-2")


class Coordinator:
    def __init__(self, url: str) -> None:
        self.store = Store(url)
        self.access = AccessControl(self.store)
        self.aggregator = Aggregator(self.store)
        self.jobs = JobQueue(self.aggregator, min_cohort_size=50)
        self.server: RunningServer = serve(
            self.aggregator, QueryHandler(self.store), access=self.access, jobs=self.jobs
        )
        self.tokens = {
            role: self.access.issue(f"{role.name.lower()}-1", role, now=NOW)[1] for role in Role
        }
        self.model_id = self.publish()
        for site in SITES:
            self.mirror(site, budget=4.0)

    def client(self, role: Role) -> QueryClient:
        return QueryClient(self.server.address, token=self.tokens[role])

    def publish(self) -> str:
        pre = load_dataset("breast_cancer").preprocessor
        state = build_model("logistic", pre.dimension, seed=0).state_dict()
        return self.store.save_model(
            dataset="breast_cancer",
            model="logistic",
            state=state,
            now=datetime.now(UTC),
            params={"seed": "0", "rounds": "2"},
        )

    def mirror(self, site: str, *, budget: float, events: tuple[LedgerEvent, ...] = ()) -> None:
        self.store.mirror_ledger(
            SiteLedger(site_id=site, budget_epsilon=budget, delta=1e-5, events=events), now=NOW
        )

    def release(self, release_id: str, kind: str = "global_attribution") -> None:
        save_release(
            self.store,
            release_id,
            kind,
            SITES,
            now=NOW,
            grouped=(ReleasedValue("x", 1.0, 0.1),),
        )

    def submissions(self) -> list[tuple[str, str]]:
        return [
            (e.outcome, e.detail) for e in self.store.audit_entries() if e.action == "submit_job"
        ]

    def close(self) -> None:
        self.server.stop(grace=None)
        self.store.close()


@pytest.fixture
def coord(database_url: str) -> Iterator[Coordinator]:
    c = Coordinator(database_url)
    yield c
    c.close()


@pytest.mark.both_backends
def test_an_analyst_submits_a_job_that_is_queued_and_audited(coord: Coordinator) -> None:
    with coord.client(Role.ANALYST) as client:
        job = client.submit_job(
            JobRequest(
                "global_attribution", {"explain-epsilon": "0.5"}, cohort='{"mean radius": [10, 15]}'
            )
        )
        assert job.state is JobState.QUEUED
        assert job.submitted_by.startswith("analyst-1 (")
        assert not job.from_cache and not job.release_id
        assert client.get_job(job.job_id) == job
    with coord.client(Role.VIEWER) as viewer:
        assert [j.job_id for j in viewer.list_jobs()] == [job.job_id]
        assert viewer.list_jobs(state="done") == []
        with pytest.raises(IntegrityError, match="unknown job state"):
            viewer.list_jobs(state="paused")
        with pytest.raises(NotFoundError):
            viewer.get_job("nope")
    assert coord.submissions() == [("queued", f"global_attribution on model {coord.model_id}")]
    # The run it will get: the stored model's dataset and training, the analyst's keys.
    claimed = coord.jobs.claim_next()
    assert claimed is not None
    running, config = claimed
    assert running.state is JobState.RUNNING
    assert config["dataset"] == "breast_cancer" and config["num-sites"] == 3
    assert config["explain-epsilon"] == 0.5 and config["num-server-rounds"] == 2
    assert config["job-id"] == job.job_id and config["job-model-id"] == coord.model_id
    assert json.loads(config["explain-cohort"]) == {"mean radius": [10, 15]}
    assert coord.jobs.claim_next() is None


def test_a_viewer_may_not_submit_and_nothing_is_stored_or_charged(coord: Coordinator) -> None:
    with coord.client(Role.VIEWER) as client, pytest.raises(PermissionDeniedError):
        client.submit_job(JobRequest("global_attribution"))
    assert coord.jobs.list_jobs() == []
    assert coord.submissions() == []
    refused = [e for e in coord.store.audit_entries() if e.action == "access_refused"]
    assert len(refused) == 1 and "SubmitJob needs analyst" in refused[0].detail
    assert all(not m.events for m in coord.store.site_ledgers())


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (JobRequest("no_such_kind"), "unknown explanation kind 'no_such_kind'"),
        (JobRequest("hessian"), "releases factors for influence rounds"),
        (JobRequest("feature_stats", {"aggregator": "evil:1"}), "'aggregator' cannot be set"),
        (JobRequest("feature_stats", {"num-sites": "2"}), "'num-sites' cannot be set"),
        (JobRequest("feature_stats", {"explain-epsilon": "-1"}), "explain-epsilon"),
        (JobRequest("feature_stats", {"explain-epsilon": "lots"}), "explain-epsilon"),
        (JobRequest("global_attribution", cohort="{not json"), "cohort is not valid JSON"),
        (JobRequest("global_attribution", cohort="[1, 2]"), "cohort must be a JSON object"),
        (
            JobRequest("global_attribution", cohort='{"height": [1, 2]}'),
            "cohort names unknown feature 'height'",
        ),
        (JobRequest("feature_stats", cohort='{"age": [1, 2]}'), "global_attribution only"),
        (
            JobRequest("global_attribution", {"min-cohort-size": "5"}),
            "min-cohort-size 5 is below the coordinator's minimum cohort size of 50",
        ),
        (JobRequest("global_attribution", {"explain-method": "magic"}), "explain-method"),
        (JobRequest("feature_stats", query_input="{}"), "influence kinds only"),
        (JobRequest("group_influence", query_input='{"x": 1}'), "unknown features 'x'"),
        (JobRequest("group_influence", {"influence-group-by": "shoe_size"}), "shoe_size"),
        (JobRequest("group_influence", {"influence-method": "tracin"}), "tracin"),
        (JobRequest("global_attribution", cohort="x" * (MAX_TEXT + 1)), "at most 4096"),
        (JobRequest("feature_stats", {f"k{i}": "v" for i in range(40)}), "too many parameters"),
        (JobRequest(""), "kind must be 1-64 characters"),
    ],
)
def test_malformed_requests_are_refused_with_nothing_queued_or_charged(
    coord: Coordinator, request_: JobRequest, message: str
) -> None:
    with coord.client(Role.ANALYST) as client:
        with pytest.raises(IntegrityError) as refused:
            client.submit_job(request_)
        assert message in str(refused.value)
    assert coord.jobs.list_jobs() == []
    [(outcome, detail)] = coord.submissions()
    assert outcome == "refused" and message[:20] in detail
    assert all(not m.events for m in coord.store.site_ledgers())


def test_status_codes_of_refusals(coord: Coordinator) -> None:
    channel = grpc.insecure_channel(coord.server.address)
    stub = query_pb2_grpc.QueryStub(channel)
    meta = (("authorization", f"Bearer {coord.tokens[Role.ANALYST]}"),)
    with pytest.raises(grpc.RpcError) as bad:
        stub.SubmitJob(query_pb2.SubmitJobRequest(kind="nope"), metadata=meta)
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    coord.mirror("site-poor", budget=0.5)
    with pytest.raises(grpc.RpcError) as poor:
        stub.SubmitJob(query_pb2.SubmitJobRequest(kind="feature_stats"), metadata=meta)
    channel.close()
    assert poor.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_job_some_site_cannot_afford_is_refused_naming_the_site(tmp_path: Path) -> None:
    c = Coordinator(f"sqlite:///{tmp_path / 'fedlens.db'}")
    try:
        c.mirror("site-poor", budget=0.5)
        with c.client(Role.ANALYST) as client:
            with pytest.raises(BudgetExceededError, match="site-poor") as refused:
                client.submit_job(JobRequest("feature_stats", {"explain-epsilon": "1.0"}))
            assert "site-0" not in str(refused.value)
            # A cheaper question fits every site.
            job = client.submit_job(JobRequest("feature_stats", {"explain-epsilon": "0.2"}))
            assert job.state is JobState.QUEUED
        assert [o for o, _ in c.submissions()] == ["refused", "queued"]
    finally:
        c.close()


def test_influence_jobs_are_priced_for_every_release_they_need(tmp_path: Path) -> None:
    c = Coordinator(f"sqlite:///{tmp_path / 'fedlens.db'}")
    try:
        release = LedgerEvent(
            kind="gaussian",
            noise_multiplier=gaussian_noise_multiplier(0.5, 1e-6),
            label="x",
            created_at=NOW,
        )
        one = PrivacyLedger(10.0, 1e-5, ()).epsilon_with_all([release])
        two = PrivacyLedger(10.0, 1e-5, ()).epsilon_with_all([release, release])
        budget = (one + two) / 2
        c.mirror("site-tight", budget=budget)
        with c.client(Role.ANALYST) as client:
            # One release fits the tight site; a hessian round and the influence round do not.
            assert (
                client.submit_job(JobRequest("feature_stats", {"explain-epsilon": "0.5"})).state
                is JobState.QUEUED
            )
            with pytest.raises(BudgetExceededError, match=r"2 releases at ε = 0\.5.*site-tight"):
                client.submit_job(JobRequest("group_influence", {"explain-epsilon": "0.5"}))
    finally:
        c.close()


@pytest.mark.both_backends
def test_an_identical_question_is_answered_from_the_stored_release(coord: Coordinator) -> None:
    cohort = '{"mean radius": [10, 15]}'
    with coord.client(Role.ANALYST) as client:
        first = client.submit_job(JobRequest("global_attribution", cohort=cohort))
        claimed = coord.jobs.claim_next()
        assert claimed is not None and claimed[0].job_id == first.job_id
        coord.release("r1")
        done = coord.jobs.finish(first.job_id, release_id="r1")
        assert done.state is JobState.DONE and done.release_id == "r1"
        events = {m.site_id: m.events for m in coord.store.site_ledgers()}

        # The same question, spelt differently (defaults explicit, JSON reformatted).
        again = client.submit_job(
            JobRequest(
                "global_attribution",
                {"explain-epsilon": "1.0", "explain-method": "integrated_gradients"},
                cohort='{ "mean radius":[10,15] }',
            )
        )
        assert again.state is JobState.DONE and again.from_cache
        assert again.release_id == "r1" and again.job_id != first.job_id
        assert coord.jobs.claim_next() is None  # no round to run
        assert {m.site_id: m.events for m in coord.store.site_ledgers()} == events

        # Another cohort, another ε, or a newer model is another question.
        other = client.submit_job(
            JobRequest("global_attribution", cohort='{"mean radius": [15, 30]}')
        )
        assert other.state is JobState.QUEUED
        cheaper = client.submit_job(
            JobRequest("global_attribution", {"explain-epsilon": "0.5"}, cohort=cohort)
        )
        assert cheaper.state is JobState.QUEUED
        coord.publish()
        newer = client.submit_job(JobRequest("global_attribution", cohort=cohort))
        assert newer.state is JobState.QUEUED and not newer.from_cache
    outcomes = [o for o, _ in coord.submissions()]
    assert outcomes == ["queued", "cached", "queued", "queued", "queued"]


@pytest.mark.both_backends
def test_only_admins_finish_jobs_and_only_running_ones(coord: Coordinator) -> None:
    with coord.client(Role.ANALYST) as client:
        job = client.submit_job(JobRequest("feature_stats"))
    channel = grpc.insecure_channel(coord.server.address)
    stub = aggregation_pb2_grpc.AggregationStub(channel)

    def finish(role: Role, **fields: object) -> aggregation_pb2.FinishJobResponse:
        meta = (("authorization", f"Bearer {coord.tokens[role]}"),)
        request = aggregation_pb2.FinishJobRequest(job_id=job.job_id, **fields)  # type: ignore[arg-type]
        return stub.FinishJob(request, metadata=meta)  # type: ignore[no-any-return]

    try:
        with pytest.raises(grpc.RpcError) as denied:
            finish(Role.ANALYST, reason="x")
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as queued:
            finish(Role.ADMIN, reason="x")
        assert queued.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert coord.jobs.claim_next() is not None
        with pytest.raises(grpc.RpcError) as missing:
            finish(Role.ADMIN, release_id="no-such-release")
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        reply = finish(Role.ADMIN, reason="site-1 declined: budget", refused=True)
        assert reply.state == "refused"
        with pytest.raises(StaleRoundError):
            coord.jobs.finish(job.job_id, reason="again")
        # The ServerApp fetches the model it explains (admin only).
        meta = (("authorization", f"Bearer {coord.tokens[Role.ADMIN]}"),)
        model = stub.GetModel(aggregation_pb2.GetModelRequest(), metadata=meta)
        assert model.model_id == coord.model_id and model.dataset == "breast_cancer"
    finally:
        channel.close()
    with coord.client(Role.VIEWER) as viewer:
        final = viewer.get_job(job.job_id)
    assert final.state is JobState.REFUSED and final.reason == "site-1 declined: budget"


def test_no_job_before_a_model_is_stored(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    try:
        queue = JobQueue(Aggregator(store))
        with pytest.raises(NotFoundError, match="no trained model"):
            queue.submit(JobRequest("feature_stats"), submitted_by="ana")
        assert [e.outcome for e in store.audit_entries() if e.action == "submit_job"] == ["refused"]
    finally:
        store.close()


def test_cli_submits_lists_and_shows_jobs(
    coord: Coordinator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fedlens.cli import main

    common = ["--address", coord.server.address, "--token", coord.tokens[Role.ANALYST]]
    assert (
        main(["query", "submit", "feature_stats", "--param", "explain-epsilon=0.5", *common]) == 0
    )
    table = capsys.readouterr().out
    assert "feature_stats" in table and "queued" in table and "analyst-1" in table
    assert main(["query", "jobs", "--json", *common]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["state"] == "queued" and listed["from_cache"] is False
    assert main(["query", "job", listed["job_id"], "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out) == listed
    query = tmp_path / "query.json"
    query.write_text(json.dumps({"mean radius": 1e9}))
    refused = ["query", "submit", "group_influence", "--input", str(query), *common]
    assert main(refused) == 2
    assert "the record lacks the features" in capsys.readouterr().err
    assert main(["query", "submit", "feature_stats", "--param", "oops", *common]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.both_backends
def test_a_twin_queued_while_its_question_ran_is_answered_without_a_run(
    coord: Coordinator,
) -> None:
    with coord.client(Role.ANALYST) as client:
        first = client.submit_job(JobRequest("feature_stats"))
        twin = client.submit_job(JobRequest("feature_stats", {"explain-epsilon": "1"}))
        assert twin.state is JobState.QUEUED  # the first is not answered yet
        claimed = coord.jobs.claim_next()
        assert claimed is not None and claimed[0].job_id == first.job_id
        coord.release("r2", kind="feature_stats")
        coord.jobs.finish(first.job_id, release_id="r2")
        assert coord.jobs.claim_next() is None  # the twin needs no run
        answered = client.get_job(twin.job_id)
    assert answered.state is JobState.DONE and answered.from_cache
    assert answered.release_id == "r2"
    trail = [(e.action, e.outcome) for e in coord.store.audit_entries() if "job" in e.action]
    assert trail[-2:] == [("run_job", "done"), ("run_job", "cached")]


def test_an_analysts_allowance_caps_its_jobs_on_top_of_the_site_budgets(
    coord: Coordinator,
) -> None:
    analyst_id = coord.tokens[Role.ANALYST].split("_")[1]
    coord.access.set_allowance(analyst_id, 1.0, now=NOW)
    assert coord.access.allowance(analyst_id) == 1.0
    with coord.client(Role.ANALYST) as client:
        first = client.submit_job(JobRequest("global_attribution", {"explain-epsilon": "0.6"}))
        assert first.state is JobState.QUEUED
        # 0.6 + 0.6 > 1.0: refused, nothing stored, the refusal audited.
        with pytest.raises(BudgetExceededError, match=r"allowance is ε = 1: 1 job\(s\) took"):
            client.submit_job(JobRequest("feature_stats", {"explain-epsilon": "0.6"}))
        assert [j.job_id for j in client.list_jobs()] == [first.job_id]  # none stored
        second = client.submit_job(JobRequest("feature_stats", {"explain-epsilon": "0.4"}))
        assert second.state is JobState.QUEUED
    refusals = [d for outcome, d in coord.submissions() if outcome == "refused"]
    assert any("allowance" in d for d in refusals)
    # The admin's token has no allowance: uncapped.
    with coord.client(Role.ADMIN) as admin:
        assert (
            admin.submit_job(JobRequest("global_attribution", {"explain-epsilon": "0.7"})).state
            is JobState.QUEUED
        )
    coord.access.set_allowance(analyst_id, None, now=NOW)
    assert coord.access.allowance(analyst_id) is None
    with pytest.raises(ConfigurationError, match="finite"):
        coord.access.set_allowance(analyst_id, float("nan"), now=NOW)
    with pytest.raises(NotFoundError):
        coord.access.set_allowance("0" * 16, 1.0, now=NOW)
