"""Read access for analysts: releases, mirrored budgets, and explanations of their own
inputs with the stored model. Nothing here costs privacy.

Release listings are cached, and every cached listing is checked against the store's
release version (:meth:`server.storage.Store.release_version`, one ``count(*)`` query)
before it is answered. Releases are never changed or deleted once saved, so an unchanged
count means an unchanged set of releases. The guarantee: a listing includes every release
committed before the call began, whichever process or :class:`~server.storage.Store` saved
it; there is no staleness window. A release itself never changes, so its encoded answer
can be kept with no check at all (:class:`server.grpc_server.QueryServicer` does).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from fedlens.errors import ConfigurationError
from fedlens.types import InputExplanation, Release, ReleaseSummary, SiteLedger
from privacy import PrivacyLedger
from server.input_explanation import explain_stored_input
from server.storage import Store

__all__ = ["LruCache", "QueryHandler", "ReleaseListing", "with_epsilon"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_KIND_LENGTH = 64  # the releases table's kind column


class LruCache(Generic[K, V]):
    """A thread-safe mapping of at most ``size`` entries that forgets the least recently used.

    ``size`` 0 keeps nothing. Values are shared between callers: cache only values that
    nobody mutates. None is not a value (:meth:`get` answers None for a missing key).
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ConfigurationError(f"a cache's size must be >= 0, got {size}")
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        if self._size == 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        """The cached value of ``key``, or ``compute()`` stored under it.

        ``compute`` runs outside the lock (two threads may both compute a missing key); what
        it raises propagates and nothing is stored.
        """
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value


@dataclass(frozen=True)
class ReleaseListing:
    """Summaries of the newest releases, at a version of the store's set of releases.

    ``version`` was read before the summaries, so they hold at least every release it
    counts; ``limit`` is the limit after clamping.
    """

    version: int
    limit: int
    kind: str
    summaries: tuple[ReleaseSummary, ...]


class QueryHandler:
    """Answers analysts from stored releases; costs no privacy.

    Parameters
    ----------
    store
        The coordinator's store.
    max_limit
        The most summaries one listing returns (a limit of 0 asks for this many).
    cached_listings
        How many listings (one per limit and kind asked for) are kept; see the module doc
        for when a kept listing is answered.
    """

    def __init__(self, store: Store, *, max_limit: int = 1000, cached_listings: int = 64) -> None:
        self._store = store
        self._max_limit = max_limit
        self._listings: LruCache[tuple[int, str], ReleaseListing] = LruCache(cached_listings)

    def release_listing(self, *, limit: int = 0, kind: str = "") -> ReleaseListing:
        """The newest ``limit`` releases (of ``kind`` if given), newest first, with the
        version they are current at; includes every release committed before the call."""
        limit = self._max_limit if limit <= 0 else min(limit, self._max_limit)
        # Read before the summaries: a release saved in between is in the summaries but not
        # in this version, so the next call's check lists again rather than missing it.
        version = self._store.release_version()
        cached = self._listings.get((limit, kind))
        if cached is not None and cached.version == version:
            return cached
        summaries = tuple(self._store.list_releases(limit=limit, kind=kind))
        listing = ReleaseListing(version=version, limit=limit, kind=kind, summaries=summaries)
        if len(kind) <= _KIND_LENGTH:  # a longer kind matches nothing: not worth its memory
            self._listings.put((limit, kind), listing)
        return listing

    def list_releases(self, *, limit: int = 0, kind: str = "") -> list[ReleaseSummary]:
        """The summaries of :meth:`release_listing`."""
        return list(self.release_listing(limit=limit, kind=kind).summaries)

    def get_release(self, release_id: str) -> Release:
        return self._store.get_release(release_id)

    def list_budgets(
        self, *, site_id: str = "", reserved: Mapping[str, float] | None = None
    ) -> list[SiteLedger]:
        """Every mirrored site ledger (or one site's), with its composed ε and, from
        ``reserved`` (by site id, see :meth:`server.jobs.JobQueue.reserved_epsilon`), the ε
        its pending jobs hold."""
        held = reserved or {}
        return [
            replace(
                with_epsilon(m, PrivacyLedger(m.budget_epsilon, m.delta, m.events)),
                reserved_epsilon=held.get(m.site_id, 0.0),
            )
            for m in self._store.site_ledgers(site_id=site_id)
        ]

    def explain_input(
        self, record: Mapping[str, str], *, model_id: str = "", top: int = 0
    ) -> InputExplanation:
        """Explain one input with a stored global model (the latest if ``model_id`` is empty).

        Uses the model and the latest fitting ``feature_stats`` release only: no privacy
        is spent. See :func:`server.input_explanation.explain_stored_input`.
        """
        return explain_stored_input(self._store, record, model_id=model_id, top=top)


def with_epsilon(ledger: SiteLedger, composed: PrivacyLedger) -> SiteLedger:
    return SiteLedger(
        site_id=ledger.site_id,
        budget_epsilon=ledger.budget_epsilon,
        delta=ledger.delta,
        events=ledger.events,
        epsilon_spent=composed.epsilon_spent(),
        accountant=composed.accountant,
    )
