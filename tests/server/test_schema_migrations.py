"""Opening a store upgrades an older database in place and refuses a newer one.

Version 1 is the schema the store had before it recorded versions; it is rebuilt here by
hand, as an older fedlens left it, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    text,
)
from sqlalchemy.engine import Engine

from fedlens.errors import StorageError
from fedlens.types import PrivacyCost, ReleasedValue, SiteLedger
from privacy import LedgerEvent
from server.access import AccessControl, Role
from server.identities import IdentityRegistry
from server.round_journal import RoundJournal
from server.schema import SCHEMA_VERSION, schema_version
from server.storage import Store

pytestmark = pytest.mark.both_backends

T0 = datetime(2024, 11, 5, 9, 30, tzinfo=UTC)
KEY = bytes(range(32))


def version_1() -> MetaData:
    """The tables of schema version 1, as the store, the round journal and the identity
    registry created them."""
    m = MetaData()
    at = DateTime(timezone=True)
    Table(
        "rounds",
        m,
        Column("round_id", String(128), primary_key=True),
        Column("kind", String(64), nullable=False),
        Column("site_ids", JSON, nullable=False),
        Column("spec", JSON, nullable=False),
        Column("phase", String(16), nullable=False),
        Column("reason", Text, nullable=False),
        Column("release_id", String(64), nullable=False),
        Column("created_at", at, nullable=False),
        Column("updated_at", at, nullable=False),
    )
    Table(
        "releases",
        m,
        Column("release_id", String(64), primary_key=True),
        Column("round_id", ForeignKey("rounds.round_id"), unique=True, nullable=False),
        Column("kind", String(64), index=True, nullable=False),
        Column("created_at", at, index=True, nullable=False),
        Column("noised_count", Float, nullable=False),
        Column("values", JSON, nullable=False),
        Column("grouped", JSON, nullable=False),
        Column("params", JSON, nullable=False),
    )
    Table(
        "release_costs",
        m,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("release_id", ForeignKey("releases.release_id"), index=True, nullable=False),
        Column("site_id", String(128), nullable=False),
        Column("epsilon", Float, nullable=False),
        Column("delta", Float, nullable=False),
        Column("epsilon_total", Float, nullable=False),
    )
    Table(
        "audit_log",
        m,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("at", at, index=True, nullable=False),
        Column("actor", String(128), nullable=False),
        Column("action", String(64), nullable=False),
        Column("round_id", String(128), nullable=False),
        Column("outcome", String(64), nullable=False),
        Column("detail", Text, nullable=False),
    )
    Table(
        "site_ledgers",
        m,
        Column("site_id", String(128), primary_key=True),
        Column("budget_epsilon", Float, nullable=False),
        Column("delta", Float, nullable=False),
        Column("updated_at", at, nullable=False),
    )
    Table(
        "site_ledger_events",
        m,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("site_id", ForeignKey("site_ledgers.site_id"), index=True, nullable=False),
        Column("seq", Integer, nullable=False),
        Column("kind", String(32), nullable=False),
        Column("noise_multiplier", Float, nullable=False),
        Column("sampling_rate", Float, nullable=False),
        Column("steps", Integer, nullable=False),
        Column("label", Text, nullable=False),
        Column("created_at", String(64), nullable=False),
    )
    Table(
        "models",
        m,
        Column("model_id", String(64), primary_key=True),
        Column("created_at", at, index=True, nullable=False),
        Column("dataset", String(64), index=True, nullable=False),
        Column("model", String(64), nullable=False),
        Column("state", LargeBinary, nullable=False),
        Column("params", JSON, nullable=False),
    )
    Table(
        "round_journal",
        m,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("round_id", String(128), index=True, nullable=False),
        Column("at", Float, nullable=False),
        Column("site_id", String(128), nullable=False),
        Column("action", String(32), nullable=False),
        Column("payload", JSON, nullable=False),
    )
    Table(
        "round_sums",
        m,
        Column("round_id", String(128), primary_key=True),
        Column("running_sum", LargeBinary, nullable=False),
    )
    Table(
        "site_identities",
        m,
        Column("site_id", String(128), primary_key=True),
        Column("public_key", LargeBinary(32), nullable=False),
        Column("enrolled_at", at, nullable=False),
        Column("updated_at", at, nullable=False),
    )
    return m


def ledger_event(seq: int, label: str) -> dict[str, object]:
    return {
        "site_id": "site-a",
        "seq": seq,
        "kind": "gaussian",
        "noise_multiplier": 2.0 + seq,
        "sampling_rate": 1.0,
        "steps": 1,
        "label": label,
        "created_at": (T0 + timedelta(hours=seq)).isoformat(),
    }


@pytest.fixture
def old_database(database_url: str) -> Iterator[Engine]:
    """A database an older fedlens filled: a finished round with its release, a mirrored
    ledger, an enrolled site, an audit row and an open round's journal."""
    engine = create_engine(database_url)
    tables = version_1()
    tables.create_all(engine)
    t = tables.tables
    with engine.begin() as c:
        c.execute(
            t["rounds"].insert(),
            [
                {
                    "round_id": round_id,
                    "kind": "global_attribution",
                    "site_ids": ["site-a", "site-b"],
                    "spec": {
                        "length": 3,
                        "bits": 40,
                        "scale": 65536.0,
                        "clip_bound": 0.5,
                        "labels": ["age", "sex"],
                        "phase_timeout_s": 60.0,
                        "params": {},
                    },
                    "phase": phase,
                    "reason": "",
                    "release_id": release_id,
                    "created_at": T0,
                    "updated_at": T0,
                }
                for round_id, phase, release_id in (
                    ("r-1", "complete", "rel-1"),
                    ("r-2", "collecting", ""),
                )
            ],
        )
        c.execute(
            t["releases"].insert(),
            {
                "release_id": "rel-1",
                "round_id": "r-1",
                "kind": "global_attribution",
                "created_at": T0,
                "noised_count": 199.5,
                "values": [["age", 0.25, 0.01], ["sex", -0.5, 0.01]],
                "grouped": [],
                "params": {"method": "integrated_gradients"},
            },
        )
        c.execute(
            t["release_costs"].insert(),
            [
                {
                    "release_id": "rel-1",
                    "site_id": s,
                    "epsilon": 0.5,
                    "delta": 1e-6,
                    "epsilon_total": 1.0,
                }
                for s in ("site-a", "site-b")
            ],
        )
        c.execute(
            t["site_ledgers"].insert(),
            {"site_id": "site-a", "budget_epsilon": 4.0, "delta": 1e-5, "updated_at": T0},
        )
        # The second report of event 1 raced the first and stored it twice (version 1
        # had nothing against it); the upgrade keeps one.
        c.execute(
            t["site_ledger_events"].insert(),
            [
                ledger_event(0, "training"),
                ledger_event(1, "round r-1"),
                ledger_event(1, "round r-1"),
            ],
        )
        c.execute(
            t["site_identities"].insert(),
            {"site_id": "site-a", "public_key": KEY, "enrolled_at": T0, "updated_at": T0},
        )
        c.execute(
            t["audit_log"].insert(),
            {
                "at": T0,
                "actor": "admin",
                "action": "enroll_identity",
                "round_id": "",
                "outcome": "enrolled",
                "detail": "site 'site-a'",
            },
        )
        c.execute(
            t["round_journal"].insert(),
            {"round_id": "r-2", "at": 1.5, "site_id": "", "action": "open", "payload": {}},
        )
        c.execute(t["round_sums"].insert(), {"round_id": "r-2", "running_sum": b"\xff" * 24})
    yield engine
    engine.dispose()


def test_an_old_database_is_upgraded_and_keeps_everything(old_database: Engine) -> None:
    url = old_database.url.render_as_string(hide_password=False)
    assert schema_version(old_database) == 1

    store = Store(url)
    try:
        assert schema_version(store.engine) == SCHEMA_VERSION
        release = store.get_release("rel-1")
        assert release.values == (
            ReleasedValue("age", 0.25, 0.01),
            ReleasedValue("sex", -0.5, 0.01),
        )
        assert release.costs == (
            PrivacyCost("site-a", 0.5, 1e-6, 1.0),
            PrivacyCost("site-b", 0.5, 1e-6, 1.0),
        )
        assert release.created_at == "2024-11-05T09:30:00"
        assert [r.release_id for r in store.list_releases()] == ["rel-1"]
        (ledger,) = store.site_ledgers()
        assert [(e.label, e.noise_multiplier) for e in ledger.events] == [
            ("training", 2.0),
            ("round r-1", 3.0),
        ]
        assert [e.action for e in store.audit_entries()] == ["enroll_identity"]
        assert [s.round_id for s in store.unfinished_rounds()] == ["r-2"]
        assert IdentityRegistry(store).public_key("site-a") == KEY
        journal = RoundJournal(store)
        assert [e.action for e in journal.entries("r-2")] == ["open"]
        running = journal.running_sum("r-2")
        assert running is not None and running.tolist() == [2**64 - 1] * 3

        # The upgraded ledger mirror goes on from where it was, one event per position.
        later = LedgerEvent("gaussian", 4.0, label="round r-3", created_at=T0 + timedelta(days=1))
        assert (
            store.mirror_ledger(SiteLedger("site-a", 4.0, 1e-5, (*ledger.events, later)), now=T0)
            == 1
        )
        indexes = {i["name"]: i for i in inspect(store.engine).get_indexes("site_ledger_events")}
        assert indexes["uq_site_ledger_events_position"]["unique"]
        assert indexes["uq_site_ledger_events_position"]["column_names"] == ["site_id", "seq"]
    finally:
        store.close()

    # Opening it again changes nothing.
    Store(url).close()
    with old_database.connect() as c:
        rows = c.execute(text("SELECT version, description FROM schema_version")).all()
    assert rows == [(2, "one event per position of a site's ledger"), (3, "tokens may expire")]


def test_a_failed_upgrade_changes_nothing(old_database: Engine) -> None:
    """Two different events at one position cannot both be kept: the upgrade stops with
    both versions named and leaves the database as version 1 found it."""
    with old_database.begin() as c:
        c.execute(version_1().tables["site_ledger_events"].insert(), ledger_event(0, "other"))
    url = old_database.url.render_as_string(hide_password=False)

    with pytest.raises(StorageError, match=r"(?s)from schema version 1 to 2 .*nothing was changed"):
        Store(url)

    assert schema_version(old_database) == 1
    with old_database.connect() as c:
        labels = c.execute(text("SELECT label FROM site_ledger_events ORDER BY id")).scalars().all()
    assert labels == ["training", "round r-1", "round r-1", "other"]
    assert "uq_site_ledger_events_position" not in {
        i["name"] for i in inspect(old_database).get_indexes("site_ledger_events")
    }


def test_a_new_database_starts_at_the_current_version(database_url: str) -> None:
    store = Store(database_url)
    assert schema_version(store.engine) == SCHEMA_VERSION
    with store.engine.connect() as c:
        assert c.execute(text("SELECT version, description FROM schema_version")).all() == [
            (SCHEMA_VERSION, "created")
        ]
    store.close()


def test_a_database_from_a_newer_fedlens_is_refused(database_url: str) -> None:
    Store(database_url).close()
    engine = create_engine(database_url)
    newer = SCHEMA_VERSION + 1
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO schema_version (version, applied_at, description)"
                " VALUES (:v, :at, 'from the future')"
            ),
            {"v": newer, "at": T0},
        )

    with pytest.raises(StorageError) as refused:
        Store(database_url)
    message = str(refused.value)
    assert f"schema version {newer}" in message and f"version {SCHEMA_VERSION} " in message
    assert schema_version(engine) == newer
    engine.dispose()


def test_processes_opening_a_new_database_at_once_create_it_once(database_url: str) -> None:
    start = threading.Barrier(4)
    errors: list[Exception] = []
    stores: list[Store] = []

    def open_store() -> None:
        start.wait()
        try:
            stores.append(Store(database_url))
        except Exception as exc:  # asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with stores[0].engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM schema_version")).scalar_one() == 1
    for s in stores:
        s.close()


def test_tokens_of_a_version_2_database_keep_working_and_may_expire(database_url: str) -> None:
    """Version 3 adds ``access_tokens.expires_at``: a token issued before never expires."""
    store = Store(database_url)
    store.close()
    v2 = MetaData()
    tokens = Table(
        "access_tokens",
        v2,
        Column("token_id", String(32), primary_key=True),
        Column("name", String(128), nullable=False),
        Column("role", String(16), nullable=False),
        Column("secret_hash", LargeBinary(32), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("revoked_at", DateTime(timezone=True), nullable=True),
    )
    engine = create_engine(database_url)
    secret = "s" * 43
    with engine.begin() as c:
        v2.create_all(c)
        c.execute(
            tokens.insert(),
            {
                "token_id": "0123456789abcdef",
                "name": "ana",
                "role": "analyst",
                "secret_hash": hashlib.sha256(secret.encode()).digest(),
                "created_at": T0,
                "revoked_at": None,
            },
        )
        c.execute(text("UPDATE schema_version SET version = 2"))
    assert schema_version(engine) == 2

    store = Store(database_url)
    try:
        assert schema_version(store.engine) == SCHEMA_VERSION == 3
        access = AccessControl(store)
        old = access.authenticate(f"fl_0123456789abcdef_{secret}")
        assert (old.name, old.role) == ("ana", Role.ANALYST)
        (record,) = access.tokens()
        assert record.expires_at is None and record.issued_at == T0
        access.issue("bo", Role.VIEWER, now=T0, expires_at=T0 + timedelta(days=1))
        assert access.tokens()[1].expires_at == T0 + timedelta(days=1)
    finally:
        store.close()
        engine.dispose()
    with create_engine(database_url).connect() as c:
        rows = c.execute(text("SELECT version, description FROM schema_version")).all()
    assert rows == [(2, "created"), (3, "tokens may expire")]
