"""The coordinator's store: rounds, releases with their privacy costs, trained global
models, and an audit log.

SQLAlchemy 2 over a SQLite file by default, or PostgreSQL by URL: what differs between
the two is in :mod:`server.database`, and how an older database is upgraded in
:mod:`server.schema`. The store never holds a site's vector, masked or not: only round
metadata, released (post-processed, noised) values and what each site declared the
release cost it.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from fedlens.errors import ConfigurationError, IntegrityError, NotFoundError, StorageError
from fedlens.identity import check_site_id
from fedlens.types import (
    PrivacyCost,
    Release,
    ReleasedValue,
    ReleaseSummary,
    RoundSpec,
    SiteLedger,
)
from privacy import LedgerEvent
from server.database import UtcDateTime, clip_text, open_engine, storable
from server.schema import upgrade

__all__ = ["AuditEntry", "Store", "StoredModel"]


class _Base(DeclarativeBase):
    pass


class _RoundRow(_Base):
    __tablename__ = "rounds"

    round_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    site_ids: Mapped[list[str]] = mapped_column(JSON)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    phase: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    release_id: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class _ReleaseRow(_Base):
    __tablename__ = "releases"

    release_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.round_id"), unique=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    noised_count: Mapped[float] = mapped_column(Float)
    values: Mapped[list[list[Any]]] = mapped_column(JSON)
    grouped: Mapped[list[list[Any]]] = mapped_column(JSON)
    params: Mapped[dict[str, str]] = mapped_column(JSON)
    costs: Mapped[list[_CostRow]] = relationship(
        back_populates="release", cascade="all, delete-orphan", order_by="_CostRow.site_id"
    )


_RELEASE_COUNT = select(func.count()).select_from(_ReleaseRow)


class _CostRow(_Base):
    __tablename__ = "release_costs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.release_id"), index=True)
    site_id: Mapped[str] = mapped_column(String(128))
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    epsilon_total: Mapped[float] = mapped_column(Float)
    release: Mapped[_ReleaseRow] = relationship(back_populates="costs")


class _AuditRow(_Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    round_id: Mapped[str] = mapped_column(String(128), default="")
    outcome: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")


class _SiteLedgerRow(_Base):
    __tablename__ = "site_ledgers"

    site_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    budget_epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class _SiteLedgerEventRow(_Base):
    """A mirrored ledger event; ``seq`` is its position in the site's ledger, from 0."""

    __tablename__ = "site_ledger_events"
    __table_args__ = (
        Index("uq_site_ledger_events_position", "site_id", "seq", unique=True),  # version 2
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("site_ledgers.site_id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sampling_rate: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(64))


class _ModelRow(_Base):
    """A trained global model: its weights as ``torch.save`` bytes of the state dict."""

    __tablename__ = "models"

    model_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    dataset: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(64))
    state: Mapped[bytes] = mapped_column(LargeBinary)
    params: Mapped[dict[str, str]] = mapped_column(JSON)


@dataclass(frozen=True, eq=False)
class StoredModel:
    """A trained global model read back from the store.

    Attributes
    ----------
    model_id
        Its id in the store.
    created_at
        RFC 3339 time it was stored.
    dataset, model
        Registry names of its dataset and architecture (:func:`fedlens.models.build_model`).
    state
        Its ``state_dict``, tensors on the CPU.
    params
        What it was trained with (seed, rounds, ε, ...), as strings.
    """

    model_id: str
    created_at: str
    dataset: str
    model: str
    state: Mapping[str, torch.Tensor]
    params: Mapping[str, str]


class AuditEntry:
    """One audit-log line, read back."""

    __slots__ = ("action", "actor", "at", "detail", "outcome", "round_id")

    def __init__(
        self, at: datetime, actor: str, action: str, round_id: str, outcome: str, detail: str
    ) -> None:
        self.at, self.actor, self.action = at, actor, action
        self.round_id, self.outcome, self.detail = round_id, outcome, detail

    def __repr__(self) -> str:
        return f"AuditEntry({self.action} by {self.actor} on {self.round_id}: {self.outcome})"


class Store:
    """Persistent state of the coordinator.

    Parameters
    ----------
    url
        A SQLAlchemy URL: ``sqlite:///path/to/fedlens.db`` (the default in settings) or
        ``postgresql+psycopg://...``. Opening creates the tables of a new database and
        upgrades an older one (:mod:`server.schema`).

    Raises
    ------
    StorageError
        The URL is unusable, the database cannot be reached, or its schema is from a
        newer fedlens.
    """

    def __init__(self, url: str) -> None:
        self._engine: Engine = open_engine(url)
        try:
            upgrade(self._engine, _Base.metadata)  # see server.schema
        except StorageError:
            self._engine.dispose()
            raise

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for modules that keep their own tables in this store."""
        return self._engine

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session in one transaction; SQLAlchemy errors become StorageError."""
        try:
            with Session(self._engine) as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise StorageError(f"store operation failed: {exc}") from exc

    def create_tables(self, metadata: MetaData, what: str) -> None:
        """Create another module's tables in this store's database (same engine, pragmas)."""
        try:
            metadata.create_all(self._engine)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot create the {what}: {exc}") from exc

    # -- rounds ------------------------------------------------------------------

    def save_round(self, spec: RoundSpec, phase: str, *, now: datetime) -> None:
        if not 0 < len(spec.round_id) <= 128 or not storable(spec.round_id):
            raise ConfigurationError(
                f"round id {spec.round_id[:64]!r} must be 1-128 characters, none of them NUL"
            )
        with self.session() as s:
            s.add(
                _RoundRow(
                    round_id=spec.round_id,
                    kind=spec.kind,
                    site_ids=list(spec.site_ids),
                    spec={
                        "length": spec.length,
                        "bits": spec.bits,
                        "scale": spec.scale,
                        "clip_bound": spec.clip_bound,
                        "labels": list(spec.labels),
                        "phase_timeout_s": spec.phase_timeout_s,
                        "params": dict(spec.params),
                        "threshold": spec.threshold,
                        "degree": spec.degree,
                        "noise": spec.noise,
                        "colluding": spec.colluding,
                    },
                    phase=phase,
                    reason="",
                    release_id="",
                    created_at=now,
                    updated_at=now,
                )
            )

    def update_round(
        self, round_id: str, phase: str, *, now: datetime, reason: str = "", release_id: str = ""
    ) -> None:
        with self.session() as s:
            row = s.get(_RoundRow, round_id) if storable(round_id) else None
            if row is None:
                raise NotFoundError(f"no round {round_id!r}")
            row.phase, row.reason, row.updated_at = phase, clip_text(reason), now
            if release_id:
                row.release_id = release_id

    def unfinished_rounds(self) -> list[RoundSpec]:
        """Specs of every round that neither completed nor aborted, oldest first."""
        with self.session() as s:
            rows = s.scalars(
                select(_RoundRow)
                .where(_RoundRow.phase.not_in(("complete", "aborted")))
                .order_by(_RoundRow.created_at)
            ).all()
            return [_spec_from_row(row) for row in rows]

    def round_exists(self, round_id: str) -> bool:
        if not storable(round_id):
            return False
        with self.session() as s:
            return s.get(_RoundRow, round_id) is not None

    def round_phase(self, round_id: str) -> tuple[str, str, str]:
        """``(phase, reason, release_id)`` of a stored round."""
        with self.session() as s:
            row = s.get(_RoundRow, round_id) if storable(round_id) else None
            if row is None:
                raise NotFoundError(f"no round {round_id!r}")
            return row.phase, row.reason, row.release_id

    # -- releases ----------------------------------------------------------------

    def save_release(self, release: Release, *, created_at: datetime) -> None:
        with self.session() as s:
            s.add(
                _ReleaseRow(
                    release_id=release.release_id,
                    round_id=release.round_id,
                    kind=release.kind,
                    created_at=created_at,
                    noised_count=release.noised_count,
                    values=[[v.name, v.value, v.noise_std] for v in release.values],
                    grouped=[[v.name, v.value, v.noise_std] for v in release.grouped],
                    params=dict(release.params),
                    costs=[
                        _CostRow(
                            site_id=c.site_id,
                            epsilon=c.epsilon,
                            delta=c.delta,
                            epsilon_total=c.epsilon_total,
                        )
                        for c in release.costs
                    ],
                )
            )

    def get_release(self, release_id: str) -> Release:
        with self.session() as s:
            row = s.get(_ReleaseRow, release_id) if storable(release_id) else None
            if row is None:
                raise NotFoundError(f"no release {release_id!r}")
            return _release_from_row(row)

    def release_version(self) -> int:
        """How many releases the database holds: a version of the set of releases.

        Releases are never changed or deleted once saved, so this number grows with every
        release saved by any process or :class:`Store` on the database, and an unchanged
        number means an unchanged set. One cheap query, for caches of release listings
        (:class:`server.query_handler.QueryHandler`) to compare against.
        """
        try:
            with self._engine.connect() as conn:
                return int(conn.execute(_RELEASE_COUNT).scalar_one())
        except SQLAlchemyError as exc:
            raise StorageError(f"store operation failed: {exc}") from exc

    def list_releases(self, *, limit: int = 100, kind: str = "") -> list[ReleaseSummary]:
        """Newest first; one query reading only the summary columns and each cost count
        (the released values stay in the database)."""
        if not storable(kind):
            return []
        sites = (
            select(_CostRow.release_id, func.count().label("num_sites"))
            .group_by(_CostRow.release_id)
            .subquery()
        )
        query = (
            select(
                _ReleaseRow.release_id,
                _ReleaseRow.round_id,
                _ReleaseRow.kind,
                _ReleaseRow.created_at,
                func.coalesce(sites.c.num_sites, 0),
            )
            .outerjoin(sites, sites.c.release_id == _ReleaseRow.release_id)
            .order_by(_ReleaseRow.created_at.desc())
            .limit(limit)
        )
        if kind:
            query = query.where(_ReleaseRow.kind == kind)
        with self.session() as s:
            return [
                ReleaseSummary(
                    release_id=release_id,
                    round_id=round_id,
                    kind=row_kind,
                    created_at=_iso(created_at),
                    num_sites=int(num_sites),
                )
                for release_id, round_id, row_kind, created_at, num_sites in s.execute(query)
            ]

    # -- mirrored site ledgers -------------------------------------------------------

    def mirror_ledger(self, ledger: SiteLedger, *, now: datetime) -> int:
        """Extend the mirror of ``ledger.site_id`` with the events it does not hold yet.

        The mirror is append-only: the report must carry every mirrored event, unchanged
        and in order, followed by any new ones. Returns the number of events appended.

        Raises
        ------
        ConfigurationError
            The site id is not a valid site id, or an event's label holds a NUL character;
            nothing is stored.
        IntegrityError
            The report changes the site's budget or δ, or drops or rewrites a mirrored
            event; nothing is stored.
        """
        check_site_id(ledger.site_id)
        for e in ledger.events:
            if not storable(e.label):
                raise ConfigurationError(f"a ledger event's label holds a NUL: {e.label!r}")
        with self.session() as s:
            # Held until the commit on PostgreSQL, so reports of one site extend it in turn.
            row = s.get(_SiteLedgerRow, ledger.site_id, with_for_update=True)
            if row is None:
                row = _SiteLedgerRow(
                    site_id=ledger.site_id,
                    budget_epsilon=ledger.budget_epsilon,
                    delta=ledger.delta,
                    updated_at=now,
                )
                s.add(row)
                s.flush()
            elif (row.budget_epsilon, row.delta) != (ledger.budget_epsilon, ledger.delta):
                raise IntegrityError(
                    f"site {ledger.site_id} reported budget ε = {ledger.budget_epsilon:g}, "
                    f"δ = {ledger.delta:g}; its mirrored ledger has ε = "
                    f"{row.budget_epsilon:g}, δ = {row.delta:g}"
                )
            stored = [_event_from_row(r) for r in s.scalars(_events_query(ledger.site_id))]
            if list(ledger.events[: len(stored)]) != stored:
                raise IntegrityError(
                    f"site {ledger.site_id} reported {len(ledger.events)} ledger events that "
                    f"do not extend the {len(stored)} already mirrored: a ledger is append-only"
                )
            new = ledger.events[len(stored) :]
            for seq, e in enumerate(new, start=len(stored)):
                s.add(
                    _SiteLedgerEventRow(
                        site_id=ledger.site_id,
                        seq=seq,
                        kind=e.kind,
                        noise_multiplier=e.noise_multiplier,
                        sampling_rate=e.sampling_rate,
                        steps=e.steps,
                        label=e.label,
                        created_at=e.created_at.isoformat(),
                    )
                )
            row.updated_at = now
            return len(new)

    def site_ledgers(self, *, site_id: str = "") -> list[SiteLedger]:
        """The mirrored ledgers (all, or one site's), events oldest first; ε not computed."""
        if not storable(site_id):
            return []
        with self.session() as s:
            query = select(_SiteLedgerRow).order_by(_SiteLedgerRow.site_id)
            if site_id:
                query = query.where(_SiteLedgerRow.site_id == site_id)
            return [
                SiteLedger(
                    site_id=row.site_id,
                    budget_epsilon=row.budget_epsilon,
                    delta=row.delta,
                    events=tuple(_event_from_row(r) for r in s.scalars(_events_query(row.site_id))),
                )
                for row in s.scalars(query)
            ]

    # -- trained models ------------------------------------------------------------

    def save_model(
        self,
        *,
        dataset: str,
        model: str,
        state: Mapping[str, torch.Tensor],
        now: datetime,
        params: Mapping[str, str] | None = None,
        model_id: str = "",
    ) -> str:
        """Store a trained global model's weights; returns its id (a new one if empty).

        The global model is the output of DP-SGD training, so storing and serving it
        costs no further privacy.
        """
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
        model_id = model_id or uuid.uuid4().hex
        with self.session() as s:
            s.add(
                _ModelRow(
                    model_id=model_id,
                    created_at=now,
                    dataset=dataset,
                    model=model,
                    state=buffer.getvalue(),
                    params={str(k): str(v) for k, v in (params or {}).items()},
                )
            )
        return model_id

    def get_model(self, model_id: str) -> StoredModel:
        """The stored model ``model_id``; :class:`NotFoundError` if there is none."""
        with self.session() as s:
            row = s.get(_ModelRow, model_id) if storable(model_id) else None
            if row is None:
                raise NotFoundError(f"no model {model_id!r}")
            return _model_from_row(row)

    def latest_model(self, *, dataset: str = "") -> StoredModel:
        """The most recently stored model (of ``dataset``, if given).

        Raises
        ------
        NotFoundError
            No model is stored yet (training has not finished, or never stored one).
        """
        with self.session() as s:
            query = select(_ModelRow).order_by(_ModelRow.created_at.desc()).limit(1)
            if dataset:
                query = query.where(_ModelRow.dataset == dataset)
            row = s.scalars(query).first() if storable(dataset) else None
            if row is None:
                scope = f" for dataset {dataset!r}" if dataset else ""
                raise NotFoundError(f"no trained model is stored{scope} yet")
            return _model_from_row(row)

    # -- audit ---------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction on the store's engine, for modules that keep their own tables
        in it and write them with SQLAlchemy Core (cheaper than the ORM per commit)."""
        try:
            with self._engine.begin() as connection:
                yield connection
        except SQLAlchemyError as exc:
            raise StorageError(f"store operation failed: {exc}") from exc

    @staticmethod
    def add_audit(
        connection: Connection,
        *,
        now: datetime,
        actor: str,
        action: str,
        outcome: str,
        round_id: str = "",
        detail: str = "",
    ) -> None:
        """Add an audit row inside ``connection``'s transaction (see :meth:`transaction`).

        Text longer than its column is cut and a NUL is written ``\\x00``: a refusal of a
        malformed request is audited with what it carried, on every backend.
        """
        connection.execute(
            insert(_AuditRow),
            {
                "at": now,
                "actor": clip_text(actor, 128),
                "action": clip_text(action, 64),
                "round_id": clip_text(round_id, 128),
                "outcome": clip_text(outcome, 64),
                "detail": clip_text(detail, 2000),
            },
        )

    def audit(
        self,
        *,
        now: datetime,
        actor: str,
        action: str,
        outcome: str,
        round_id: str = "",
        detail: str = "",
    ) -> None:
        with self.transaction() as connection:
            self.add_audit(
                connection,
                now=now,
                actor=actor,
                action=action,
                outcome=outcome,
                round_id=round_id,
                detail=detail,
            )

    def audit_entries(self, *, round_id: str = "") -> list[AuditEntry]:
        with self.session() as s:
            query = select(_AuditRow).order_by(_AuditRow.id)
            if round_id:  # as add_audit stored it
                query = query.where(_AuditRow.round_id == clip_text(round_id, 128))
            return [
                AuditEntry(r.at, r.actor, r.action, r.round_id, r.outcome, r.detail)
                for r in s.scalars(query)
            ]

    def dump(self) -> dict[str, Sequence[dict[str, Any]]]:
        """Every row of every table, for inspection (tests, support bundles)."""
        out: dict[str, Sequence[dict[str, Any]]] = {}
        with self._engine.connect() as conn:
            for table in _Base.metadata.sorted_tables:
                out[table.name] = [dict(r._mapping) for r in conn.execute(table.select())]
        return out


def _spec_from_row(row: _RoundRow) -> RoundSpec:
    spec = row.spec
    return RoundSpec(
        round_id=row.round_id,
        kind=row.kind,
        site_ids=tuple(row.site_ids),
        length=int(spec["length"]),
        bits=int(spec["bits"]),
        scale=float(spec["scale"]),
        clip_bound=float(spec["clip_bound"]),
        labels=tuple(spec["labels"]),
        phase_timeout_s=float(spec["phase_timeout_s"]),
        params=dict(spec["params"]),
        threshold=int(spec.get("threshold", 0)),
        degree=int(spec.get("degree", 0)),
        noise=str(spec.get("noise", "local")),
        colluding=int(spec.get("colluding", 0)),
    )


def _events_query(site_id: str) -> Any:
    return (
        select(_SiteLedgerEventRow)
        .where(_SiteLedgerEventRow.site_id == site_id)
        .order_by(_SiteLedgerEventRow.seq)
    )


def _event_from_row(row: _SiteLedgerEventRow) -> LedgerEvent:
    return LedgerEvent.from_dict(
        {
            "kind": row.kind,
            "noise_multiplier": row.noise_multiplier,
            "sampling_rate": row.sampling_rate,
            "steps": row.steps,
            "label": row.label,
            "created_at": row.created_at,
        }
    )


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="seconds")


def _release_from_row(row: _ReleaseRow) -> Release:
    return Release(
        release_id=row.release_id,
        round_id=row.round_id,
        kind=row.kind,
        created_at=_iso(row.created_at),
        noised_count=row.noised_count,
        values=tuple(ReleasedValue(n, float(v), float(sd)) for n, v, sd in row.values),
        grouped=tuple(ReleasedValue(n, float(v), float(sd)) for n, v, sd in row.grouped),
        costs=tuple(
            PrivacyCost(
                site_id=c.site_id,
                epsilon=c.epsilon,
                delta=c.delta,
                epsilon_total=c.epsilon_total,
            )
            for c in row.costs
        ),
        params=dict(row.params),
    )


def _model_from_row(row: _ModelRow) -> StoredModel:
    try:
        state = torch.load(io.BytesIO(row.state), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StorageError(f"model {row.model_id!r} has unreadable weights: {exc}") from exc
    if not isinstance(state, dict):
        raise StorageError(f"model {row.model_id!r} holds no state dict")
    return StoredModel(
        model_id=row.model_id,
        created_at=_iso(row.created_at),
        dataset=row.dataset,
        model=row.model,
        state=state,
        params=dict(row.params),
    )
