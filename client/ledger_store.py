"""The site's privacy ledger on disk: an append-only SQLite file.

Losing ledger events would let a site spend its budget twice, so this store never
resets, rewrites or deletes anything: a file that is not a fedlens ledger, that was
written by a newer schema, or whose budget differs from the one asked for is refused with
an error and left untouched. Events are only inserted (triggers reject updates and
deletes), each in its own transaction.

Schema (version 2)::

    meta(key TEXT PRIMARY KEY, value TEXT)          format, schema_version, budget_epsilon, delta
    events(id INTEGER PRIMARY KEY AUTOINCREMENT,
           kind, noise_multiplier, sampling_rate, steps, label,
           created_at TEXT (ISO 8601), epsilon_after REAL)

Version 1 allowed only the kinds ``dpsgd`` and ``gaussian``; a version 1 file is upgraded
in place, in one transaction, the first time it is opened for writing: every event is
copied with its id, the copy is counted against the original, and only then does the
new table replace the old one.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from fedlens.errors import ConfigurationError, NotFoundError, StorageError
from privacy import LedgerEvent, PrivacyLedger

__all__ = ["SCHEMA_VERSION", "LedgerStore"]

SCHEMA_VERSION = 2
_FORMAT = "fedlens-privacy-ledger"

_META_TABLE = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_EVENTS_TABLE = """
CREATE TABLE events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT    NOT NULL CHECK (kind IN ('dpsgd', 'gaussian', 'discrete_gaussian')),
    noise_multiplier REAL    NOT NULL,
    sampling_rate    REAL    NOT NULL,
    steps            INTEGER NOT NULL,
    label            TEXT    NOT NULL,
    created_at       TEXT    NOT NULL,
    epsilon_after    REAL    NOT NULL
)
"""
_TRIGGERS = {
    "events_no_update": "BEFORE UPDATE ON events "
    "BEGIN SELECT RAISE(ABORT, 'ledger events are append-only'); END",
    "events_no_delete": "BEFORE DELETE ON events "
    "BEGIN SELECT RAISE(ABORT, 'ledger events are append-only'); END",
    "meta_no_update": "BEFORE UPDATE ON meta "
    "BEGIN SELECT RAISE(ABORT, 'ledger metadata is fixed'); END",
    "meta_no_delete": "BEFORE DELETE ON meta "
    "BEGIN SELECT RAISE(ABORT, 'ledger metadata is fixed'); END",
}
_TRIGGER_STATEMENTS = tuple(f"CREATE TRIGGER {name} {body}" for name, body in _TRIGGERS.items())
_SCHEMA = (_META_TABLE, _EVENTS_TABLE, *_TRIGGER_STATEMENTS)

_EVENT_COLUMNS = (
    "id, kind, noise_multiplier, sampling_rate, steps, label, created_at, epsilon_after"
)

HistoryRow = dict[str, str | float | int]


class LedgerStore:
    """A site's privacy ledger persisted in one SQLite file.

    Parameters
    ----------
    path
        The ledger file. It is created by the first :meth:`load`; nothing is touched
        before.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"LedgerStore({str(self.path)!r})"

    def load(self, budget_epsilon: float, delta: float) -> PrivacyLedger:
        """The site's ledger with every stored event, creating the file if it is absent.

        Parameters
        ----------
        budget_epsilon, delta
            The site's budget. A new file stores them; an existing file must hold the
            same values.

        Raises
        ------
        ConfigurationError
            The budget is invalid, or the file was created with another budget or δ (the
            message names both); the file is unchanged.
        StorageError
            The file is not a fedlens ledger, was written by a newer schema version, or
            holds an invalid event.
        """
        # Validates the budget before any file is created.
        PrivacyLedger(budget_epsilon, delta)
        if not self.path.exists():
            self._create(budget_epsilon, delta)
        with closing(self._connect()) as conn:
            meta = _read_meta(conn, self.path)
            stored_budget, stored_delta = meta["budget_epsilon"], meta["delta"]
            if stored_budget != float(budget_epsilon) or stored_delta != float(delta):
                raise ConfigurationError(
                    f"ledger {self.path} was created for budget ε = {stored_budget!r}, "
                    f"δ = {stored_delta!r}; asked for ε = {float(budget_epsilon)!r}, "
                    f"δ = {float(delta)!r}. A site's budget cannot change under a ledger: "
                    "use the stored values"
                )
            rows = _select_events(conn, self.path)
        events = [_event_from_row(row, self.path) for row in rows]
        return PrivacyLedger(stored_budget, stored_delta, events)

    def read(self) -> PrivacyLedger:
        """The stored ledger with its own budget and δ; never creates a file.

        Raises
        ------
        NotFoundError
            There is no ledger file at :attr:`path`.
        StorageError
            As :meth:`load`.
        """
        budget, delta, events = self.stored()
        return PrivacyLedger(budget, delta, events)

    def stored(self) -> tuple[float, float, tuple[LedgerEvent, ...]]:
        """``(budget ε, δ, events oldest first)`` as stored, without composing the events.

        Raises
        ------
        NotFoundError, StorageError
            As :meth:`read`.
        """
        if not self.path.exists():
            raise NotFoundError(f"no privacy ledger at {self.path}")
        with closing(self._connect()) as conn:
            meta = _read_meta(conn, self.path)
            rows = _select_events(conn, self.path)
        events = tuple(_event_from_row(row, self.path) for row in rows)
        return meta["budget_epsilon"], meta["delta"], events

    def append(self, event: LedgerEvent, epsilon_after: float) -> None:
        """Store ``event`` and the ε the site reached with it, in one transaction.

        Prefer :meth:`spend`, which also checks the budget inside the same transaction.

        Raises
        ------
        ConfigurationError
            ``epsilon_after`` is not finite and >= 0.
        StorageError
            The file is missing (call :meth:`load` first), is not a ledger, or the write
            failed.
        """
        if not isinstance(event, LedgerEvent):
            raise ConfigurationError(f"expected a LedgerEvent, got {type(event).__name__}")
        if not math.isfinite(epsilon_after) or epsilon_after < 0:
            raise ConfigurationError(f"epsilon_after must be finite and >= 0, got {epsilon_after}")
        if not self.path.exists():
            raise StorageError(f"ledger {self.path} does not exist; load it first")
        with closing(self._connect()) as conn:
            _read_meta(conn, self.path)
            with _transaction(conn, self.path):
                self._insert(conn, event, epsilon_after)

    def spend(self, event: LedgerEvent, budget_epsilon: float, delta: float) -> float:
        """Check ``event`` against the budget and store it, atomically; return the new ε.

        The stored events are re-read inside a write transaction, so two processes of
        the same site cannot both pass the check and together overspend.

        Raises
        ------
        BudgetExceededError
            The event would take the site past its budget; nothing is stored.
        """
        self.load(budget_epsilon, delta)  # creates the file, checks the budget
        with closing(self._connect()) as conn:
            meta = _read_meta(conn, self.path)
            with _transaction(conn, self.path):
                rows = _select_events(conn, self.path)
                ledger = PrivacyLedger(
                    meta["budget_epsilon"],
                    meta["delta"],
                    [_event_from_row(row, self.path) for row in rows],
                )
                epsilon_after = ledger.record(event)
                self._insert(conn, event, epsilon_after)
        return epsilon_after

    def _insert(self, conn: sqlite3.Connection, event: LedgerEvent, epsilon_after: float) -> None:
        conn.execute(
            "INSERT INTO events (kind, noise_multiplier, sampling_rate, steps, label, "
            "created_at, epsilon_after) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event.kind,
                event.noise_multiplier,
                event.sampling_rate,
                event.steps,
                event.label,
                event.created_at.isoformat(),
                float(epsilon_after),
            ),
        )

    def history(self) -> list[HistoryRow]:
        """Every stored event, oldest first, as plain dicts for printing.

        Keys: ``id``, ``kind``, ``noise_multiplier``, ``sampling_rate``, ``steps``,
        ``label``, ``created_at`` (ISO 8601) and ``epsilon_after``. An absent file has no
        history.

        Raises
        ------
        StorageError
            The file is not a ledger or was written by a newer schema version.
        """
        if not self.path.exists():
            return []
        with closing(self._connect()) as conn:
            _read_meta(conn, self.path)
            rows = _select_events(conn, self.path)
        names = [name.strip() for name in _EVENT_COLUMNS.split(",")]
        return [_history_row(names, row) for row in rows]

    def _connect(self) -> sqlite3.Connection:
        """Open the existing file read-write; SQLite is never allowed to create it here."""
        uri = self.path.resolve().as_uri() + "?mode=rw"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open ledger {self.path}: {exc}") from exc
        return conn

    def _create(self, budget_epsilon: float, delta: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        uri = self.path.resolve().as_uri() + "?mode=rwc"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot create ledger {self.path}: {exc}") from exc
        try:
            with closing(conn), _transaction(conn, self.path):
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    return  # another process created it meanwhile; load() checks it
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("format", _FORMAT),
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("budget_epsilon", repr(float(budget_epsilon))),
                        ("delta", repr(float(delta))),
                    ],
                )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot create ledger {self.path}: {exc}") from exc


@contextmanager
def _transaction(conn: sqlite3.Connection, path: Path) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any error."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot write ledger {path}: {exc}") from exc
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot commit to ledger {path}: {exc}") from exc


def _read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, float]:
    """Check that ``conn`` holds a ledger this code can read; return budget and δ."""
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.Error as exc:
        raise StorageError(f"{path} is not a fedlens privacy ledger ({exc})") from exc
    meta = {str(key): str(value) for key, value in rows}
    if meta.get("format") != _FORMAT:
        raise StorageError(f"{path} is not a fedlens privacy ledger")
    try:
        version = int(meta["schema_version"])
        budget = float(meta["budget_epsilon"])
        delta = float(meta["delta"])
    except (KeyError, ValueError) as exc:
        raise StorageError(f"ledger {path} has damaged metadata: {exc}") from exc
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"ledger {path} has schema version {version}, newer than {SCHEMA_VERSION} that "
            "this fedlens reads; upgrade fedlens"
        )
    if version < 1:
        raise StorageError(f"ledger {path} has an invalid schema version {version}")
    if version < SCHEMA_VERSION:
        _upgrade_from_v1(conn, path)
    return {"budget_epsilon": budget, "delta": delta}


def _upgrade_from_v1(conn: sqlite3.Connection, path: Path) -> None:
    """Rewrite a version 1 file's events table with the version 2 kinds, losing nothing."""
    try:
        with _transaction(conn, path):
            before = conn.execute("SELECT count(*), coalesce(max(id), 0) FROM events").fetchone()
            for trigger in _TRIGGERS:
                conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
            conn.execute("ALTER TABLE events RENAME TO events_v1")
            conn.execute(_EVENTS_TABLE)
            conn.execute(
                f"INSERT INTO events ({_EVENT_COLUMNS}) SELECT {_EVENT_COLUMNS} FROM events_v1"
            )
            after = conn.execute("SELECT count(*), coalesce(max(id), 0) FROM events").fetchone()
            if tuple(after) != tuple(before):
                raise StorageError(
                    f"upgrading ledger {path} copied {after[0]} of {before[0]} events; "
                    "the file is left as it was"
                )
            conn.execute("DROP TABLE events_v1")
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )
            for statement in _TRIGGER_STATEMENTS:
                conn.execute(statement)
    except sqlite3.Error as exc:
        raise StorageError(
            f"cannot upgrade ledger {path} to schema {SCHEMA_VERSION}: {exc}"
        ) from exc


def _select_events(conn: sqlite3.Connection, path: Path) -> list[tuple[object, ...]]:
    try:
        return list(conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY id").fetchall())
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read the events of ledger {path}: {exc}") from exc


def _history_row(names: list[str], row: tuple[object, ...]) -> HistoryRow:
    out: HistoryRow = {}
    for name, value in zip(names, row, strict=True):
        if not isinstance(value, str | float | int):
            raise StorageError(f"unexpected value {value!r} in ledger column {name}")
        out[name] = value
    return out


def _event_from_row(row: tuple[object, ...], path: Path) -> LedgerEvent:
    row_id, kind, z, q, steps, label, created_at, _ = row
    try:
        return LedgerEvent.from_dict(
            {
                "kind": kind,
                "noise_multiplier": z,
                "sampling_rate": q,
                "steps": steps,
                "label": label,
                "created_at": created_at,
            }
        )
    except ConfigurationError as exc:
        raise StorageError(f"ledger {path} holds an invalid event (row {row_id}): {exc}") from exc
