"""The round journal and running sums in the store, and an aggregator that resumes an open
round from them after a restart, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlens.errors import StorageError
from fedlens.types import MaskedSubmission, PrivacyCost, RoundPhase
from privacy import FixedPointCodec, SeededRandom
from privacy.secagg_crypto import raw_public
from privacy.secagg_params import SecAggParams
from privacy.secagg_site import SiteSession
from server.aggregation import Aggregator
from server.round_journal import JournalEntry, RoundJournal
from server.storage import Store
from tests.secagg_spec import CLIP, attribution_round

pytestmark = pytest.mark.both_backends

NOW = datetime(2026, 1, 10, 8, 0, tzinfo=UTC)
SITES = ("site-0", "site-1", "site-2")


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = Store(database_url)
    yield s
    s.close()


def audit_row(action: str) -> dict[str, object]:
    return {"now": NOW, "actor": "site-0", "action": action, "outcome": "ok", "round_id": "r-1"}


def test_entries_sums_and_audit_rows_are_kept_in_order_and_forgotten(store: Store) -> None:
    journal = RoundJournal(store)
    payload = {"cipher_public": "ab" * 32, "nested": {"list": [1, 2.5, "x"]}, "empty": []}
    journal.append("r-1", JournalEntry(100.25, "", "open", {}))
    journal.append("r-1", JournalEntry(101.5, "site-0", "advertise", payload), audit=audit_row("a"))
    top = np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)
    journal.append(
        "r-1", JournalEntry(102.0, "site-0", "submit", {"epsilon": 0.5}), running_sum=top
    )
    journal.append("r-2", JournalEntry(103.0, "", "open", {}))
    again = np.array([5, 6, 7, 8], dtype=np.uint64)
    journal.append(
        "r-1", JournalEntry(104.0, "site-1", "submit", {"epsilon": 0.5}), running_sum=again
    )

    assert journal.entries("r-1") == [
        JournalEntry(100.25, "", "open", {}),
        JournalEntry(101.5, "site-0", "advertise", payload),
        JournalEntry(102.0, "site-0", "submit", {"epsilon": 0.5}),
        JournalEntry(104.0, "site-1", "submit", {"epsilon": 0.5}),
    ]
    stored = journal.running_sum("r-1")
    assert stored is not None and stored.dtype == np.uint64 and stored.tolist() == again.tolist()
    assert [e.action for e in store.audit_entries(round_id="r-1")] == ["a"]

    journal.forget("r-1")
    assert journal.entries("r-1") == [] and journal.running_sum("r-1") is None
    assert [e.action for e in journal.entries("r-2")] == ["open"]


def test_an_entry_that_cannot_be_stored_takes_its_audit_row_with_it(store: Store) -> None:
    journal = RoundJournal(store)
    unstorable = JournalEntry(1.0, "site-0", "share", {"shares": object()})
    # SQLAlchemy serialises JSON for SQLite (StorageError); psycopg does it itself.
    with pytest.raises((StorageError, TypeError)):
        journal.append("r-1", unstorable, audit=audit_row("share_keys"))
    assert journal.entries("r-1") == []
    assert store.audit_entries() == []


def test_a_restarted_aggregator_resumes_the_round_from_the_store(database_url: str) -> None:
    """Two sites submit, the aggregator goes away, a new one opens the same database,
    takes the last submission and the unmasking, and releases the sum of all three."""
    spec = attribution_round("r-restart", SITES, threshold=2, phase_timeout_s=60.0)
    params = SecAggParams.for_round(spec)
    codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)
    rng = np.random.default_rng(11)
    vectors = {s: np.concatenate([rng.normal(size=3), [50 * CLIP]]) for s in SITES}
    identities = {s: Ed25519PrivateKey.generate() for s in SITES}
    sessions = {s: SiteSession(params, s, identities[s]) for s in SITES}
    public = {s: raw_public(k) for s, k in identities.items()}

    first_store = Store(database_url)
    first = Aggregator(first_store)
    first.open_round(spec)
    for s in SITES:
        first.advertise(sessions[s].advertise(), public[s])
    for s in SITES:
        _, keys = first.peer_keys(spec.round_id, s)
        first.share(
            spec.round_id, s, sessions[s].share_keys({k: v[0] for k, v in keys.items()}, public)
        )

    def submit(aggregator: Aggregator, site: str) -> None:
        _, received = aggregator.shares_for(spec.round_id, site)
        assert received is not None
        masked = sessions[site].masked_input(codec.encode(vectors[site], SeededRandom(2)), received)
        cost = PrivacyCost(site, epsilon=0.5, delta=1e-6, epsilon_total=1.0)
        aggregator.submit(MaskedSubmission(spec.round_id, site, masked, cost, 0.0))

    submit(first, "site-0")
    submit(first, "site-1")
    first_store.close()  # the first aggregator is gone; its rounds live in the database

    store = Store(database_url)
    try:
        resumed = Aggregator(store)
        status = resumed.status(spec.round_id)
        assert status.phase is RoundPhase.COLLECTING
        assert sorted(status.submitted) == ["site-0", "site-1"]
        submit(resumed, "site-2")
        for s in SITES:
            _, request = resumed.unmask_request(spec.round_id, s)
            assert request is not None and sorted(request.survivors) == list(SITES)
            revealed = sessions[s].unmask(request.survivors, request.dropped)
            resumed.unmask(spec.round_id, s, revealed)

        status = resumed.status(spec.round_id)
        assert status.phase is RoundPhase.COMPLETE
        release = store.get_release(status.release_id)
        total = sum(vectors.values())
        assert release.noised_count == pytest.approx(150, abs=1e-3)
        np.testing.assert_allclose([v.value for v in release.values], total[:3] / 150, atol=1e-4)
        assert [c.site_id for c in release.costs] == list(SITES)
        journal = RoundJournal(store)
        assert journal.entries(spec.round_id) == [] and journal.running_sum(spec.round_id) is None
        resumes = [
            e for e in store.audit_entries(round_id=spec.round_id) if e.action == "resume_round"
        ]
        assert [e.outcome for e in resumes] == ["ok"]
    finally:
        store.close()
