"""The Aggregation and Query services over real gRPC on loopback.

A round of three sites runs the real site protocol (X25519 keys, pairwise masks); bad
messages are refused with clear status codes and leave the round and the store intact.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from client.secagg_client import AggregationClient
from fedlens import wire
from fedlens.errors import IntegrityError
from fedlens.types import KeyAdvertisement, MaskedSubmission, PrivacyCost, RoundPhase, RoundSpec
from fedlens.v1 import aggregation_pb2, query_pb2
from privacy import FixedPointCodec, SeededRandom, generate_keypair, mask_vector
from tests.server.conftest import Coordinator

SITES = ("site-0", "site-1", "site-2")
LABELS = ("age", "sex=Female", "sex=Male")
CLIP = 0.5


def spec(round_id: str = "r1", sites: tuple[str, ...] = SITES) -> RoundSpec:
    return RoundSpec(
        round_id=round_id,
        kind="global_attribution",
        site_ids=sites,
        length=len(LABELS) + 1,
        bits=40,
        scale=2.0**16,
        clip_bound=CLIP,
        labels=LABELS,
        phase_timeout_s=5.0,
        params={"groups": json.dumps({"age": [0], "sex": [1, 2]})},
    )


def cost(site: str) -> PrivacyCost:
    return PrivacyCost(site_id=site, epsilon=0.5, delta=1e-6, epsilon_total=2.0)


def open_round(coord: Coordinator, s: RoundSpec) -> None:
    coord.aggregation.OpenRound(aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(s)))


def site_vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {}
    for site in SITES:
        attr = rng.normal(size=3)
        out[site] = np.concatenate([attr, [100 * CLIP]])  # 100 records each
    return out


def run_sites(coord: Coordinator, vectors: dict[str, np.ndarray], s: RoundSpec) -> list[object]:
    codec = FixedPointCodec(bits=s.bits, scale=s.scale)
    results: list[object] = []

    def one(site: str) -> None:
        keys = generate_keypair()
        encoded = codec.encode(vectors[site], SeededRandom(1))
        with AggregationClient(coord.running.address) as client:
            try:
                client.advertise(KeyAdvertisement(s.round_id, site, keys.public_bytes))
                peers = client.wait_for_peers(
                    s.round_id, site, expected=s.site_ids, own_key=keys.public_bytes, timeout_s=5.0
                )
                masked = mask_vector(encoded, keys, site, peers, s.round_id, s.bits)
                results.append(
                    client.submit(
                        MaskedSubmission(s.round_id, site, masked, cost(site), noise_std=0.1)
                    )
                )
            except Exception as exc:  # collected and asserted on below
                results.append(exc)

    threads = [threading.Thread(target=one, args=(site,)) for site in vectors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_a_masked_round_releases_the_sum_and_stores_no_site_vector(
    coordinator: Coordinator,
) -> None:
    vectors = site_vectors()
    open_round(coordinator, spec())
    results = run_sites(coordinator, vectors, spec())
    assert not [r for r in results if isinstance(r, Exception)]

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


def test_masked_vectors_on_the_wire_do_not_reveal_the_site_vector() -> None:
    codec = FixedPointCodec(bits=40, scale=2.0**16)
    enc = codec.encode(np.array([1.0, 2.0, 3.0, 50.0]), SeededRandom(0))
    mine, other = generate_keypair(), generate_keypair()
    masked = mask_vector(enc, mine, "site-0", {"site-1": other.public_bytes}, "r1", 40)
    decoded = codec.decode(masked)
    assert not np.allclose(decoded, [1.0, 2.0, 3.0, 50.0], atol=1.0)


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


def submit_raw(coord: Coordinator, **fields: object) -> grpc.RpcError:
    request = aggregation_pb2.SubmitMaskedRequest(**fields)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as info:
        coord.aggregation.SubmitMasked(request)
    return info.value  # type: ignore[return-value]


def advertise_all(coord: Coordinator, round_id: str = "r1") -> None:
    for site in SITES:
        coord.aggregation.AdvertiseKey(
            aggregation_pb2.AdvertiseKeyRequest(
                round_id=round_id, site_id=site, public_key=generate_keypair().public_bytes
            )
        )


def good_cost(site: str) -> object:
    return wire.privacy_cost_to_proto(cost(site))


@pytest.mark.parametrize(
    ("name", "fields", "code", "words"),
    [
        (
            "wrong length",
            dict(round_id="r1", site_id="site-0", values=[1, 2], cost=good_cost("site-0")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "length 2",
        ),
        (
            "NaN cost",
            dict(
                round_id="r1",
                site_id="site-0",
                values=[1, 2, 3, 4],
                cost=wire.privacy_cost_to_proto(
                    PrivacyCost(site_id="site-0", epsilon=math.nan, delta=1e-6, epsilon_total=1)
                ),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "cost.epsilon",
        ),
        (
            "NaN noise std",
            dict(
                round_id="r1",
                site_id="site-0",
                values=[1, 2, 3, 4],
                cost=good_cost("site-0"),
                noise_std=math.nan,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "noise_std",
        ),
        (
            "out of field",
            dict(
                round_id="r1", site_id="site-0", values=[1, 2, 3, 2**40], cost=good_cost("site-0")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside the field",
        ),
        (
            "unknown round",
            dict(round_id="nope", site_id="site-0", values=[1, 2, 3, 4], cost=good_cost("site-0")),
            grpc.StatusCode.NOT_FOUND,
            "no open round 'nope'",
        ),
    ],
)
def test_bad_submissions_are_refused_and_the_round_survives(
    coordinator: Coordinator,
    name: str,
    fields: dict[str, object],
    code: grpc.StatusCode,
    words: str,
) -> None:
    open_round(coordinator, spec())
    advertise_all(coordinator)
    err = submit_raw(coordinator, **fields)
    assert err.code() is code
    assert words in (err.details() or "")
    status = coordinator.aggregator.status("r1")
    assert status.phase is RoundPhase.COLLECTING
    assert status.submitted == ()
    refusals = [e for e in coordinator.store.audit_entries() if e.outcome == "refused"]
    assert refusals and refusals[-1].action == "submit_masked"
    assert coordinator.store.list_releases() == []


def test_duplicate_submission_is_already_exists_and_not_counted(coordinator: Coordinator) -> None:
    open_round(coordinator, spec())
    advertise_all(coordinator)
    fields = dict(round_id="r1", site_id="site-0", values=[1, 2, 3, 4], cost=good_cost("site-0"))
    coordinator.aggregation.SubmitMasked(aggregation_pb2.SubmitMaskedRequest(**fields))  # type: ignore[arg-type]
    err = submit_raw(coordinator, **fields)
    assert err.code() is grpc.StatusCode.ALREADY_EXISTS
    assert coordinator.aggregator.status("r1").submitted == ("site-0",)


def test_a_missing_site_fails_the_round_cleanly(coordinator: Coordinator) -> None:
    s = spec(round_id="r2")
    s = RoundSpec(**{**s.__dict__, "phase_timeout_s": 1.0})
    open_round(coordinator, s)
    vectors = site_vectors()
    del vectors["site-2"]
    results = run_sites(coordinator, vectors, s)
    assert all(isinstance(r, Exception) for r in results)
    status = coordinator.aggregator.status("r2")
    assert status.phase is RoundPhase.ABORTED
    assert "site-2" in status.reason
    assert coordinator.store.list_releases() == []
    assert coordinator.store.round_phase("r2")[0] == "aborted"


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


def test_unknown_release_is_not_found(coordinator: Coordinator) -> None:
    with pytest.raises(grpc.RpcError) as info:
        coordinator.query.GetRelease(query_pb2.GetReleaseRequest(release_id="missing"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_a_site_refuses_keys_that_are_not_exactly_the_rounds_sites(
    coordinator: Coordinator,
) -> None:
    s = spec(round_id="r3", sites=("site-0", "site-1"))
    open_round(coordinator, s)
    mine, other = generate_keypair(), generate_keypair()
    with AggregationClient(coordinator.running.address) as client:
        client.advertise(KeyAdvertisement("r3", "site-0", mine.public_bytes))
        client.advertise(KeyAdvertisement("r3", "site-1", other.public_bytes))
        with pytest.raises(IntegrityError, match="expected"):
            client.wait_for_peers(
                "r3",
                "site-0",
                expected=("site-0", "site-1", "site-2"),
                own_key=mine.public_bytes,
                timeout_s=1.0,
            )
        with pytest.raises(IntegrityError, match="own key"):
            client.wait_for_peers(
                "r3", "site-0", expected=s.site_ids, own_key=other.public_bytes, timeout_s=1.0
            )


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
    assert sum(isinstance(r, Exception) for r in results) == 1  # the last submitter
    status = coordinator.aggregator.status("r5")
    assert status.phase is RoundPhase.ABORTED
    assert "disk full" in status.reason
    assert coordinator.store.round_phase("r5")[0] == "aborted"


def test_a_site_over_budget_declines_and_the_others_stop_waiting(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    from client.explanation import ExplainRequest, contribute_explanation
    from client.ledger_store import LedgerStore
    from fedlens.errors import BudgetExceededError, StaleRoundError
    from fedlens.models import build_model

    sites = ("site-0", "site-1")
    s = RoundSpec(
        **{**spec(round_id="r6", sites=sites).__dict__, "phase_timeout_s": 60.0, "params": {}}
    )
    open_round(coordinator, s)
    waiting: list[object] = []

    def other_site() -> None:
        keys = generate_keypair()
        with AggregationClient(coordinator.running.address) as client:
            client.advertise(KeyAdvertisement("r6", "site-1", keys.public_bytes))
            started = time.monotonic()
            try:
                client.wait_for_peers(
                    "r6", "site-1", expected=sites, own_key=keys.public_bytes, timeout_s=60.0
                )
            except StaleRoundError as exc:
                waiting.append((exc, time.monotonic() - started))

    thread = threading.Thread(target=other_site)
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
        timeout_s=60.0,
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
    thread.join(30)
    status = coordinator.aggregator.status("r6")
    assert status.phase is RoundPhase.ABORTED
    assert "site-0 declined: BudgetExceededError" in status.reason
    assert len(waiting) == 1 and waiting[0][1] < 10  # type: ignore[index]
    assert store.history() == []
