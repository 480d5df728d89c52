"""The Aggregation and Query services over real gRPC on loopback.

Rounds run the real site protocol (signed X25519 keys, Shamir shares sealed with AES-GCM,
self and pairwise masks, unmasking) in threads; bad messages are refused with clear status
codes, written to the audit log, and leave the round and the store intact.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.secagg_client import AggregationClient, SiteInput, run_secure_round
from fedlens import wire
from fedlens.types import PrivacyCost, RoundPhase, RoundSpec
from fedlens.v1 import aggregation_pb2, query_pb2
from privacy import FixedPointCodec, SeededRandom
from privacy.secagg_crypto import raw_public
from privacy.secagg_params import SecAggParams
from privacy.secagg_site import SiteSession
from server.aggregation import Aggregator, QueryHandler
from server.grpc_server import serve
from server.identities import IdentityRegistry
from server.storage import Store
from tests.secagg_spec import CLIP, attribution_round
from tests.server.conftest import Coordinator

SITES = ("site-0", "site-1", "site-2")


def spec(
    round_id: str = "r1",
    sites: tuple[str, ...] = SITES,
    *,
    threshold: int = 0,
    timeout: float = 10.0,
) -> RoundSpec:
    return attribution_round(round_id, sites, threshold=threshold, phase_timeout_s=timeout)


def cost(site: str) -> PrivacyCost:
    return PrivacyCost(site_id=site, epsilon=0.5, delta=1e-6, epsilon_total=2.0)


def open_round(coord: Coordinator, s: RoundSpec) -> None:
    coord.aggregation.OpenRound(aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(s)))


def site_vectors(sites: tuple[str, ...] = SITES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {}
    for site in sites:
        attr = rng.normal(size=3)
        out[site] = np.concatenate([attr, [100 * CLIP]])  # 100 records each
    return out


def params_of(s: RoundSpec) -> SecAggParams:
    return SecAggParams.for_round(s)


def run_sites(
    coord: Coordinator,
    vectors: dict[str, np.ndarray],
    s: RoundSpec,
    *,
    identities: dict[str, Ed25519PrivateKey] | None = None,
    vanish_before_submit: frozenset[str] = frozenset(),
) -> dict[str, object]:
    """Run every site of ``vectors`` in a thread; a site in ``vanish_before_submit``
    shares its keys and then disappears (its process dies before masking)."""
    codec = FixedPointCodec(bits=s.bits, scale=s.scale)
    results: dict[str, object] = {}

    class VanishedError(Exception):
        pass

    def one(site: str) -> None:
        identity = (identities or {}).get(site) or Ed25519PrivateKey.generate()
        session = SiteSession(params_of(s), site, identity)

        def make_input() -> SiteInput:
            if site in vanish_before_submit:
                raise VanishedError(site)
            encoded = codec.encode(vectors[site], SeededRandom(1))
            return SiteInput(encoded, cost(site), 0.1)

        with AggregationClient(coord.running.address) as client:
            try:
                results[site] = run_secure_round(
                    client, session, make_input, timeout_s=s.phase_timeout_s + 5
                )
            except Exception as exc:  # collected and asserted on below
                results[site] = exc

    threads = [threading.Thread(target=one, args=(site,)) for site in vectors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.both_backends
def test_a_masked_round_releases_the_sum_and_stores_no_site_vector(
    coordinator: Coordinator,
) -> None:
    vectors = site_vectors()
    open_round(coordinator, spec())
    results = run_sites(coordinator, vectors, spec())
    assert not [r for r in results.values() if isinstance(r, Exception)]

    status = coordinator.aggregation.GetRoundStatus(
        aggregation_pb2.GetRoundStatusRequest(round_id="r1")
    )
    assert status.phase == aggregation_pb2.ROUND_PHASE_COMPLETE
    release = coordinator.query.GetRelease(
        query_pb2.GetReleaseRequest(release_id=status.release_id)
    )
    total = sum(vectors.values())
    assert release.noised_count == pytest.approx(300, abs=1e-3)
    np.testing.assert_allclose([v.value for v in release.values], total[:3] / 300, atol=1e-4)
    assert [c.site_id for c in release.costs] == list(SITES)
    assert next(g.name for g in release.grouped) in {"age", "sex"}
    assert release.values[0].noise_std == pytest.approx(math.sqrt(3) * 0.1 / 300)

    # Nothing stored is a coordinate of a site's own vector, summed or averaged.
    stored = np.array(list(numbers(coordinator.store.dump())))
    for vec in vectors.values():
        for v in (*vec[:3], *(vec[:3] / 100)):
            assert not np.any(np.isclose(stored, v, rtol=1e-6, atol=0)), v

    listed = coordinator.query.ListReleases(query_pb2.ListReleasesRequest())
    assert [r.release_id for r in listed.releases] == [status.release_id]
    assert listed.releases[0].num_sites == 3


def test_a_site_that_vanishes_after_sharing_is_unmasked_out_of_the_sum(
    coordinator: Coordinator,
) -> None:
    sites = ("site-0", "site-1", "site-2", "site-3")
    s = spec("r-drop", sites, threshold=3, timeout=2.0)
    open_round(coordinator, s)
    vectors = site_vectors(sites)
    results = run_sites(coordinator, vectors, s, vanish_before_submit=frozenset({"site-3"}))
    assert isinstance(results["site-3"], Exception)
    status = coordinator.aggregator.status("r-drop")
    assert status.phase is RoundPhase.COMPLETE, status.reason
    assert status.submitted == ("site-0", "site-1", "site-2") or set(status.submitted) == {
        "site-0",
        "site-1",
        "site-2",
    }
    release = coordinator.query.GetRelease(
        query_pb2.GetReleaseRequest(release_id=status.release_id)
    )
    survivors = sum(vectors[x] for x in ("site-0", "site-1", "site-2"))
    assert release.noised_count == pytest.approx(300, abs=1e-3)
    np.testing.assert_allclose([v.value for v in release.values], survivors[:3] / 300, atol=1e-4)
    assert [c.site_id for c in release.costs] == ["site-0", "site-1", "site-2"]
    assert release.params["sites_in_sum"] == "3"


def test_dropouts_below_the_threshold_abort_and_release_nothing(coordinator: Coordinator) -> None:
    s = spec("r2", threshold=3, timeout=1.0)
    open_round(coordinator, s)
    vectors = site_vectors()
    del vectors["site-2"]
    results = run_sites(coordinator, vectors, s)
    assert all(isinstance(r, Exception) for r in results.values())
    status = coordinator.aggregator.status("r2")
    assert status.phase is RoundPhase.ABORTED
    assert "site-2" in status.reason and "threshold" in status.reason
    assert coordinator.store.list_releases() == []
    assert coordinator.store.round_phase("r2")[0] == "aborted"


def _refusal(call: object, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request)  # type: ignore[operator]
    return info.value  # type: ignore[return-value]


def _signed(s: RoundSpec, site: str, identity: Ed25519PrivateKey) -> aggregation_pb2.SignedKeys:
    keys = SiteSession(params_of(s), site, identity).advertise()
    return wire.signed_keys_to_proto(keys, raw_public(identity))


def _assert_refused(coord: Coordinator, action: str, round_id: str) -> None:
    refusals = [
        e
        for e in coord.store.audit_entries(round_id=round_id)
        if e.outcome == "refused" and e.action == action
    ]
    assert refusals, f"no refusal of {action} in the audit log"


@pytest.mark.both_backends
def test_bad_key_advertisements_are_refused_and_audited(coordinator: Coordinator) -> None:
    s = spec("r-adv")
    open_round(coordinator, s)
    agg = coordinator.aggregation.AdvertiseKeys
    alice = Ed25519PrivateKey.generate()
    good = _signed(s, "site-0", alice)
    agg(aggregation_pb2.AdvertiseKeysRequest(round_id="r-adv", keys=good))
    # Replayed (the same signed keys again): already exists, not counted twice.
    err = _refusal(agg, aggregation_pb2.AdvertiseKeysRequest(round_id="r-adv", keys=good))
    assert err.code() is grpc.StatusCode.ALREADY_EXISTS
    # Signed by another key than the one presented.
    forged = _signed(s, "site-1", Ed25519PrivateKey.generate())
    forged.identity_public = raw_public(Ed25519PrivateKey.generate())
    err = _refusal(agg, aggregation_pb2.AdvertiseKeysRequest(round_id="r-adv", keys=forged))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not signed" in (err.details() or "")
    # Wrong-length key.
    short = _signed(s, "site-2", Ed25519PrivateKey.generate())
    short.mask_public = b"\x01" * 31
    err = _refusal(agg, aggregation_pb2.AdvertiseKeysRequest(round_id="r-adv", keys=short))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "32 bytes" in (err.details() or "")
    # Keys signed for another round, replayed into this one.
    other = _signed(spec("r-other"), "site-2", alice)
    err = _refusal(agg, aggregation_pb2.AdvertiseKeysRequest(round_id="r-adv", keys=other))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    # A site outside the round.
    outsider = _signed(spec("r-adv", ("site-0", "site-1", "eve")), "eve", alice)
    err = _refusal(agg, aggregation_pb2.AdvertiseKeysRequest(round_id="r-adv", keys=outsider))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    _assert_refused(coordinator, "advertise_keys", "r-adv")
    status = coordinator.aggregator.status("r-adv")
    assert status.phase is RoundPhase.ADVERTISING
    assert status.advertised == ("site-0",)


def _collecting_round(coord: Coordinator, round_id: str) -> None:
    """Open a round and take every site through sharing, so it collects vectors."""
    s = spec(round_id)
    open_round(coord, s)
    ids = {site: Ed25519PrivateKey.generate() for site in SITES}
    sessions = {site: SiteSession(params_of(s), site, ids[site]) for site in SITES}
    for site in SITES:
        coord.aggregator.advertise(sessions[site].advertise(), raw_public(ids[site]))
    public = {site: raw_public(key) for site, key in ids.items()}
    for site in SITES:
        _, keys = coord.aggregator.peer_keys(round_id, site)
        sealed = sessions[site].share_keys({k: v[0] for k, v in keys.items()}, public)
        coord.aggregator.share(round_id, site, sealed)
    assert coord.aggregator.status(round_id).phase is RoundPhase.COLLECTING


def _submission(round_id: str = "r1", **fields: object) -> aggregation_pb2.SubmitMaskedRequest:
    base: dict[str, object] = dict(
        round_id=round_id,
        site_id="site-0",
        values=np.arange(4, dtype="<u8").tobytes(),
        cost=wire.privacy_cost_to_proto(cost("site-0")),
        noise_std=0.1,
    )
    base.update(fields)
    return aggregation_pb2.SubmitMaskedRequest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "fields", "code", "words"),
    [
        (
            "wrong length",
            dict(values=np.arange(2, dtype="<u8").tobytes()),
            "INVALID_ARGUMENT",
            "shape",
        ),
        ("torn words", dict(values=b"\x00" * 31), "INVALID_ARGUMENT", "whole uint64"),
        (
            "NaN cost",
            dict(
                cost=wire.privacy_cost_to_proto(
                    PrivacyCost(site_id="site-0", epsilon=math.nan, delta=1e-6, epsilon_total=1)
                )
            ),
            "INVALID_ARGUMENT",
            "cost.epsilon",
        ),
        ("NaN noise std", dict(noise_std=math.nan), "INVALID_ARGUMENT", "noise_std"),
        (
            "out of field",
            dict(values=np.array([1, 2, 3, 2**40], dtype="<u8").tobytes()),
            "INVALID_ARGUMENT",
            "outside the field",
        ),
        (
            "cost of another site",
            dict(cost=wire.privacy_cost_to_proto(cost("site-1"))),
            "INVALID_ARGUMENT",
            "not the submitter",
        ),
        ("unknown round", dict(round_id="nope"), "NOT_FOUND", "no open round 'nope'"),
        ("outsider", dict(site_id="eve"), "INVALID_ARGUMENT", "not the submitter 'eve'"),
    ],
)
def test_bad_submissions_are_refused_and_the_round_survives(
    coordinator: Coordinator,
    name: str,
    fields: dict[str, object],
    code: str,
    words: str,
) -> None:
    _collecting_round(coordinator, "r1")
    err = _refusal(coordinator.aggregation.SubmitMasked, _submission(**fields))
    assert err.code() is getattr(grpc.StatusCode, code)
    assert words in (err.details() or "")
    status = coordinator.aggregator.status("r1")
    assert status.phase is RoundPhase.COLLECTING
    assert status.submitted == ()
    if name != "unknown round":
        _assert_refused(coordinator, "submit_masked", "r1")
    assert coordinator.store.list_releases() == []


@pytest.mark.both_backends
def test_duplicate_and_late_messages_are_refused_and_not_counted(coordinator: Coordinator) -> None:
    _collecting_round(coordinator, "r1")
    coordinator.aggregation.SubmitMasked(_submission())
    err = _refusal(coordinator.aggregation.SubmitMasked, _submission())
    assert err.code() is grpc.StatusCode.ALREADY_EXISTS
    # A late share message, after the sharing phase closed.
    late = aggregation_pb2.ShareKeysRequest(round_id="r1", site_id="site-0")
    err = _refusal(coordinator.aggregation.ShareKeys, late)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "collecting, not sharing" in (err.details() or "")
    # A revealed share of an unknown kind.
    bad = aggregation_pb2.UnmaskRequest(
        round_id="r1",
        site_id="site-0",
        shares=[aggregation_pb2.RevealedShare(owner="site-1", kind=0, share=b"")],
    )
    err = _refusal(coordinator.aggregation.Unmask, bad)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert coordinator.aggregator.status("r1").submitted == ("site-0",)
    _assert_refused(coordinator, "submit_masked", "r1")
    _assert_refused(coordinator, "share_keys", "r1")


def test_strict_enrolment_refuses_unknown_and_mismatched_identities(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'strict.db'}")
    registry = IdentityRegistry(store)
    enrolled = Ed25519PrivateKey.generate()
    from datetime import UTC, datetime

    registry.enroll("site-0", raw_public(enrolled), now=datetime.now(UTC))
    aggregator = Aggregator(store, identities=registry, enrolment="strict")
    running = serve(aggregator, QueryHandler(store))
    coord = Coordinator(store, aggregator, running)
    try:
        s = spec("r-strict")
        open_round(coord, s)
        agg = coord.aggregation.AdvertiseKeys
        stranger = _signed(s, "site-1", Ed25519PrivateKey.generate())
        err = _refusal(
            agg, aggregation_pb2.AdvertiseKeysRequest(round_id="r-strict", keys=stranger)
        )
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "not enrolled" in (err.details() or "")
        impostor = _signed(s, "site-0", Ed25519PrivateKey.generate())
        err = _refusal(
            agg, aggregation_pb2.AdvertiseKeysRequest(round_id="r-strict", keys=impostor)
        )
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "differs from its enrolment" in (err.details() or "")
        agg(
            aggregation_pb2.AdvertiseKeysRequest(
                round_id="r-strict", keys=_signed(s, "site-0", enrolled)
            )
        )
        assert aggregator.status("r-strict").advertised == ("site-0",)
    finally:
        coord.channel.close()
        running.stop(grace=None)
        store.close()


@pytest.mark.both_backends
def test_first_use_enrolment_pins_the_key_for_later_rounds(database_url: str) -> None:
    store = Store(database_url)
    registry = IdentityRegistry(store)
    aggregator = Aggregator(store, identities=registry, enrolment="first-use")
    running = serve(aggregator, QueryHandler(store))
    coord = Coordinator(store, aggregator, running)
    try:
        ids = {site: Ed25519PrivateKey.generate() for site in SITES}
        open_round(coord, spec("r-a"))
        results = run_sites(coord, site_vectors(), spec("r-a"), identities=ids)
        assert all(getattr(r, "phase", None) is RoundPhase.COMPLETE for r in results.values())
        assert registry.enrolled() == {site: raw_public(k) for site, k in ids.items()}
        open_round(coord, spec("r-b"))
        agg = coord.aggregation.AdvertiseKeys
        impostor = _signed(spec("r-b"), "site-0", Ed25519PrivateKey.generate())
        err = _refusal(agg, aggregation_pb2.AdvertiseKeysRequest(round_id="r-b", keys=impostor))
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        coord.channel.close()
        running.stop(grace=None)
        store.close()


def numbers(obj: object) -> Iterator[float]:
    """Every number inside a nested structure, including JSON held in strings."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, int | float):
        yield float(obj)
    elif isinstance(obj, str):
        try:
            yield from numbers(json.loads(obj))
        except ValueError:
            return
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from numbers(v)


def test_health_and_reflection_services_answer(coordinator: Coordinator) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(coordinator.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="fedlens.v1.Aggregation"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(coordinator.channel)
    answers = list(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"fedlens.v1.Aggregation", "fedlens.v1.Query", "grpc.health.v1.Health"} <= names


@pytest.mark.both_backends
def test_unknown_release_is_not_found(coordinator: Coordinator) -> None:
    with pytest.raises(grpc.RpcError) as info:
        coordinator.query.GetRelease(query_pb2.GetReleaseRequest(release_id="missing"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


@pytest.mark.both_backends
def test_ids_no_round_can_have_are_not_found_and_audited(coordinator: Coordinator) -> None:
    """A NUL character or a thousand characters in an id: NOT_FOUND, and the refusal is
    audited with the id escaped and cut to fit (PostgreSQL stores neither as sent)."""
    for round_id in ("r\x00", "r" * 1000):
        status = aggregation_pb2.GetRoundStatusRequest(round_id=round_id)
        err = _refusal(coordinator.aggregation.GetRoundStatus, status)
        assert err.code() is grpc.StatusCode.NOT_FOUND
        submission = _submission(round_id=round_id, site_id="site\x00" * 40)
        err = _refusal(coordinator.aggregation.SubmitMasked, submission)
        assert err.code() is grpc.StatusCode.NOT_FOUND
    err = _refusal(coordinator.query.GetRelease, query_pb2.GetReleaseRequest(release_id="\x00"))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    refusals = [e for e in coordinator.store.audit_entries() if e.action == "submit_masked"]
    assert [(e.round_id, e.outcome) for e in refusals] == [
        ("r\\x00", "refused"),
        ("r" * 128, "refused"),
    ]
    assert refusals[0].actor == ("site\\x00" * 40)[:128]


def test_malformed_parameters_are_refused_when_the_round_opens(coordinator: Coordinator) -> None:
    bad = RoundSpec(**{**spec(round_id="r4").__dict__, "params": {"groups": "{not json"}})
    with pytest.raises(grpc.RpcError) as info:
        open_round(coordinator, bad)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "parameters rejected" in (info.value.details() or "")  # type: ignore[attr-defined]
    assert not coordinator.store.round_exists("r4")


def test_a_round_that_cannot_be_finished_aborts_and_releases_nothing(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlens.errors import StorageError

    def broken(*args: object, **kwargs: object) -> None:
        raise StorageError("disk full")

    monkeypatch.setattr(coordinator.store, "save_release", broken)
    open_round(coordinator, spec(round_id="r5"))
    results = run_sites(coordinator, site_vectors(), spec(round_id="r5"))
    assert sum(isinstance(r, Exception) for r in results.values()) == 1  # the last unmasker
    status = coordinator.aggregator.status("r5")
    assert status.phase is RoundPhase.ABORTED
    assert "disk full" in status.reason
    assert coordinator.store.round_phase("r5")[0] == "aborted"


def test_a_site_over_budget_declines_and_the_round_goes_on_without_it(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    from client.explanation import ExplainRequest, contribute_explanation
    from client.ledger_store import LedgerStore
    from fedlens.errors import BudgetExceededError
    from fedlens.models import build_model

    sites = ("site-0", "site-1", "site-2")
    s = RoundSpec(
        **{**spec("r6", sites, threshold=2).__dict__, "timeout": 0}
        if False
        else {**spec("r6", sites, threshold=2).__dict__, "phase_timeout_s": 30.0}
    )
    open_round(coordinator, s)
    others: dict[str, object] = {}

    def run_others() -> None:
        others.update(
            run_sites(coordinator, {k: v for k, v in site_vectors().items() if k != "site-0"}, s)
        )

    thread = threading.Thread(target=run_others)
    thread.start()
    store = LedgerStore(tmp_path / "ledger.sqlite")
    request = ExplainRequest(
        round_id="r6",
        kind="global_attribution",
        site_ids=sites,
        aggregator=coordinator.running.address,
        epsilon=5.0,
        delta=1e-6,
        clip_bound=CLIP,
        bits=s.bits,
        scale=s.scale,
        timeout_s=30.0,
        threshold=2,
    )
    with pytest.raises(BudgetExceededError):
        contribute_explanation(
            request,
            site_id="site-0",
            model=build_model("logistic", 3),
            features=np.zeros((4, 3), dtype=np.float32),
            labels=np.zeros(4, dtype=np.int64),
            ledger=store.load(1.0, 1e-5),
            store=store,
            rng=SeededRandom(0),
            now=datetime(2026, 1, 1, tzinfo=UTC),
        )
    thread.join(60)
    status = coordinator.aggregator.status("r6")
    assert status.phase is RoundPhase.COMPLETE, status.reason
    assert set(status.submitted) == {"site-1", "site-2"}
    assert store.history() == []
