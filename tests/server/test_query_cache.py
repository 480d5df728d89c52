"""The Query service's caches: a stored release is encoded once; a listing is answered from
the cache only while the store's set of releases is unchanged, whoever writes to it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import event

from fedlens.errors import ConfigurationError
from fedlens.types import PrivacyCost, Release, ReleasedValue, RoundSpec
from fedlens.v1 import query_pb2, query_pb2_grpc
from server.aggregation import Aggregator
from server.grpc_server import serve
from server.query_handler import LruCache, QueryHandler
from server.storage import Store

START = datetime(2026, 1, 1, tzinfo=UTC)


def _save(store: Store, index: int, kind: str = "feature_stats") -> Release:
    at = START + timedelta(hours=index)
    release = Release(
        release_id=f"release-{index}",
        round_id=f"round-{index}",
        kind=kind,
        created_at=at.isoformat(),
        noised_count=100.0 + index,
        values=(ReleasedValue("age.mean", 40.0 + index, 0.5),),
        grouped=(),
        costs=(PrivacyCost("site-a", 0.5, 1e-6, 0.5 * (index + 1)),),
        params={"dataset": "adult"},
    )
    spec = RoundSpec(
        round_id=release.round_id,
        kind=kind,
        site_ids=("site-a", "site-b", "site-c"),
        length=2,
        bits=32,
        scale=1e3,
        clip_bound=1.0,
        labels=("age.mean",),
    )
    store.save_round(spec, "complete", now=at)
    store.save_release(release, created_at=at)
    return release


class Statements:
    """The SQL statements an engine runs, to see which calls reach the database."""

    def __init__(self, store: Store) -> None:
        self.seen: list[str] = []
        event.listen(store.engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.seen.append(statement)

    def take(self) -> list[str]:
        seen, self.seen = self.seen, []
        return seen


class CountingHandler(QueryHandler):
    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.gets: list[str] = []

    def get_release(self, release_id: str) -> Release:
        self.gets.append(release_id)
        return super().get_release(release_id)


# -- the LRU -----------------------------------------------------------------------------


def test_the_lru_keeps_the_most_recently_used_within_its_size() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    assert len(cache) == 2
    cache.put("a", 10)
    assert cache.get("a") == 10 and len(cache) == 2


def test_the_lru_stores_nothing_that_failed_and_nothing_at_size_zero() -> None:
    cache: LruCache[str, int] = LruCache(4)

    def fail() -> int:
        raise KeyError("absent")

    with pytest.raises(KeyError):
        cache.get_or_compute("x", fail)
    assert len(cache) == 0
    assert cache.get_or_compute("x", lambda: 7) == 7
    assert cache.get_or_compute("x", fail) == 7  # answered from the cache
    off: LruCache[str, int] = LruCache(0)
    off.put("x", 1)
    assert off.get("x") is None and len(off) == 0
    with pytest.raises(ConfigurationError, match="size"):
        LruCache(-1)


# -- listings ----------------------------------------------------------------------------


@pytest.mark.both_backends
def test_a_release_saved_through_another_store_is_listed_at_once(database_url: str) -> None:
    store, other = Store(database_url), Store(database_url)
    try:
        handler = QueryHandler(store)
        _save(store, 0)
        first = handler.release_listing(limit=10)
        assert [s.release_id for s in first.summaries] == ["release-0"]
        statements = Statements(store)
        again = handler.release_listing(limit=10)
        assert again is first  # unchanged: answered from the cache ...
        (check,) = statements.take()  # ... after one version query
        assert "count(" in check.lower() and "releases" in check
        _save(other, 1)  # another Store on the same database, as another process would
        after = handler.release_listing(limit=10)
        assert [s.release_id for s in after.summaries] == ["release-1", "release-0"]
        assert after.version == first.version + 1
        assert handler.list_releases(limit=1) == [after.summaries[0]]
    finally:
        other.close()
        store.close()


def test_listings_are_kept_per_limit_and_kind(tmp_path: Any) -> None:
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    try:
        handler = QueryHandler(store, max_limit=5)
        for index in range(3):
            _save(store, index, kind="fairness" if index == 1 else "feature_stats")
        fairness = handler.release_listing(kind="fairness")
        assert [s.release_id for s in fairness.summaries] == ["release-1"]
        assert fairness.limit == 5  # 0 asks for the most
        assert [s.release_id for s in handler.list_releases(limit=1)] == ["release-2"]
        assert len(handler.list_releases(limit=100)) == 3  # clamped to 5, then cached
        assert handler.release_listing(kind="fairness") is fairness
        assert handler.list_releases(kind="x" * 65) == []  # matches nothing, not kept
    finally:
        store.close()


# -- the servicer, over gRPC -------------------------------------------------------------


class Served:
    def __init__(self, database_url: str) -> None:
        self.store = Store(database_url)
        self.handler = CountingHandler(self.store)
        self.running = serve(Aggregator(self.store), self.handler)
        self.channel = grpc.insecure_channel(self.running.address)
        self.query = query_pb2_grpc.QueryStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.running.stop(grace=None)
        self.store.close()


@pytest.fixture
def served(database_url: str) -> Iterator[Served]:
    s = Served(database_url)
    try:
        yield s
    finally:
        s.close()


def test_a_stored_release_is_read_and_encoded_once(served: Served) -> None:
    release = _save(served.store, 0)
    request = query_pb2.GetReleaseRequest(release_id=release.release_id)
    first = served.query.GetRelease(request)
    second = served.query.GetRelease(request)
    assert first == second and first.release_id == release.release_id
    assert first.values[0].value == pytest.approx(40.0)
    assert served.handler.gets == [release.release_id]


def test_an_unknown_release_is_not_kept_and_is_found_once_saved(served: Served) -> None:
    request = query_pb2.GetReleaseRequest(release_id="release-0")
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as info:
            served.query.GetRelease(request)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
    _save(served.store, 0)
    assert served.query.GetRelease(request).release_id == "release-0"
    assert served.handler.gets == ["release-0"] * 3


@pytest.mark.both_backends
def test_list_releases_over_grpc_shows_another_stores_release(
    served: Served, database_url: str
) -> None:
    _save(served.store, 0)
    request = query_pb2.ListReleasesRequest(limit=20)
    first = served.query.ListReleases(request)
    assert [r.release_id for r in first.releases] == ["release-0"]
    assert served.query.ListReleases(request) == first
    other = Store(database_url)
    try:
        _save(other, 1)
    finally:
        other.close()
    after = served.query.ListReleases(request)
    assert [r.release_id for r in after.releases] == ["release-1", "release-0"]
