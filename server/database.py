"""How the coordinator's store reaches its database, on SQLite or PostgreSQL.

The store's tables and queries are the same on both backends; what differs lives here:

- the engine (:func:`open_engine`): SQLite gets foreign keys, WAL and ``synchronous=NORMAL``;
  PostgreSQL gets a JSON codec that keeps NaN and infinities (its ``json`` type refuses the
  bare ``NaN`` that Python writes);
- timestamps (:class:`UtcDateTime`): stored in UTC and read back as naive UTC on both
  backends (PostgreSQL would hand back its session's time zone, SQLite no zone at all);
- text (:func:`clip_text`, :func:`storable`): PostgreSQL refuses a NUL character anywhere
  in text, even in a query's parameter, and enforces ``VARCHAR`` lengths that SQLite
  ignores. Text from the network that goes into a bounded column is clipped, and a key
  with a NUL is looked up as absent, so a malformed request gets the same answer on both
  backends.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, create_engine, event
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.types import TypeDecorator

from fedlens.errors import StorageError

__all__ = ["UtcDateTime", "clip_text", "dumps_json", "loads_json", "open_engine", "storable"]

_NON_FINITE = "$float"  # {"$float": "nan" | "inf" | "-inf"} in PostgreSQL's JSON


def open_engine(url: str) -> Engine:
    """A SQLAlchemy engine for ``url``, set up for its backend (see the module doc).

    Raises
    ------
    StorageError
        The URL is malformed, or names a backend whose driver is not installed (PostgreSQL
        needs ``pip install 'fedlens[postgres]'``).
    """
    try:
        backend = make_url(url).get_backend_name()
        options: dict[str, Any] = {}
        if backend == "postgresql":
            options = {"json_serializer": dumps_json, "json_deserializer": loads_json}
        engine = create_engine(url, **options)
    except ImportError as exc:
        raise StorageError(
            f"cannot open store {url!r}: its driver is not installed ({exc}); for PostgreSQL "
            "install fedlens[postgres]"
        ) from exc
    except (ArgumentError, SQLAlchemyError, ValueError) as exc:
        raise StorageError(f"cannot open store {url!r}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    _write_ahead_log(cursor)
    # In WAL mode, NORMAL makes every commit durable against the process being killed
    # (what a restart recovers from); only a power loss may undo the last commits.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _write_ahead_log(cursor: sqlite3.Cursor, *, wait_s: float = 10.0) -> None:
    """Switch the database to WAL (it stays so), waiting for other connections if need be.

    Switching needs the database to itself, and SQLite reports a busy database at once
    rather than waiting for it: a new database that several processes open together would
    otherwise refuse all but the first.
    """
    give_up = time.monotonic() + wait_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
            time.sleep(0.01)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and read back as a naive UTC ``datetime``.

    An aware value is converted to UTC before it is stored and a naive one is taken to be
    UTC already. Naive on the way out is what SQLite has always returned for these
    columns; PostgreSQL's aware values are converted to match.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # PostgreSQL would read a naive value in its session's time zone.
            return value.replace(tzinfo=UTC) if dialect.name != "sqlite" else value
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(UTC).replace(tzinfo=None)


def clip_text(value: str, length: int | None = None) -> str:
    """``value`` made storable in a ``VARCHAR(length)`` (or text): NUL written ``\\x00``,
    then cut to ``length``."""
    return value.replace("\x00", "\\x00")[:length]


def storable(key: str) -> bool:
    """Whether a stored key can be ``key``: PostgreSQL text holds no NUL, nor may a query's
    parameter, so a key with one is absent (and the store refuses to save one)."""
    return "\x00" not in key


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {_NON_FINITE: repr(value)}
    if isinstance(value, dict):
        # A key of the data that starts with "$" gets another, so none is taken for a marker.
        return {
            "$" + key if isinstance(key, str) and key.startswith("$") else key: _encode(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    return value


def _decode(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and isinstance(obj.get(_NON_FINITE), str):
        return float(obj[_NON_FINITE])
    return {key[1:] if key.startswith("$$") else key: item for key, item in obj.items()}


def dumps_json(value: Any) -> str:
    """JSON that PostgreSQL accepts: NaN and ±inf become ``{"$float": "nan"}`` objects (and a
    key of the data that starts with ``$`` gets another ``$``)."""
    return json.dumps(_encode(value), allow_nan=False)


def loads_json(text: str | bytes) -> Any:
    """The inverse of :func:`dumps_json`."""
    return json.loads(text, object_hook=_decode)
