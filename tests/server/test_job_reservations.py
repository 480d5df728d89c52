"""Queued and running jobs reserve their releases at the sites: a job that would fit only
if the others did not run is refused at submission, and the reservation ends with the
job (done: its spend is then mirrored; failed or refused: nothing more to come)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

import server.jobs
from fedlens.datasets import load_dataset
from fedlens.errors import BudgetExceededError
from fedlens.jobs import Job, JobRequest, JobState
from fedlens.models import build_model
from fedlens.query_client import QueryClient
from fedlens.types import SiteLedger
from privacy import LedgerEvent, PrivacyLedger, gaussian_noise_multiplier
from server.aggregation import Aggregator, QueryHandler, Reservation
from server.grpc_server import serve
from server.jobs import JobQueue
from server.storage import Store
from tests.server.stored import save_release

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SITES = ("site-0", "site-1", "site-2")
DELTA = 1e-5  # the sites' δ
JOB_DELTA = 1e-6  # a job's default explain-delta


def release_event(epsilon: float = 1.0) -> LedgerEvent:
    """What a site records for one release of a job at ``epsilon``."""
    return LedgerEvent(
        kind="gaussian",
        noise_multiplier=gaussian_noise_multiplier(epsilon, JOB_DELTA),
        label="explanation round",
        created_at=NOW,
    )


def composed(releases: int) -> float:
    """ε at a site's δ of ``releases`` releases at ε = 1 (and the job's δ)."""
    return PrivacyLedger(100.0, DELTA).epsilon_with_all([release_event()] * releases)


def budget_for(releases: int) -> float:
    """A budget that pays for ``releases`` releases at ε = 1, not one more."""
    return (composed(releases) + composed(releases + 1)) / 2


ONE = f"{composed(1):.3f}"  # how one release reads in a refusal
COHORT = '{"mean radius": [10, 15]}'


class Federation:
    """A coordinator's store with a trained model and three mirrored sites."""

    def __init__(self, url: str, *, releases: int) -> None:
        self.store = Store(url)
        self.aggregator = Aggregator(self.store)
        self.jobs = JobQueue(self.aggregator)
        pre = load_dataset("breast_cancer").preprocessor
        self.model_id = self.store.save_model(
            dataset="breast_cancer",
            model="logistic",
            state=build_model("logistic", pre.dimension, seed=0).state_dict(),
            now=NOW,
            params={"seed": "0", "rounds": "1"},
        )
        self.budget = budget_for(releases)
        self.spent: list[LedgerEvent] = []
        self.mirror()

    def mirror(self) -> None:
        """Mirror every site's ledger as the ServerApp forwards it after a round."""
        for site in SITES:
            ledger = SiteLedger(site, self.budget, DELTA, tuple(self.spent))
            self.store.mirror_ledger(ledger, now=NOW)

    def submit(
        self,
        kind: str = "feature_stats",
        epsilon: float = 1.0,
        *,
        cohort: str = "",
        params: dict[str, str] | None = None,
    ) -> Job:
        request = JobRequest(
            kind, {"explain-epsilon": str(epsilon), **(params or {})}, cohort=cohort
        )
        return self.jobs.submit(request, submitted_by="ana")

    def run(self, job: Job, outcome: str) -> None:
        """Claim ``job`` and finish it: ``done`` (its release spent at every site and
        mirrored first, as the ServerApp does), ``failed`` or ``refused``."""
        claimed = self.jobs.claim_next()
        assert claimed is not None and claimed[0].job_id == job.job_id
        if outcome == "done":
            self.spent.append(release_event())
            self.mirror()
            self.save_release(f"r-{job.job_id}", job.kind)
            self.jobs.finish(job.job_id, release_id=f"r-{job.job_id}")
        else:
            self.jobs.finish(job.job_id, reason="site-1 declined", refused=outcome == "refused")

    def save_release(self, release_id: str, kind: str) -> None:
        save_release(self.store, release_id, kind, SITES, now=NOW, delta=JOB_DELTA)

    def submissions(self) -> list[tuple[str, str]]:
        return [
            (e.outcome, e.detail) for e in self.store.audit_entries() if e.action == "submit_job"
        ]

    def mirrored_events(self) -> dict[str, int]:
        return {m.site_id: len(m.events) for m in self.store.site_ledgers()}

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def open_federation(database_url: str) -> Iterator[Callable[[int], Federation]]:
    """Opens the federation on ``database_url``, its sites' budgets paying for that many
    releases at ε = 1."""
    opened: list[Federation] = []

    def open_(releases: int) -> Federation:
        opened.append(Federation(database_url, releases=releases))
        return opened[-1]

    yield open_
    for f in opened:
        f.close()


@pytest.fixture
def federation(open_federation: Callable[[int], Federation]) -> Federation:
    """Sites whose budgets pay for one release at ε = 1."""
    return open_federation(1)


@pytest.mark.both_backends
@pytest.mark.parametrize("outcome", ["failed", "refused"])
def test_a_job_that_fits_only_alone_is_refused_until_the_first_one_ends(
    federation: Federation, outcome: str
) -> None:
    first = federation.submit("feature_stats")
    assert first.state is JobState.QUEUED
    # Each fits a site alone; together they do not.
    with pytest.raises(BudgetExceededError) as refused:
        federation.submit("global_attribution")
    message = str(refused.value)
    assert "site-0 (budget ε = " in message and f"{federation.budget:g}" in message
    assert f"spent ε = 0.000, reserved ε = {ONE} by 1 queued or running job(s)" in message
    assert f"would bring it to {composed(2):.3f}, without the reserved jobs to {ONE}" in message
    # Nothing stored, nothing charged, the refusal audited with the same message.
    assert [j.job_id for j in federation.jobs.list_jobs()] == [first.job_id]
    assert federation.mirrored_events() == dict.fromkeys(SITES, 0)
    assert federation.submissions()[-1] == ("refused", f"global_attribution: {message}")

    # Running, the first job still holds its reservation.
    claimed = federation.jobs.claim_next()
    assert claimed is not None and claimed[0].job_id == first.job_id
    with pytest.raises(BudgetExceededError, match=f"reserved ε = {ONE} by 1"):
        federation.submit("global_attribution")
    # It ends without a release: the reservation is gone and nothing was spent.
    federation.jobs.finish(first.job_id, reason="site-1 declined", refused=outcome == "refused")
    assert federation.jobs.reserved() == []
    assert federation.jobs.reserved_epsilon() == dict.fromkeys(SITES, 0.0)
    second = federation.submit("global_attribution")
    assert second.state is JobState.QUEUED
    assert federation.jobs.reserved() == [Reservation(f"job {second.job_id}", 1.0, JOB_DELTA, 1)]
    assert [o for o, _ in federation.submissions()] == ["queued", "refused", "refused", "queued"]


@pytest.mark.both_backends
def test_a_done_job_is_counted_once_in_the_mirrored_ledger_not_also_reserved(
    open_federation: Callable[[int], Federation],
) -> None:
    federation = open_federation(2)
    first = federation.submit("feature_stats")
    second = federation.submit("global_attribution")
    with pytest.raises(BudgetExceededError, match=r"reserved ε = [0-9.]+ by 2 queued"):
        federation.submit("global_attribution", cohort=COHORT)
    federation.run(first, "done")
    # The first job's release is now spent (mirrored) and no longer reserved.
    with pytest.raises(BudgetExceededError, match=f"spent ε = {ONE}, reserved ε = [0-9.]+ by 1 "):
        federation.submit("global_attribution", cohort=COHORT)
    assert [r.label for r in federation.jobs.reserved()] == [f"job {second.job_id}"]
    # One release spent, one reserved: the reservation holds what the second adds.
    assert federation.jobs.reserved_epsilon() == pytest.approx(
        dict.fromkeys(SITES, composed(2) - composed(1))
    )
    # The second fails having spent nothing: one release spent, none reserved, and a third
    # job fits (it would not if the done job were counted twice).
    federation.run(second, "failed")
    third = federation.submit("global_attribution", cohort=COHORT)
    assert third.state is JobState.QUEUED
    outcomes = [o for o, _ in federation.submissions()]
    assert outcomes == ["queued", "queued", "refused", "refused", "queued"]


@pytest.mark.both_backends
def test_an_answer_from_a_stored_release_reserves_nothing(
    open_federation: Callable[[int], Federation],
) -> None:
    federation = open_federation(2)
    first = federation.submit("feature_stats")
    federation.run(first, "done")
    # The same question is answered from the release, costs nothing and reserves nothing.
    again = federation.submit("feature_stats")
    assert again.state is JobState.DONE and again.from_cache
    assert federation.jobs.reserved() == []
    # So one more release still fits every site...
    other = federation.submit("global_attribution")
    assert other.state is JobState.QUEUED
    # ... and once that is reserved, a cached answer is still given though no further
    # release would fit, while a new question is refused.
    with pytest.raises(BudgetExceededError, match="by 1 queued or running job"):
        federation.submit("global_attribution", cohort=COHORT)
    cached = federation.submit("feature_stats", params={"explain-delta": "1e-06"})
    assert cached.from_cache and cached.release_id == f"r-{first.job_id}"
    assert [r.label for r in federation.jobs.reserved()] == [f"job {other.job_id}"]
    outcomes = [o for o, _ in federation.submissions()]
    assert outcomes == ["queued", "cached", "queued", "refused", "cached"]


@pytest.mark.both_backends
def test_an_influence_job_reserves_every_release_it_needs(
    open_federation: Callable[[int], Federation],
) -> None:
    federation = open_federation(2)
    # A hessian round and the influence round: two releases, the whole budget.
    influence = federation.submit("group_influence")
    assert influence.state is JobState.QUEUED
    # One more release would fit beside one reserved release, not beside two.
    with pytest.raises(BudgetExceededError, match="by 1 queued or running job"):
        federation.submit("feature_stats")
    assert federation.jobs.reserved() == [Reservation(f"job {influence.job_id}", 1.0, JOB_DELTA, 2)]
    # What that holds at each site: the ε of its two releases over nothing spent.
    reserved = federation.jobs.reserved_epsilon()
    assert reserved == pytest.approx(dict.fromkeys(SITES, composed(2)))


class _SlowPricing:
    """Aggregator.check_budgets that takes its time, so that racing submissions overlap
    between reading the reservations and inserting their jobs."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.3)
        self.original(*args, **kwargs)


def _race(federation: Federation, cohorts: tuple[str, ...]) -> list[Job | BudgetExceededError]:
    """Submit a question about each cohort at once, one thread each."""
    start = threading.Barrier(len(cohorts))
    results: list[Job | BudgetExceededError] = []
    lock = threading.Lock()

    def submit(cohort: str) -> None:
        start.wait()
        try:
            outcome: Job | BudgetExceededError = federation.submit(
                "global_attribution", cohort=cohort
            )
        except BudgetExceededError as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=submit, args=(cohort,)) for cohort in cohorts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == len(cohorts)
    return results


COHORTS = ("", '{"mean radius": [0, 12]}', '{"mean radius": [12, 15]}', '{"mean radius": [15, 99]}')


@pytest.mark.both_backends
def test_concurrent_submissions_cannot_both_take_the_last_budget(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    pricing = _SlowPricing(federation.aggregator.check_budgets)
    monkeypatch.setattr(federation.aggregator, "check_budgets", pricing)
    results = _race(federation, COHORTS)
    queued = [r for r in results if isinstance(r, Job)]
    assert len(queued) == 1, results
    assert all(f"reserved ε = {ONE} by 1" in str(r) for r in results if not isinstance(r, Job))
    assert [j.job_id for j in federation.jobs.list_jobs()] == [queued[0].job_id]
    assert sorted(o for o, _ in federation.submissions()) == [
        "queued",
        "refused",
        "refused",
        "refused",
    ]


@pytest.mark.both_backends
def test_the_database_lock_alone_serialises_submissions_of_separate_processes(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the process lock, as for coordinators in separate processes sharing the
    # store: PostgreSQL's advisory lock or SQLite's write lock still orders them.
    monkeypatch.setattr(server.jobs, "_PRICING", contextlib.nullcontext())
    pricing = _SlowPricing(federation.aggregator.check_budgets)
    monkeypatch.setattr(federation.aggregator, "check_budgets", pricing)
    results = _race(federation, COHORTS[:3])
    assert sum(isinstance(r, Job) for r in results) == 1, results


def test_a_refusal_for_reserved_budget_is_resource_exhausted_over_grpc(
    federation: Federation,
) -> None:
    running = serve(federation.aggregator, QueryHandler(federation.store), jobs=federation.jobs)
    try:
        with QueryClient(running.address) as client:
            assert {m.reserved_epsilon for m in client.list_budgets()} == {0.0}
            first = client.submit_job(JobRequest("feature_stats"))
            assert first.state is JobState.QUEUED
            # ListBudgets shows what the queued job holds, as the refusal below names it.
            held = {m.site_id: m.reserved_epsilon for m in client.list_budgets()}
            assert held["site-0"] > 0 and held == federation.jobs.reserved_epsilon()
            with pytest.raises(BudgetExceededError, match=f"site-0 .*reserved ε = {ONE} by 1"):
                client.submit_job(JobRequest("global_attribution"))
            assert [j.job_id for j in client.list_jobs()] == [first.job_id]
    finally:
        running.stop(grace=None)
