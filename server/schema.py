"""The store's schema version and the steps that upgrade an older database to it.

A database records the versions it went through in ``schema_version`` (one row per
version: when it was reached and what changed). One that predates the table, but holds the
store's tables, is version 1. Opening a store (:func:`upgrade`) refuses a database from a
newer fedlens and changes nothing in a current one. Otherwise it takes one transaction,
serialised against other processes opening the same database (``BEGIN IMMEDIATE`` on
SQLite, an advisory lock on PostgreSQL), which creates a new database at
:data:`SCHEMA_VERSION` or applies the missing steps of an older one in order. A step that
fails undoes them all.

A module that adds a new table creates it with :meth:`server.storage.Store.create_tables`;
a change to an existing table (a column, an index, a type) is a new step here, a higher
:data:`SCHEMA_VERSION`, and the same change in the table's declaration, which creates new
databases.

Versions
--------
1
    The tables as the store first created them, without ``schema_version``.
2
    ``site_ledger_events`` holds one event per position of a site's ledger (a unique
    index on ``site_id, seq``), so two concurrent reports of one ledger cannot both append
    the same event. Exact duplicates already stored are merged first.
3
    ``access_tokens`` has an ``expires_at`` column (NULL: the token does not expire, as
    every token issued before).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from fedlens.errors import StorageError
from server.database import UtcDateTime

__all__ = ["SCHEMA_VERSION", "schema_version", "upgrade"]

SCHEMA_VERSION = 3
# pg_advisory_xact_lock key held while a store is opened: "fedlens" in ASCII
_LOCK_KEY = int.from_bytes(b"fedlens", "big")

_metadata = MetaData()
_versions = Table(
    "schema_version",
    _metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", UtcDateTime, nullable=False),
    Column("description", String(200), nullable=False),
)


@dataclass(frozen=True)
class _Step:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _unique_ledger_positions(connection: Connection) -> None:
    if not inspect(connection).has_table("site_ledger_events"):
        return  # created with the index by the table's declaration
    connection.execute(
        text(
            "DELETE FROM site_ledger_events WHERE id IN ("
            " SELECT later.id FROM site_ledger_events later"
            " JOIN site_ledger_events first"
            " ON later.site_id = first.site_id AND later.seq = first.seq"
            " AND first.id < later.id AND later.kind = first.kind"
            " AND later.noise_multiplier = first.noise_multiplier"
            " AND later.sampling_rate = first.sampling_rate AND later.steps = first.steps"
            " AND later.label = first.label AND later.created_at = first.created_at)"
        )
    )
    connection.execute(
        text(
            "CREATE UNIQUE INDEX uq_site_ledger_events_position"
            " ON site_ledger_events (site_id, seq)"
        )
    )


def _token_expiry(connection: Connection) -> None:
    if not inspect(connection).has_table("access_tokens"):
        return  # created with the column by server.access
    timestamp = UtcDateTime().compile(dialect=connection.dialect)
    connection.execute(text(f"ALTER TABLE access_tokens ADD COLUMN expires_at {timestamp}"))


_STEPS = (
    _Step(2, "one event per position of a site's ledger", _unique_ledger_positions),
    _Step(3, "tokens may expire", _token_expiry),
)
assert [step.version for step in _STEPS] == list(range(2, SCHEMA_VERSION + 1))


def upgrade(engine: Engine, metadata: MetaData, *, now: datetime | None = None) -> int:
    """Bring the database of ``engine`` to :data:`SCHEMA_VERSION` in one transaction.

    Parameters
    ----------
    engine
        The store's engine.
    metadata
        The store's current tables: created in a new database, and any that an older
        one lacks.
    now
        When the versions are recorded; the current time if not given.

    Returns
    -------
    int
        The version the database had when it was opened (0 for a new one).

    Raises
    ------
    StorageError
        The database is from a newer fedlens, or a step or the database failed; nothing
        is changed.
    """
    at = now or datetime.now(UTC)
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as connection:  # read only: most opens have nothing to do
            found, complete = _found_version(connection, metadata)
        _refuse_newer(found, where)
        if found == SCHEMA_VERSION and complete:
            return found
        with engine.connect() as connection:
            _lock(connection)
            found, _ = _found_version(connection, metadata)  # another process may have won
            _refuse_newer(found, where)
            if found == 0:
                metadata.create_all(connection)
                _versions.create(connection)
                _record(connection, SCHEMA_VERSION, "created", at)
            elif found < SCHEMA_VERSION:
                if found == 1:
                    _versions.create(connection)
                for step in _STEPS[found - 1 :]:
                    try:
                        step.apply(connection)
                    except SQLAlchemyError as exc:
                        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
                        raise StorageError(
                            f"cannot upgrade the store at {where} from schema version "
                            f"{step.version - 1} to {step.version} ({step.description}): "
                            f"{reason}; nothing was changed"
                        ) from exc
                    _record(connection, step.version, step.description, at)
                metadata.create_all(connection)
            connection.commit()
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot open the store at {where}: {exc}") from exc
    return found


def schema_version(engine: Engine) -> int:
    """The version the database of ``engine`` records (1 without a record, 0 if empty)."""
    try:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            if _versions.name not in tables:
                return 1 if tables else 0
            return int(connection.execute(select(func.max(_versions.c.version))).scalar_one())
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the schema version: {exc}") from exc


def _lock(connection: Connection) -> None:
    """Begin the transaction, holding out other processes that open the same database."""
    if connection.dialect.name == "sqlite":
        # pysqlite begins a transaction only before DML; DDL would run outside it.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(_LOCK_KEY)))


def _found_version(connection: Connection, metadata: MetaData) -> tuple[int, bool]:
    """The database's version, and whether it holds every table of ``metadata``."""
    tables = set(inspect(connection).get_table_names())
    complete = set(metadata.tables) <= tables
    if _versions.name in tables:
        version = connection.execute(select(func.max(_versions.c.version))).scalar_one()
        if version is None:
            raise StorageError("the store's schema_version table is empty")
        return int(version), complete
    return (1 if tables & set(metadata.tables) else 0), complete


def _refuse_newer(found: int, where: str) -> None:
    if found > SCHEMA_VERSION:
        raise StorageError(
            f"the store at {where} has schema version {found}, newer than version "
            f"{SCHEMA_VERSION} that this fedlens knows: upgrade fedlens to open it"
        )


def _record(connection: Connection, version: int, description: str, at: datetime) -> None:
    connection.execute(
        _versions.insert().values(version=version, applied_at=at, description=description)
    )
