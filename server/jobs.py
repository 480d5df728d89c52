"""The coordinator's job queue: analysts' questions, checked, priced and queued.

:meth:`JobQueue.submit` refuses a question before anything is spent when

- it is too large, names an unknown kind (or a second-order one, which only serves
  influence rounds), sets a key an analyst may not set, or its parameters, cohort or
  query input do not pass the same checks the ServerApp applies
  (:func:`server.round_specs.explanation_round_spec`, the kind's ``coordinate_labels``,
  :func:`server.influence_rounds.influence_params`): ``INVALID_ARGUMENT``;
- it asks for a smaller minimum cohort than the coordinator's ``min_cohort_size``:
  ``INVALID_ARGUMENT``;
- some site's mirrored ledger could not pay for every release the job needs on top of
  the releases reserved by the jobs already queued or running
  (:meth:`server.aggregation.Aggregator.check_budgets`): ``RESOURCE_EXHAUSTED`` naming
  the site, its budget, what it has spent and what the pending jobs reserve.

An identical question — same kind, same parameters once defaults are filled in, same
cohort and query input, about the same stored model — is answered with the release of
the earlier job: the new job is ``done`` with ``from_cache`` set, and no round runs, so
nothing is spent. Otherwise the job is ``queued`` until a :class:`server.job_runner.JobRunner`
runs it through the Flower ServerApp, which reports the outcome (:meth:`JobQueue.finish`).

Reservations
------------
A job that is ``queued`` or ``running`` (and was not answered from a stored release)
reserves its releases — ``releases`` Gaussian releases at its ``explain-epsilon`` and
``explain-delta``, read back from its stored run configuration — at every mirrored site,
since a job runs over every site whose ledger the coordinator mirrors when it runs
(:mod:`server.job_app`), whichever model it explains. A new job is priced against each
site's mirrored events composed with every reservation, so two jobs that fit only one at
a time are not both accepted. The reservation ends with the job: once ``done`` its
releases are in the mirrored ledgers (the ServerApp forwards the sites' ledgers after each
round, before it reports the outcome) and are not counted twice; a ``failed`` or
``refused`` job reserves nothing, and what it did spend before it stopped is in the
mirrors too. While a job with several releases runs, those it has made are counted both
in the mirrors and in its reservation: a conservative overestimate until it finishes.

Pricing and inserting a job is one critical section: a process-wide lock serialises the
gRPC worker threads, and inside the transaction a PostgreSQL advisory lock (or, on
SQLite, the database's write lock, taken first) serialises coordinators in other
processes sharing the store. Whatever slips past the mirror, each site's own ledger still
refuses.

Every submission and every refusal is written to the store's audit log. The queue keeps
its own table (``explanation_jobs``) in the store's database, through the public
:class:`~server.storage.Store` API only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import JSON, Boolean, String, Text, false, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from explain import get_kind
from fedlens.datasets import load_dataset
from fedlens.errors import (
    BudgetExceededError,
    ConfigurationError,
    FedlensError,
    NotFoundError,
    StaleRoundError,
)
from fedlens.jobs import Job, JobRequest, JobState
from fedlens.runconfig import INFLUENCE_KINDS, RunConfig, validation_message
from server.aggregation import Aggregator, Reservation
from server.database import UtcDateTime, clip_text, storable
from server.influence_rounds import influence_params
from server.round_specs import explanation_round_spec
from server.storage import StoredModel

__all__ = ["ANALYST_KEYS", "FACTOR_KINDS", "MAX_PARAMS", "MAX_TEXT", "JobQueue"]

logger = logging.getLogger(__name__)

# Run-configuration keys an analyst may set; everything else (dataset, sites, secure
# aggregation, where the aggregator is) belongs to the coordinator.
ANALYST_KEYS = frozenset(
    {
        "explain-method",
        "explain-target",
        "explain-epsilon",
        "explain-delta",
        "attribution-clip",
        "ig-steps",
        "min-cohort-size",
        "influence-method",
        "influence-group-by",
        "influence-k",
        "influence-clip",
        "influence-damping",
        "second-order-clip",
    }
)
# Kinds that release factors for influence rounds rather than answer a question.
#: Kinds that only feed influence rounds: a job may not ask for them.
FACTOR_KINDS = frozenset({"hessian", "kfac", "ekfac"})
MAX_PARAMS = 32
MAX_TEXT = 4096
# States of a job whose releases are still to come: it reserves them at every site.
_PENDING = (JobState.QUEUED.value, JobState.RUNNING.value)
# Serialises pricing and inserting jobs among the threads of this process (every queue,
# since two queues may share one store).
_PRICING = threading.Lock()
# pg_advisory_xact_lock key held while a job is priced and inserted: "fl-jobs" in ASCII.
_PRICING_KEY = int.from_bytes(b"fl-jobs", "big")


class _Base(DeclarativeBase):
    pass


class _JobRow(_Base):
    __tablename__ = "explanation_jobs"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text)
    release_id: Mapped[str] = mapped_column(String(128))
    submitted_by: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    from_cache: Mapped[bool] = mapped_column(Boolean)
    # SHA-256 of the canonical question (kind, parameters, cohort, query, model).
    cache_key: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(String(64))
    # The Flower run configuration that answers the job (RunConfig keys).
    run_config: Mapped[dict[str, Any]] = mapped_column(JSON)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


def _job(row: _JobRow) -> Job:
    return Job(
        job_id=row.job_id,
        kind=row.kind,
        state=JobState(row.state),
        reason=row.reason,
        release_id=row.release_id,
        submitted_by=row.submitted_by,
        created_at=_iso(row.created_at),
        updated_at=_iso(row.updated_at),
        from_cache=row.from_cache,
    )


def _json_object(text: str, what: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigurationError(f"{what} must be a JSON object, got {value!r}")
    return value


def _serialise(session: Session) -> None:
    """Hold, until ``session`` commits, a lock that other processes pricing jobs in the
    same database wait for.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: the database's write lock,
    taken by a write that changes nothing as the transaction's first statement (the
    driver begins the transaction before it), so the reads that follow already see every
    job another process committed.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_PRICING_KEY)))
    else:
        session.execute(
            update(_JobRow)
            .where(false())
            .values(state=_JobRow.state)
            .execution_options(synchronize_session=False)
        )


def _check_size(request: JobRequest) -> None:
    if not request.kind or len(request.kind) > 64:
        raise ConfigurationError("kind must be 1-64 characters, e.g. global_attribution")
    if len(request.params) > MAX_PARAMS:
        raise ConfigurationError(
            f"too many parameters: {len(request.params)}, at most {MAX_PARAMS}"
        )
    for name, text in (
        ("cohort", request.cohort),
        ("query_input", request.query_input),
        *((f"parameter {k[:64]!r}", v) for k, v in request.params.items()),
    ):
        if len(text) > MAX_TEXT:
            raise ConfigurationError(f"{name} is {len(text)} characters long, at most {MAX_TEXT}")


class JobQueue:
    """Analysts' jobs in the coordinator's store.

    Parameters
    ----------
    aggregator
        The coordinator's aggregator: its store holds the jobs, mirrored ledgers and
        models, and its :meth:`~server.aggregation.Aggregator.check_budgets` prices jobs.
    min_cohort_size
        The least number of records a site may sum for a cohort; a job may ask for
        more, never fewer.
    max_limit
        Most jobs one :meth:`list_jobs` returns.
    wall_clock
        Timestamps of jobs and audit rows.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        min_cohort_size: int = 50,
        max_limit: int = 1000,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if min_cohort_size < 1:
            raise ConfigurationError(f"min_cohort_size must be >= 1, got {min_cohort_size}")
        self._aggregator = aggregator
        self._store = aggregator.store
        self._min_cohort = min_cohort_size
        self._max_limit = max_limit
        self._now = wall_clock
        self._store.create_tables(_Base.metadata, "explanation_jobs table")

    # -- analysts ------------------------------------------------------------------

    def submit(
        self, request: JobRequest, *, submitted_by: str, allowance: float | None = None
    ) -> Job:
        """Check, price and queue ``request`` (or answer it from an identical job).

        A job that is not answered from a stored release must fit every site's mirrored
        ledger together with the releases the queued and running jobs reserve (see the
        module docstring); pricing and inserting it is atomic with respect to other
        submissions.

        ``allowance`` caps the ε the submitter's jobs may spend in all, on top of the
        sites' budgets: each job that was not answered from a stored release (and did
        not fail or get refused) counts ``releases * explain-epsilon``, composed
        additively, an upper bound on what it costs any site.

        Raises
        ------
        ConfigurationError
            The request is malformed or too large (see the module docstring).
        NotFoundError
            No trained model is stored yet.
        BudgetExceededError
            Some site's mirrored ledger cannot pay for the job's releases on top of those
            reserved by queued and running jobs, or the job would take the submitter past
            its allowance.
        """
        job_id = uuid.uuid4().hex
        try:
            run, model_id, key, sites = self._plan(request, job_id)
        except FedlensError as exc:
            self._audit(submitted_by, job_id, "refused", f"{request.kind[:64]}: {exc}")
            raise
        try:
            # The lock is released after the session commits, so the next submission
            # sees this job's reservation.
            with _PRICING, self._store.session() as s:
                _serialise(s)
                cached = self._answered(s, key)
                if cached is None:
                    self._aggregator.check_budgets(
                        sites,
                        run.explain_epsilon,
                        run.explain_delta,
                        releases=run.releases,
                        what=f"job {job_id} ({request.kind})",
                        reserved=self._reservations(s),
                    )
                if cached is None and allowance is not None:
                    self._check_allowance(s, submitted_by, allowance, run)
                now = self._now()
                row = _JobRow(
                    job_id=job_id,
                    kind=request.kind,
                    state=(JobState.DONE if cached else JobState.QUEUED).value,
                    reason="",
                    release_id=cached or "",
                    submitted_by=clip_text(submitted_by, 256),
                    created_at=now,
                    updated_at=now,
                    from_cache=cached is not None,
                    cache_key=key,
                    model_id=model_id,
                    run_config=run.to_flower(),
                )
                s.add(row)
                job = _job(row)
        except (BudgetExceededError, ConfigurationError) as exc:
            self._audit(submitted_by, job_id, "refused", f"{request.kind[:64]}: {exc}")
            raise
        if cached is not None:
            detail = f"{request.kind}: answered from release {job.release_id}, nothing spent"
            self._audit(submitted_by, job_id, "cached", detail)
        else:
            self._audit(submitted_by, job_id, "queued", f"{request.kind} on model {model_id}")
        return job

    @staticmethod
    def _cost(run: RunConfig) -> float:
        return run.releases * run.explain_epsilon

    @staticmethod
    def _reservations(session: Session) -> list[Reservation]:
        """What the queued and running jobs will release, oldest first."""
        rows = session.execute(
            select(_JobRow.job_id, _JobRow.run_config)
            .where(_JobRow.state.in_(_PENDING), _JobRow.from_cache.is_(False))
            .order_by(_JobRow.created_at)
        ).all()
        reservations = []
        for job_id, config in rows:
            run = RunConfig.from_flower(config)
            reservations.append(
                Reservation(f"job {job_id}", run.explain_epsilon, run.explain_delta, run.releases)
            )
        return reservations

    def reserved(self) -> list[Reservation]:
        """The releases the queued and running jobs reserve at every mirrored site."""
        with self._store.session() as s:
            return self._reservations(s)

    def reserved_epsilon(self) -> dict[str, float]:
        """The ε the queued and running jobs reserve at each mirrored site, by site id
        (:meth:`server.aggregation.Aggregator.reserved_epsilon`)."""
        return self._aggregator.reserved_epsilon(self.reserved())

    def _check_allowance(
        self, session: Session, submitted_by: str, allowance: float, run: RunConfig
    ) -> None:
        rows = session.scalars(
            select(_JobRow).where(
                _JobRow.submitted_by == clip_text(submitted_by, 256),
                _JobRow.from_cache.is_(False),
                _JobRow.state.in_(
                    [JobState.QUEUED.value, JobState.RUNNING.value, JobState.DONE.value]
                ),
            )
        ).all()
        used = sum(self._cost(RunConfig.from_flower(r.run_config)) for r in rows)
        needed = self._cost(run)
        if used + needed > allowance * (1 + 1e-12):
            raise BudgetExceededError(
                f"{submitted_by}'s allowance is ε = {allowance:g}: {len(rows)} job(s) took "
                f"ε = {used:g} and this one needs ε = {needed:g} "
                f"({run.releases} release(s) at ε = {run.explain_epsilon:g}). Nothing was spent"
            )

    def get(self, job_id: str) -> Job:
        with self._store.session() as s:
            row = s.get(_JobRow, job_id) if storable(job_id) and len(job_id) <= 32 else None
            if row is None:
                raise NotFoundError(f"no job {job_id[:64]!r}")
            return _job(row)

    def list_jobs(self, *, limit: int = 0, state: str = "") -> list[Job]:
        """Jobs, newest first (only those in ``state`` if given)."""
        limit = self._max_limit if limit <= 0 else min(limit, self._max_limit)
        query = select(_JobRow).order_by(_JobRow.created_at.desc()).limit(limit)
        if state:
            query = query.where(_JobRow.state == JobState.parse(state).value)
        with self._store.session() as s:
            return [_job(r) for r in s.scalars(query)]

    # -- the runner ----------------------------------------------------------------

    def claim_next(self) -> tuple[Job, dict[str, Any]] | None:
        """Mark the oldest queued job running; it and its Flower run configuration.

        ``None`` if nothing is queued. A job is claimed once, even by racing runners. A
        queued job whose twin (an identical question) was answered while it waited is
        answered from the twin's release instead, with no run.
        """
        answered: list[tuple[str, str]] = []
        job: Job | None = None
        config: dict[str, Any] = {}
        with self._store.session() as s:
            while job is None:
                row = s.scalars(
                    select(_JobRow)
                    .where(_JobRow.state == JobState.QUEUED.value)
                    .order_by(_JobRow.created_at)
                    .limit(1)
                ).first()
                if row is None:
                    break
                twin = self._answered(s, row.cache_key)
                values: dict[str, Any] = {"state": JobState.RUNNING.value}
                if twin is not None:
                    values = {"state": JobState.DONE.value, "release_id": twin, "from_cache": True}
                # Only one runner's update finds the job still queued.
                claimed = s.execute(
                    update(_JobRow)
                    .where(_JobRow.job_id == row.job_id, _JobRow.state == JobState.QUEUED.value)
                    .values(updated_at=self._now(), **values)
                    .execution_options(synchronize_session=False)
                )
                if getattr(claimed, "rowcount", 0) != 1:
                    continue
                if twin is not None:
                    answered.append((row.job_id, twin))
                    continue
                s.refresh(row)
                config = dict(row.run_config) | {"job-id": row.job_id, "job-model-id": row.model_id}
                job = _job(row)
        for job_id, release_id in answered:
            self._audit("runner", job_id, "cached", f"answered from release {release_id}", run=True)
        if job is None:
            return None
        self._audit("runner", job.job_id, "running", job.kind, run=True)
        return job, config

    @staticmethod
    def _answered(s: Session, cache_key: str) -> str | None:
        """The release of the first done job with this question, if any."""
        return s.scalars(
            select(_JobRow.release_id)
            .where(_JobRow.cache_key == cache_key, _JobRow.state == JobState.DONE.value)
            .where(_JobRow.release_id != "")
            .order_by(_JobRow.created_at)
            .limit(1)
        ).first()

    def finish(
        self, job_id: str, *, release_id: str = "", reason: str = "", refused: bool = False
    ) -> Job:
        """Record the outcome of a running job: ``done`` with ``release_id``, else
        ``refused`` (nothing spent) or ``failed`` with ``reason``.

        Raises
        ------
        NotFoundError
            No such job, or ``release_id`` names no stored release.
        StaleRoundError
            The job is not running (it finished already, or never started).
        """
        if release_id:
            self._store.get_release(release_id)  # NotFoundError if it is not stored
        with self._store.session() as s:
            row = s.get(_JobRow, job_id) if storable(job_id) and len(job_id) <= 32 else None
            if row is None:
                raise NotFoundError(f"no job {job_id[:64]!r}")
            if row.state != JobState.RUNNING.value:
                raise StaleRoundError(f"job {job_id} is {row.state}, not running")
            state = (
                JobState.DONE if release_id else JobState.REFUSED if refused else JobState.FAILED
            )
            row.state = state.value
            row.release_id = release_id
            row.reason = clip_text(reason or ("" if release_id else "no reason given"), 2000)
            row.updated_at = self._now()
            job = _job(row)
        self._audit("runner", job_id, state.value, release_id or reason, run=True)
        return job

    # -- checks --------------------------------------------------------------------

    def _plan(self, request: JobRequest, job_id: str) -> tuple[RunConfig, str, str, list[str]]:
        """The job's run configuration, model id, cache key and sites; refusals raise.

        The job is priced later, against the reservations of the other jobs, by
        :meth:`submit`.
        """
        _check_size(request)
        kind = request.kind
        get_kind(kind)  # ConfigurationError naming the available kinds
        if kind in FACTOR_KINDS:
            raise ConfigurationError(
                f"{kind} releases factors for influence rounds; ask for an influence kind "
                f"({', '.join(sorted(INFLUENCE_KINDS))}) instead"
            )
        unknown = sorted(set(request.params) - ANALYST_KEYS)
        if unknown:
            raise ConfigurationError(
                f"parameter {unknown[0][:64]!r} cannot be set by a job; "
                f"accepted: {', '.join(sorted(ANALYST_KEYS))}"
            )
        cohort = _json_object(request.cohort, "cohort")
        query = _json_object(request.query_input, "query_input")
        if cohort is not None and kind != "global_attribution":
            raise ConfigurationError(f"a cohort applies to global_attribution only, not {kind}")
        if query is not None and kind not in INFLUENCE_KINDS:
            raise ConfigurationError(f"a query input applies to influence kinds only, not {kind}")
        stored = self._store.latest_model()
        sites = sorted(m.site_id for m in self._store.site_ledgers())
        if len(sites) < 2:
            raise ConfigurationError(
                f"{len(sites)} site(s) have reported a ledger; a job needs at least 2 "
                "(train the federation first)"
            )
        run = self._run_config(request, stored, sites)
        if run.influence_method == "tracin" and kind in INFLUENCE_KINDS:
            raise ConfigurationError(
                "influence-method tracin needs the global models of the training rounds, "
                "which a job does not have; use auto, hessian, kfac or ekfac"
            )
        dataset = load_dataset(stored.dataset, seed=run.seed)
        if kind in INFLUENCE_KINDS:
            influence_params(run, dataset, sites)
        else:
            explanation_round_spec(run, dataset.preprocessor, sites, round_id=f"job-{job_id}")
        canonical = {
            "kind": kind,
            "params": {k: v for k, v in run.to_flower().items() if k in ANALYST_KEYS},
            "cohort": cohort,
            "query_input": query,
            "model_id": stored.model_id,
        }
        key = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
        return run, stored.model_id, key, sites

    def _run_config(self, request: JobRequest, stored: StoredModel, sites: list[str]) -> RunConfig:
        min_cohort = request.params.get("min-cohort-size", str(self._min_cohort))
        if min_cohort.strip().isdigit() and int(min_cohort) < self._min_cohort:
            raise ConfigurationError(
                f"min-cohort-size {int(min_cohort)} is below the coordinator's minimum "
                f"cohort size of {self._min_cohort}"
            )
        values: dict[str, object] = {
            "dataset": stored.dataset,
            "model": stored.model,
            "num-sites": len(sites),
            "min-cohort-size": self._min_cohort,
            **{k: v for k, v in stored.params.items() if k == "seed"},
            "num-server-rounds": stored.params.get("rounds", "1"),
            "explain-kind": request.kind,
            **request.params,
            "explain-cohort": request.cohort,
            "influence-query": request.query_input,
        }
        try:
            return RunConfig.model_validate(values)
        except ValidationError as exc:
            raise ConfigurationError(validation_message("job", exc)) from None

    def _audit(
        self, actor: str, job_id: str, outcome: str, detail: str, *, run: bool = False
    ) -> None:
        try:
            self._store.audit(
                now=self._now(),
                actor=actor,
                action="run_job" if run else "submit_job",
                outcome=outcome,
                round_id=f"job-{job_id}",
                detail=detail,
            )
        except FedlensError:  # pragma: no cover - the outcome stands even if auditing fails
            logger.exception("could not audit job %s", job_id)
