"""The site's ledger file: persistence, append-only, and refusal to reset or misread."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from client.ledger_store import SCHEMA_VERSION, LedgerStore
from fedlens.errors import BudgetExceededError, ConfigurationError, StorageError
from privacy import LedgerEvent

NOW = datetime(2025, 5, 1, 9, 30, tzinfo=UTC)
BUDGET, DELTA = 4.0, 1e-5


def training(minutes: int = 0) -> LedgerEvent:
    return LedgerEvent(
        kind="dpsgd",
        noise_multiplier=1.2,
        sampling_rate=0.03,
        steps=200,
        label="train round 1",
        created_at=NOW + timedelta(minutes=minutes),
    )


def release(z: float = 4.0) -> LedgerEvent:
    return LedgerEvent(
        kind="gaussian", noise_multiplier=z, label="feature_stats r2", created_at=NOW
    )


def test_a_new_ledger_starts_empty_and_creates_its_file(tmp_path: Path) -> None:
    path = tmp_path / "site" / "ledger.sqlite"
    ledger = LedgerStore(path).load(BUDGET, DELTA)
    assert path.exists()
    assert ledger.events == () and ledger.epsilon_spent() == 0.0
    assert ledger.budget_epsilon == BUDGET and ledger.delta == DELTA


def test_events_persist_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    store = LedgerStore(path)
    ledger = store.load(BUDGET, DELTA)
    for event in (training(), release()):
        store.append(event, ledger.record(event))
    reopened = LedgerStore(path).load(BUDGET, DELTA)
    assert reopened.events == ledger.events
    assert reopened.epsilon_spent() == pytest.approx(ledger.epsilon_spent())
    history = LedgerStore(path).history()
    assert [row["kind"] for row in history] == ["dpsgd", "gaussian"]
    assert history[0]["created_at"] == NOW.isoformat()
    assert history[0]["steps"] == 200 and history[0]["label"] == "train round 1"
    assert history[-1]["epsilon_after"] == pytest.approx(ledger.epsilon_spent())


def test_reopened_ledger_still_enforces_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    store = LedgerStore(path)
    ledger = store.load(1.0, DELTA)
    store.append(release(6.0), ledger.record(release(6.0)))
    reopened = LedgerStore(path).load(1.0, DELTA)
    with pytest.raises(BudgetExceededError):
        reopened.check(release(1.0))


def test_absent_file_has_no_history_and_cannot_be_appended_to(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "none.sqlite")
    assert store.history() == []
    with pytest.raises(StorageError, match="load it first"):
        store.append(release(), 0.1)
    assert not (tmp_path / "none.sqlite").exists()


@pytest.mark.parametrize("content", [b"", b"this is not a database\n" * 64, bytes(range(256)) * 16])
def test_a_file_that_is_not_a_ledger_is_refused_and_left_untouched(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(content)
    store = LedgerStore(path)
    with pytest.raises(StorageError, match="not a fedlens privacy ledger"):
        store.load(BUDGET, DELTA)
    with pytest.raises(StorageError):
        store.append(release(), 0.5)
    with pytest.raises(StorageError):
        store.history()
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.sqlite"]


def test_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE meta (key TEXT, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('format', 'something-else')")
    before = path.read_bytes()
    with pytest.raises(StorageError, match="not a fedlens privacy ledger"):
        LedgerStore(path).load(BUDGET, DELTA)
    assert path.read_bytes() == before


def _force_meta(path: Path, key: str, value: str) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TRIGGER meta_no_update")
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))


def test_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    store = LedgerStore(path)
    ledger = store.load(BUDGET, DELTA)
    store.append(release(), ledger.record(release()))
    _force_meta(path, "schema_version", str(SCHEMA_VERSION + 1))
    before = path.read_bytes()
    with pytest.raises(StorageError, match="newer"):
        store.load(BUDGET, DELTA)
    with pytest.raises(StorageError, match="newer"):
        store.append(release(), 1.0)
    assert path.read_bytes() == before


def test_a_different_budget_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    store = LedgerStore(path)
    store.load(BUDGET, DELTA)
    before = path.read_bytes()
    with pytest.raises(ConfigurationError, match=r"ε = 4\.0.*δ = 1e-05.*ε = 8\.0"):
        store.load(8.0, DELTA)
    with pytest.raises(ConfigurationError, match=r"δ = 1e-06"):
        store.load(BUDGET, 1e-6)
    assert path.read_bytes() == before


def test_invalid_budget_creates_no_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with pytest.raises(ConfigurationError, match="budget_epsilon"):
        LedgerStore(path).load(-1.0, DELTA)
    assert not path.exists()


def test_events_cannot_be_updated_or_deleted(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    store = LedgerStore(path)
    ledger = store.load(BUDGET, DELTA)
    store.append(training(), ledger.record(training()))
    with closing(sqlite3.connect(path)) as conn:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM events")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE events SET noise_multiplier = 100")
        with pytest.raises(sqlite3.DatabaseError, match="fixed"):
            conn.execute("UPDATE meta SET value = '100' WHERE key = 'budget_epsilon'")
    assert len(store.history()) == 1


def test_a_damaged_event_row_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    store = LedgerStore(path)
    store.load(BUDGET, DELTA)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO events (kind, noise_multiplier, sampling_rate, steps, label, "
            "created_at, epsilon_after) VALUES ('gaussian', -1, 1, 1, '', ?, 0)",
            (NOW.isoformat(),),
        )
    with pytest.raises(StorageError, match="row 1"):
        store.load(BUDGET, DELTA)


def test_append_validates_its_arguments(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite")
    store.load(BUDGET, DELTA)
    with pytest.raises(ConfigurationError, match="epsilon_after"):
        store.append(release(), float("nan"))
    with pytest.raises(ConfigurationError, match="LedgerEvent"):
        store.append(release().to_dict(), 0.1)  # type: ignore[arg-type]
    assert store.history() == []


_V1_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL CHECK "
    "(kind IN ('dpsgd', 'gaussian')), noise_multiplier REAL NOT NULL, sampling_rate REAL NOT "
    "NULL, steps INTEGER NOT NULL, label TEXT NOT NULL, created_at TEXT NOT NULL, "
    "epsilon_after REAL NOT NULL)",
    "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
    "BEGIN SELECT RAISE(ABORT, 'ledger events are append-only'); END",
)


def test_a_version_1_ledger_is_upgraded_in_place_losing_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with closing(sqlite3.connect(path)) as conn, conn:
        for statement in _V1_SCHEMA:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [
                ("format", "fedlens-privacy-ledger"),
                ("schema_version", "1"),
                ("budget_epsilon", repr(BUDGET)),
                ("delta", repr(DELTA)),
            ],
        )
        # Ids with a gap, as a v1 file may have after a rolled-back insert.
        for row_id, event in ((1, training()), (3, release())):
            conn.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row_id,
                    event.kind,
                    event.noise_multiplier,
                    event.sampling_rate,
                    event.steps,
                    event.label,
                    event.created_at.isoformat(),
                    1.0,
                ),
            )
    store = LedgerStore(path)
    ledger = store.load(BUDGET, DELTA)
    assert ledger.events == (training(), release())
    discrete = LedgerEvent(kind="discrete_gaussian", noise_multiplier=6.0, created_at=NOW)
    store.spend(discrete, BUDGET, DELTA)
    history = store.history()
    assert [row["id"] for row in history] == [1, 3, 4]
    assert [row["kind"] for row in history] == ["dpsgd", "gaussian", "discrete_gaussian"]
    with closing(sqlite3.connect(path)) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert version == (str(SCHEMA_VERSION),)
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET steps = 1")
        with pytest.raises(sqlite3.IntegrityError, match="fixed"):
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'budget_epsilon'")
