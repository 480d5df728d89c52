"""What the store does differently per backend (server.database), without a database."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from fedlens.errors import StorageError
from server.database import UtcDateTime, clip_text, dumps_json, loads_json, open_engine, storable


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(
    "value",
    [
        [["gap", math.nan, 0.1], ["ratio", math.inf, -math.inf], ["plain", 1.5, 0.0]],
        {"a": {"b": [math.nan, {"c": -math.inf}]}, "n": None, "t": True, "s": "NaN"},
        {"$float": "nan", "$$x": 1, "$": 2, "plain": "$float"},
        {"$float": math.nan},
        [{"$float": "inf"}, "$float"],
        {},
        [],
    ],
)
def test_json_for_postgresql_round_trips_and_is_strict(value: Any) -> None:
    text = dumps_json(value)
    json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in {text}"))
    assert same(loads_json(text), value)
    assert same(loads_json(text.encode()), value)


def test_times_are_stored_in_utc_and_read_back_naive() -> None:
    column = UtcDateTime()
    berlin = datetime(2025, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    naive = datetime(2025, 6, 1, 12, 0)
    pg, lite = postgresql.dialect(), sqlite.dialect()

    assert column.process_bind_param(berlin, pg) == datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert column.process_bind_param(naive, pg) == datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert column.process_bind_param(berlin, lite) == naive
    assert column.process_bind_param(naive, lite) == naive
    assert column.process_result_value(berlin, pg) == naive
    assert column.process_result_value(naive, lite) == naive
    assert column.process_bind_param(None, pg) is None


def test_text_is_clipped_and_nul_escaped() -> None:
    assert clip_text("a\x00b", 10) == "a\\x00b"
    assert clip_text("x" * 300, 128) == "x" * 128
    assert clip_text("\x00" * 3) == "\\x00" * 3
    assert storable("round-1") and storable("") and not storable("r\x00")


@pytest.mark.parametrize(
    ("url", "words"),
    [("not a url", "cannot open store"), ("nosuchdb://x", "cannot open store")],
)
def test_unusable_urls_are_storage_errors(url: str, words: str) -> None:
    with pytest.raises(StorageError, match=words):
        open_engine(url)
