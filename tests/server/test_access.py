"""Access control over real gRPC: tokens bound to roles, one interceptor, audited refusals,
rate limits; the secret never stored."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from fedlens import wire
from fedlens.errors import (
    AuthenticationError,
    ConfigurationError,
    NotFoundError,
    PermissionDeniedError,
)
from fedlens.query_client import QueryClient
from fedlens.types import RoundSpec
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc, query_pb2, query_pb2_grpc
from server.access import METHOD_ROLES, AccessControl, Role, required_role
from server.aggregation import Aggregator, QueryHandler
from server.grpc_server import RunningServer, serve
from server.storage import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Guarded:
    def __init__(self, tmp: Path) -> None:
        self.db = tmp / "fedlens.db"
        self.store = Store(f"sqlite:///{self.db}")
        self.clock = Clock()
        self.access = AccessControl(self.store, rate=2.0, burst=3, clock=self.clock)
        self.server: RunningServer = serve(
            Aggregator(self.store), QueryHandler(self.store), access=self.access
        )
        self.channel = grpc.insecure_channel(self.server.address)
        self.aggregation = aggregation_pb2_grpc.AggregationStub(self.channel)
        self.query = query_pb2_grpc.QueryStub(self.channel)
        self.tokens = {
            role: self.access.issue(f"{role.name.lower()}-1", role, now=NOW)[1] for role in Role
        }

    def meta(self, role: Role) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[role]}"),)

    def refusals(self) -> list[str]:
        return [e.detail for e in self.store.audit_entries() if e.action == "access_refused"]


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Guarded]:
    g = Guarded(tmp_path)
    yield g
    g.channel.close()
    g.server.stop(grace=None)
    g.store.close()


def _spec(round_id: str) -> aggregation_pb2.OpenRoundRequest:
    spec = RoundSpec(
        round_id=round_id,
        kind="feature_stats",
        site_ids=("a", "b", "c"),
        length=3,
        bits=32,
        scale=1000.0,
        clip_bound=1.0,
        labels=("x", "x^2"),
        phase_timeout_s=5.0,
        params={},
    )
    return aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec))


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = info.value.code()
    return code


def test_every_role_reads_and_only_admin_opens_rounds(guarded: Guarded) -> None:
    for role in Role:
        reply = guarded.query.ListReleases(
            query_pb2.ListReleasesRequest(), metadata=guarded.meta(role)
        )
        assert list(reply.releases) == []
    for role in (Role.VIEWER, Role.ANALYST):
        code = _code(
            lambda role=role: guarded.aggregation.OpenRound(
                _spec("r1"), metadata=guarded.meta(role)
            )
        )
        assert code is grpc.StatusCode.PERMISSION_DENIED
    guarded.aggregation.OpenRound(_spec("r1"), metadata=guarded.meta(Role.ADMIN))
    assert guarded.store.round_exists("r1")
    denied = guarded.refusals()
    assert len(denied) == 2 and all("OpenRound" in d and "needs admin" in d for d in denied)


def test_calls_without_a_valid_token_are_unauthenticated_and_audited(guarded: Guarded) -> None:
    request = query_pb2.ListReleasesRequest()
    cases = [
        (),  # no token
        (("authorization", "Basic abc"),),
        (("authorization", "Bearer not-a-token"),),
        (("authorization", f"Bearer {guarded.tokens[Role.ADMIN][:-2]}xx"),),  # wrong secret
        (("authorization", "Bearer fl_0000000000000000_secret"),),  # unknown id
    ]
    for metadata in cases:
        assert _code(lambda m=metadata: guarded.query.ListReleases(request, metadata=m)) is (
            grpc.StatusCode.UNAUTHENTICATED
        )
    assert len(guarded.refusals()) == len(cases)
    # Nothing of a presented token reaches the audit log.
    assert not any(guarded.tokens[Role.ADMIN][3:] in d for d in guarded.refusals())


def test_revoked_tokens_stop_working(guarded: Guarded) -> None:
    viewer = guarded.tokens[Role.VIEWER]
    token_id = viewer.split("_")[1]
    guarded.access.revoke(token_id, now=NOW)
    with (
        QueryClient(guarded.server.address, token=viewer) as client,
        pytest.raises(AuthenticationError, match="revoked"),
    ):
        client.list_releases()
    with pytest.raises(NotFoundError):
        guarded.access.revoke("ffffffffffffffff", now=NOW)


def test_the_query_client_presents_its_token(guarded: Guarded) -> None:
    with QueryClient(guarded.server.address, token=guarded.tokens[Role.VIEWER]) as client:
        assert client.list_releases() == []
        assert client.list_budgets() == []
    with (
        QueryClient(guarded.server.address) as client,
        pytest.raises(AuthenticationError, match="needs a token"),
    ):
        client.list_releases()


def test_rate_limits_per_token_refill_with_time(guarded: Guarded) -> None:
    request = query_pb2.ListReleasesRequest()
    viewer, analyst = guarded.meta(Role.VIEWER), guarded.meta(Role.ANALYST)
    for _ in range(3):  # the burst
        guarded.query.ListReleases(request, metadata=viewer)
    assert _code(lambda: guarded.query.ListReleases(request, metadata=viewer)) is (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    guarded.query.ListReleases(request, metadata=analyst)  # another token has its own
    guarded.clock.t += 0.5  # 2 calls/s: one call back
    guarded.query.ListReleases(request, metadata=viewer)
    assert _code(lambda: guarded.query.ListReleases(request, metadata=viewer)) is (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert sum("rate limit" in d for d in guarded.refusals()) == 2


def test_site_calls_stay_open_and_are_authenticated_by_the_protocol(guarded: Guarded) -> None:
    guarded.aggregation.OpenRound(_spec("r2"), metadata=guarded.meta(Role.ADMIN))
    status = guarded.aggregation.GetRoundStatus(
        aggregation_pb2.GetRoundStatusRequest(round_id="r2")
    )
    assert status.round_id == "r2"
    reply = guarded.aggregation.DeclineRound(
        aggregation_pb2.DeclineRoundRequest(round_id="r2", site_id="a", reason="budget")
    )
    assert reply.status.phase  # the round moved on without any token


def test_the_store_keeps_only_a_hash_of_each_secret(guarded: Guarded) -> None:
    raw = guarded.db.read_bytes() + b"".join(
        p.read_bytes() for p in guarded.db.parent.glob("fedlens.db-*")
    )
    for token in guarded.tokens.values():
        assert token.split("_", 2)[2].encode() not in raw
    with sqlite3.connect(guarded.db) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(access_tokens)")]
    assert "secret_hash" in columns and "token" not in columns


def test_every_query_method_is_listed_and_unknown_ones_need_admin() -> None:
    service = query_pb2.DESCRIPTOR.services_by_name["Query"]
    for method in service.methods:
        assert f"/fedlens.v1.Query/{method.name}" in METHOD_ROLES, method.name
    assert required_role("/fedlens.v1.Query/SomethingNew") is Role.ADMIN
    assert required_role("/grpc.health.v1.Health/Check") is None


def test_a_role_below_the_methods_is_refused_with_both_named(tmp_path: Path) -> None:
    access = AccessControl(Store(f"sqlite:///{tmp_path / 'a.db'}"))
    viewer, _ = access.issue("vera", Role.VIEWER, now=NOW)
    with pytest.raises(PermissionDeniedError, match="vera is a viewer; OpenRound needs admin"):
        access.admit(viewer, "/fedlens.v1.Aggregation/OpenRound", Role.ADMIN)
    access.admit(viewer, "/fedlens.v1.Query/GetRelease", Role.VIEWER)


def test_a_provisioned_admin_token_works_once_registered(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'p.db'}")
    access = AccessControl(store)
    token = "fl_0123456789abcdef_" + "s" * 40
    principal = access.provision("ops", Role.ADMIN, token, now=NOW)
    assert access.authenticate(token) == principal
    # Start-up registers it again: nothing changes; another secret for the id is refused.
    assert access.provision("ops", Role.ADMIN, token, now=NOW) == principal
    with pytest.raises(ConfigurationError, match="another secret"):
        access.provision("ops", Role.ADMIN, token[:-1] + "t", now=NOW)
    for bad in ("fl_short_" + "s" * 40, "fl_0123456789abcdef_tooshort", "x" * 60):
        with pytest.raises(ConfigurationError, match="fl_<16 hex digits>"):
            access.provision("ops", Role.ADMIN, bad, now=NOW)
    assert len(access.tokens()) == 1


@pytest.mark.both_backends
def test_tokens_issue_authenticate_and_revoke_on_each_backend(database_url: str) -> None:
    store = Store(database_url)
    try:
        access = AccessControl(store)
        principal, token = access.issue("ana", Role.ANALYST, now=NOW)
        assert access.authenticate(token) == principal
        access.revoke(principal.token_id, now=NOW)
        with pytest.raises(AuthenticationError, match="revoked"):
            access.authenticate(token)
        (record,) = access.tokens()
        assert record.principal == principal
        # The same UTC times back from every backend.
        assert record.issued_at == NOW and record.revoked_at == NOW
        assert record.expires_at is None and not record.active(NOW)
    finally:
        store.close()


@pytest.mark.both_backends
def test_a_token_past_its_expiry_is_refused_even_when_remembered(database_url: str) -> None:
    store = Store(database_url)
    today = [NOW]
    try:
        access = AccessControl(store, wall_clock=lambda: today[0], token_ttl=3600.0)
        expires = NOW + timedelta(hours=1)
        principal, token = access.issue("ana", Role.ANALYST, now=NOW, expires_at=expires)
        assert access.authenticate(token, now=0.0) == principal  # now remembered for an hour
        (record,) = access.tokens()
        assert record.expires_at == expires and record.active(NOW)
        today[0] = expires - timedelta(seconds=1)
        assert access.authenticate(token, now=1.0) == principal
        today[0] = expires
        with pytest.raises(AuthenticationError, match=r"expired at 2026-.*01:00:00"):
            access.authenticate(token, now=2.0)
        assert not access.tokens()[0].active(expires)
        # A token without an expiry is not affected by the time of day.
        other, forever = access.issue("bo", Role.VIEWER, now=NOW)
        today[0] = NOW + timedelta(days=10_000)
        assert access.authenticate(forever, now=3.0) == other
    finally:
        store.close()


def test_an_expiry_must_be_aware_and_in_the_future(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    try:
        access = AccessControl(store)
        for bad in (NOW, NOW - timedelta(days=1), datetime(2027, 1, 1)):
            with pytest.raises(ConfigurationError, match="expiry"):
                access.issue("ana", Role.ANALYST, now=NOW, expires_at=bad)
        assert access.tokens() == []
    finally:
        store.close()
