"""The coordinator's store, the same tests on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
import torch

from fedlens.errors import ConfigurationError, IntegrityError, NotFoundError, StorageError
from fedlens.types import PrivacyCost, Release, ReleasedValue, RoundSpec, SiteLedger
from privacy import LedgerEvent
from server.storage import Store
from tests.secagg_spec import attribution_round

pytestmark = pytest.mark.both_backends

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = Store(database_url)
    yield s
    s.close()


def release(release_id: str, round_id: str, *, kind: str = "global_attribution") -> Release:
    return Release(
        release_id=release_id,
        round_id=round_id,
        kind=kind,
        created_at="",
        noised_count=301.25,
        values=(
            ReleasedValue("age", 0.125, 0.01),
            ReleasedValue("sex=Female — ü", -1e-300, 1e300),
        ),
        grouped=(ReleasedValue("sex", 0.5, 0.02),),
        costs=(
            PrivacyCost("site-b", epsilon=0.5, delta=1e-6, epsilon_total=1.5),
            PrivacyCost("site-a", epsilon=0.25, delta=1e-7, epsilon_total=0.75),
        ),
        params={"method": "integrated_gradients", "feature_names": '["age", "sex"]'},
    )


def stored_round(store: Store, round_id: str, *, at: datetime = T0) -> RoundSpec:
    spec = attribution_round(round_id, ("site-a", "site-b", "site-c"), threshold=2)
    store.save_round(spec, "advertising", now=at)
    return spec


def event(label: str, at: datetime, *, steps: int = 1) -> LedgerEvent:
    if steps > 1:
        return LedgerEvent("dpsgd", 1.1, 0.01, steps, label=label, created_at=at)
    return LedgerEvent("gaussian", 2.5, label=label, created_at=at)


# -- rounds ---------------------------------------------------------------------------


def test_rounds_keep_their_spec_and_phase(store: Store) -> None:
    first = stored_round(store, "r-1", at=T0)
    second = RoundSpec(
        round_id="r-2",
        kind="fairness",
        site_ids=("site-a", "site-b"),
        length=7,
        bits=48,
        scale=2.0**20,
        clip_bound=1.5,
        labels=("a", "b — ç"),
        phase_timeout_s=30.5,
        params={"sensitive": '["sex"]', "note": "NUL \x00 inside"},
        threshold=2,
        degree=1,
        noise="distributed",
        colluding=1,
    )
    store.save_round(second, "advertising", now=T0 + timedelta(seconds=1))
    stored_round(store, "r-3", at=T0 + timedelta(seconds=2))
    store.update_round("r-3", "complete", now=T0, release_id="rel-3")
    store.update_round("r-1", "collecting", now=T0 + timedelta(minutes=1))

    assert store.unfinished_rounds() == [first, second]
    assert store.round_phase("r-3") == ("complete", "", "rel-3")
    store.update_round("r-2", "aborted", now=T0, reason="too few sites \x00 left")
    assert store.round_phase("r-2") == ("aborted", "too few sites \\x00 left", "")
    assert store.round_exists("r-1") and not store.round_exists("r-9")


def test_unknown_or_impossible_round_ids_are_not_found(store: Store) -> None:
    stored_round(store, "r-1")
    for round_id in ("r-9", "r\x00-1", "r" * 1000):
        assert not store.round_exists(round_id)
        with pytest.raises(NotFoundError):
            store.round_phase(round_id)
        with pytest.raises(NotFoundError):
            store.update_round(round_id, "aborted", now=T0)


@pytest.mark.parametrize("round_id", ["", "r" * 129, "r\x001"])
def test_a_round_id_the_store_cannot_hold_is_refused(store: Store, round_id: str) -> None:
    with pytest.raises(ConfigurationError, match="1-128 characters"):
        stored_round(store, round_id)
    assert store.unfinished_rounds() == []


def test_a_round_id_is_stored_once(store: Store) -> None:
    stored_round(store, "r-1")
    with pytest.raises(StorageError):
        stored_round(store, "r-1")


# -- releases -------------------------------------------------------------------------


def test_a_release_reads_back_as_stored_with_utc_times(store: Store) -> None:
    stored_round(store, "r-1")
    berlin = timezone(timedelta(hours=2))
    store.save_release(
        release("rel-1", "r-1"), created_at=datetime(2025, 3, 1, 14, 0, tzinfo=berlin)
    )

    got = store.get_release("rel-1")
    want = release("rel-1", "r-1")
    assert got.created_at == "2025-03-01T12:00:00"  # UTC, as SQLite has always returned it
    assert got.values == want.values and got.grouped == want.grouped
    assert got.params == want.params and got.noised_count == want.noised_count
    assert got.costs == tuple(sorted(want.costs, key=lambda c: c.site_id))


def test_non_finite_released_values_survive(store: Store) -> None:
    stored_round(store, "r-1")
    values = (
        ReleasedValue("gap", math.nan, 0.1),
        ReleasedValue("ratio", math.inf, -math.inf),
        ReleasedValue("plain", 1.0, 0.0),
    )
    params = {"a": "NaN", "$float": "inf"}  # data shaped like the JSON codec's marker
    rel = Release("rel-1", "r-1", "fairness", "", 0.0, values, (), (), params)
    store.save_release(rel, created_at=T0)

    got = store.get_release("rel-1")
    assert math.isnan(got.values[0].value) and got.values[0].noise_std == 0.1
    assert got.values[1:] == values[1:]
    assert got.params == params


def test_releases_list_newest_first_with_their_site_counts(store: Store) -> None:
    for n in range(4):
        stored_round(store, f"r-{n}")
        kind = "fairness" if n == 2 else "global_attribution"
        rel = release(f"rel-{n}", f"r-{n}", kind=kind)
        if n == 3:
            rel = Release(rel.release_id, rel.round_id, rel.kind, "", 1.0, (), (), ())
        store.save_release(rel, created_at=T0 + timedelta(hours=n))

    listed = store.list_releases()
    assert [r.release_id for r in listed] == ["rel-3", "rel-2", "rel-1", "rel-0"]
    assert [r.num_sites for r in listed] == [0, 2, 2, 2]
    assert listed[1].created_at == "2025-03-01T14:00:00"
    assert [r.release_id for r in store.list_releases(limit=2)] == ["rel-3", "rel-2"]
    assert [r.release_id for r in store.list_releases(kind="fairness")] == ["rel-2"]
    assert store.list_releases(kind="fair\x00ness") == []
    for release_id in ("rel-9", "rel\x00-1"):
        with pytest.raises(NotFoundError):
            store.get_release(release_id)


def test_a_round_has_at_most_one_release(store: Store) -> None:
    stored_round(store, "r-1")
    store.save_release(release("rel-1", "r-1"), created_at=T0)
    with pytest.raises(StorageError):
        store.save_release(release("rel-2", "r-1"), created_at=T0)
    assert [r.release_id for r in store.list_releases()] == ["rel-1"]


# -- models ---------------------------------------------------------------------------


def test_models_keep_their_weights_and_the_latest_is_found(store: Store) -> None:
    state = {"linear.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    first = store.save_model(
        dataset="adult", model="logistic", state=state, now=T0, params={"seed": "1"}
    )
    second = store.save_model(
        dataset="breast_cancer", model="mlp", state=state, now=T0 + timedelta(hours=1)
    )

    got = store.get_model(first)
    assert torch.equal(got.state["linear.weight"], state["linear.weight"])
    assert (got.dataset, got.model, dict(got.params)) == ("adult", "logistic", {"seed": "1"})
    assert got.created_at == "2025-03-01T12:00:00"
    assert store.latest_model().model_id == second
    assert store.latest_model(dataset="adult").model_id == first
    with pytest.raises(NotFoundError, match="no trained model"):
        store.latest_model(dataset="ad\x00ult")
    with pytest.raises(NotFoundError):
        store.get_model("m\x00")


# -- audit ----------------------------------------------------------------------------


def test_audit_keeps_every_entry_in_order(store: Store) -> None:
    store.audit(now=T0, actor="site-a", action="advertise_keys", outcome="ok", round_id="r-1")
    store.audit(
        now=T0 + timedelta(seconds=1),
        actor="coordinator",
        action="open_round",
        outcome="refused",
        round_id="r-2",
        detail="round id in use",
    )
    entries = store.audit_entries()
    assert [(e.actor, e.action, e.outcome) for e in entries] == [
        ("site-a", "advertise_keys", "ok"),
        ("coordinator", "open_round", "refused"),
    ]
    assert entries[0].at == datetime(2025, 3, 1, 12, 0, 0)  # naive UTC on both backends
    assert [e.detail for e in store.audit_entries(round_id="r-2")] == ["round id in use"]


def test_audit_of_a_malformed_request_keeps_what_it_carried(store: Store) -> None:
    """Refusals carry whatever a caller sent: over-long ids and NUL characters are
    clipped and escaped rather than losing the audit row."""
    long_id = "r" * 500
    store.audit(
        now=T0,
        actor="s\x00" * 100,
        action="submit_masked" * 10,
        outcome="refused",
        round_id=long_id,
        detail="x" * 5000,
    )
    store.audit(now=T0, actor="a", action="b", outcome="refused", round_id="r\x00")
    (entry,) = store.audit_entries(round_id=long_id)
    assert entry.actor == ("s\\x00" * 100)[:128]
    assert len(entry.action) == 64 and len(entry.round_id) == 128 and len(entry.detail) == 2000
    assert [e.round_id for e in store.audit_entries(round_id="r\x00")] == ["r\\x00"]


# -- mirrored ledgers -----------------------------------------------------------------


def test_ledger_mirror_appends_and_refuses_rewrites(store: Store) -> None:
    events = (
        event("training", T0, steps=120),
        event("round r-1 — ü", T0 + timedelta(hours=1)),
        event("round r-2", (T0 + timedelta(hours=2)).astimezone(timezone(timedelta(hours=-5)))),
    )
    ledger = SiteLedger("site-a", budget_epsilon=4.0, delta=1e-5, events=events[:2])
    assert store.mirror_ledger(ledger, now=T0) == 2
    assert store.mirror_ledger(ledger, now=T0) == 0
    extended = SiteLedger("site-a", 4.0, 1e-5, events)
    assert store.mirror_ledger(extended, now=T0) == 1
    store.mirror_ledger(SiteLedger("site-b", 1.0, 1e-6, ()), now=T0)

    (mirrored,) = store.site_ledgers(site_id="site-a")
    assert mirrored.events == events and (mirrored.budget_epsilon, mirrored.delta) == (4.0, 1e-5)
    assert [m.site_id for m in store.site_ledgers()] == ["site-a", "site-b"]
    assert store.site_ledgers(site_id="site\x00") == []

    rewritten = SiteLedger("site-a", 4.0, 1e-5, (events[0], event("other", T0), events[2]))
    with pytest.raises(IntegrityError, match="append-only"):
        store.mirror_ledger(rewritten, now=T0)
    with pytest.raises(IntegrityError, match="budget"):
        store.mirror_ledger(SiteLedger("site-a", 8.0, 1e-5, events), now=T0)
    assert store.site_ledgers(site_id="site-a")[0].events == events


@pytest.mark.parametrize("site_id", ["", "s" * 129, "site\x00a", "../site"])
def test_a_malformed_site_id_is_refused(store: Store, site_id: str) -> None:
    with pytest.raises(ConfigurationError, match="site id"):
        store.mirror_ledger(SiteLedger(site_id, 1.0, 1e-6, ()), now=T0)
    assert store.site_ledgers() == []


def test_a_label_with_a_nul_is_refused(store: Store) -> None:
    ledger = SiteLedger("site-a", 1.0, 1e-6, (event("round \x00", T0),))
    with pytest.raises(ConfigurationError, match="NUL"):
        store.mirror_ledger(ledger, now=T0)
    assert store.site_ledgers() == []


def test_concurrent_reports_of_one_ledger_append_each_event_once(database_url: str) -> None:
    """Sites retry reports; two copies of one report racing each other store it once."""
    setup = Store(database_url)
    setup.mirror_ledger(SiteLedger("site-a", 4.0, 1e-5, ()), now=T0)
    setup.close()
    events = tuple(event(f"round {n}", T0 + timedelta(minutes=n)) for n in range(5))
    ledger = SiteLedger("site-a", 4.0, 1e-5, events)
    stores = [Store(database_url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    outcomes: list[int | Exception] = []

    def report(s: Store) -> None:
        start.wait()
        try:
            outcomes.append(s.mirror_ledger(ledger, now=T0))
        except StorageError as exc:  # a commit that lost the race (SQLite)
            outcomes.append(exc)

    threads = [threading.Thread(target=report, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores[0].site_ledgers()[0].events == events
    assert sorted(o for o in outcomes if isinstance(o, int))[-1] == len(events)
    for s in stores:
        s.close()


def test_dump_holds_every_table(store: Store) -> None:
    stored_round(store, "r-1")
    store.save_release(release("rel-1", "r-1"), created_at=T0)
    dump = store.dump()
    assert {"rounds", "releases", "release_costs", "audit_log", "site_ledgers"} <= set(dump)
    assert [row["release_id"] for row in dump["releases"]] == ["rel-1"]
    assert len(dump["release_costs"]) == 2
