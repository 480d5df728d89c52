"""A real aggregator process killed with SIGKILL mid-round and restarted on the same port
and database, while the sites keep going.

The aggregator runs ``fedlens server`` (:func:`fedlens.cli.main`) in its own process over
a SQLite file (and, for the tests marked ``both_backends``, over a PostgreSQL database as
well); the sites are threads of this process, each driving a
:class:`~privacy.secagg_site.SiteSession` through :func:`client.secagg_client.run_secure_round`
with an :class:`~client.secagg_client.AggregationClient` that retries while the aggregator
is unavailable. Events gate each site right before it masks its input (``make_input``)
and right before it reveals its shares, so the kill lands in exactly the phase a test
wants.

Aggregator processes are forked from a server that has already imported fedlens (torch
included), so a restart takes a fraction of a second rather than the seconds an import
takes; the forked process is still a separate process running the CLI's server command,
and SIGKILL gives it no chance to clean up.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import grpc
import numpy as np
import pytest
import sqlalchemy
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.secagg_client import AggregationClient, SiteInput, run_secure_round
from fedlens import wire
from fedlens.channels import bearer_metadata
from fedlens.errors import FedlensError, ProtocolError, StaleRoundError
from fedlens.secagg_types import RevealedShare
from fedlens.types import PrivacyCost, Release, RoundPhase, RoundSpec, RoundStatus
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc, query_pb2, query_pb2_grpc
from privacy import FixedPointCodec, SeededRandom
from privacy.secagg_params import SecAggParams
from privacy.secagg_site import SiteSession
from server.access import AccessControl, Role
from server.storage import Store
from tests.secagg_spec import CLIP, LABELS, attribution_round

SITES = ("site-a", "site-b", "site-c", "site-d")
WAIT_S = 30.0  # longest any step of a test waits; a healthy run takes a few seconds

_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(["fedlens.cli", "server.grpc_server", __name__])


def _run_aggregator(address: str, database_url: str) -> None:
    from fedlens.cli import main

    raise SystemExit(main(["server", "--address", address, "--database-url", database_url]))


class AggregatorProcess:
    """``fedlens server`` in a child process, on a fixed port, that can be killed and restarted."""

    def __init__(self, address: str, database_url: str) -> None:
        self.address = address
        self._database_url = database_url
        self._process: multiprocessing.process.BaseProcess | None = None
        self.killed = threading.Event()

    def start(self) -> None:
        assert self._process is None, "already running"
        process = _FORKSERVER.Process(
            target=_run_aggregator, args=(self.address, self._database_url), daemon=True
        )
        process.start()
        self._process = process
        self.killed.clear()
        with grpc.insecure_channel(self.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=WAIT_S)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed, the port is freed by the kernel."""
        process, self._process = self._process, None
        assert process is not None and process.pid is not None, "not running"
        os.kill(process.pid, signal.SIGKILL)
        process.join(WAIT_S)
        assert process.exitcode == -signal.SIGKILL
        self.killed.set()

    def stop(self) -> None:
        if self._process is not None:
            self.kill()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Deployment:
    aggregator: AggregatorProcess
    database_url: str
    channel: grpc.Channel
    # The coordinator's admin token: the server checks tokens, as `fedlens server` does.
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> str:
        return self.aggregator.address

    @property
    def aggregation(self) -> aggregation_pb2_grpc.AggregationStub:
        return aggregation_pb2_grpc.AggregationStub(self.channel)

    def status(self, round_id: str) -> RoundStatus:
        reply = self.aggregation.GetRoundStatus(
            aggregation_pb2.GetRoundStatusRequest(round_id=round_id), timeout=WAIT_S
        )
        return wire.round_status_from_proto(reply)

    def wait_for(self, round_id: str, done: Callable[[RoundStatus], bool]) -> RoundStatus:
        give_up = time.monotonic() + WAIT_S
        while True:
            status = self.status(round_id)
            if done(status):
                return status
            assert time.monotonic() < give_up, f"gave up waiting; last status {status}"
            time.sleep(0.05)

    def release(self, release_id: str) -> Release:
        query = query_pb2_grpc.QueryStub(self.channel)
        reply = query.GetRelease(
            query_pb2.GetReleaseRequest(release_id=release_id),
            timeout=WAIT_S,
            metadata=self.metadata,
        )
        return wire.release_from_proto(reply)

    def release_ids(self) -> list[str]:
        query = query_pb2_grpc.QueryStub(self.channel)
        reply = query.ListReleases(
            query_pb2.ListReleasesRequest(), timeout=WAIT_S, metadata=self.metadata
        )
        return [r.release_id for r in reply.releases]

    def rows(self, sql: str, **params: object) -> list[tuple[Any, ...]]:
        """Read the database directly (used while the aggregator is down)."""
        engine = sqlalchemy.create_engine(self.database_url)
        try:
            with engine.connect() as db:
                return [tuple(row) for row in db.execute(sqlalchemy.text(sql), params)]
        finally:
            engine.dispose()


@pytest.fixture
def deployment(database_url: str) -> Iterator[Deployment]:
    store = Store(database_url)
    _, token = AccessControl(store).issue("coordinator", Role.ADMIN, now=datetime.now(UTC))
    store.close()
    aggregator = AggregatorProcess(f"127.0.0.1:{_free_port()}", database_url)
    aggregator.start()
    channel = grpc.insecure_channel(aggregator.address)
    try:
        yield Deployment(aggregator, database_url, channel, bearer_metadata(token))
    finally:
        channel.close()
        aggregator.stop()


def round_spec(round_id: str, *, phase_timeout_s: float) -> RoundSpec:
    return attribution_round(round_id, SITES, threshold=3, phase_timeout_s=phase_timeout_s)


def open_round(deployment: Deployment, spec: RoundSpec) -> None:
    deployment.aggregation.OpenRound(
        aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec)),
        timeout=WAIT_S,
        metadata=deployment.metadata,
    )


# -- sites ------------------------------------------------------------------------------


class _LostReply(grpc.RpcError):
    """What a site sees when the aggregator dies after accepting a call, before answering."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection lost before the reply"


class _StubWithHook:
    """The Aggregation stub, with ``SubmitMasked`` observed (and its reply maybe lost)."""

    def __init__(self, stub: aggregation_pb2_grpc.AggregationStub, site: Site) -> None:
        self._stub = stub
        self._site = site

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def SubmitMasked(  # noqa: N802 - gRPC method name
        self, request: aggregation_pb2.SubmitMaskedRequest, **kwargs: Any
    ) -> aggregation_pb2.SubmitMaskedResponse:
        site = self._site
        try:
            reply = self._stub.SubmitMasked(request, **kwargs)
        except grpc.RpcError as exc:
            site.submit_errors.append(exc.code())
            site.submit_refused.set()
            raise
        site.submit_accepted += 1
        if site.after_submit is not None:
            after, site.after_submit = site.after_submit, None
            after()  # kills the aggregator: the reply never reaches the site
            raise _LostReply()
        return reply


class _SiteClient(AggregationClient):
    def __init__(self, address: str, site: Site, *, retry_s: float) -> None:
        super().__init__(address, retry_s=retry_s, call_timeout_s=10.0)
        self._hooked = _StubWithHook(super().stub, site)

    @property
    def stub(self) -> aggregation_pb2_grpc.AggregationStub:
        return cast(aggregation_pb2_grpc.AggregationStub, self._hooked)


class _GatedSession(SiteSession):
    """A site session that waits for a gate before revealing its shares."""

    def __init__(
        self, params: SecAggParams, site_id: str, gate: threading.Event, reached: threading.Event
    ) -> None:
        super().__init__(params, site_id, Ed25519PrivateKey.generate())
        self._gate = gate
        self._reached = reached

    def unmask(
        self, survivors: Collection[str], dropped: Collection[str]
    ) -> tuple[RevealedShare, ...]:
        self._reached.set()
        assert self._gate.wait(WAIT_S), f"{self.site_id}: unmask gate never opened"
        return super().unmask(survivors, dropped)


@dataclass
class Site:
    site_id: str
    vector: np.ndarray
    retry_s: float = WAIT_S
    submit_gate: threading.Event = field(default_factory=threading.Event)
    unmask_gate: threading.Event = field(default_factory=threading.Event)
    at_submit: threading.Event = field(default_factory=threading.Event)
    at_unmask: threading.Event = field(default_factory=threading.Event)
    after_submit: Callable[[], None] | None = None
    submit_accepted: int = 0
    submit_errors: list[grpc.StatusCode] = field(default_factory=list)
    submit_refused: threading.Event = field(default_factory=threading.Event)
    outcome: RoundStatus | Exception | None = None

    def run(self, address: str, spec: RoundSpec) -> None:
        params = SecAggParams(
            round_id=spec.round_id,
            site_ids=spec.site_ids,
            threshold=spec.effective_threshold,
            length=spec.length,
            bits=spec.bits,
            degree=spec.degree,
        )
        session = _GatedSession(params, self.site_id, self.unmask_gate, self.at_unmask)
        codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)

        def make_input() -> SiteInput:
            self.at_submit.set()
            assert self.submit_gate.wait(WAIT_S), f"{self.site_id}: submit gate never opened"
            cost = PrivacyCost(self.site_id, epsilon=0.5, delta=1e-6, epsilon_total=0.5)
            return SiteInput(codec.encode(self.vector, SeededRandom(3)), cost, noise_std=0.0)

        with _SiteClient(address, self, retry_s=self.retry_s) as client:
            try:
                self.outcome = run_secure_round(client, session, make_input, timeout_s=WAIT_S)
            except Exception as exc:  # asserted on by the test
                self.outcome = exc


def make_sites(seed: int) -> dict[str, Site]:
    rng = np.random.default_rng(seed)
    sites = {}
    for index, site_id in enumerate(SITES):
        records = 40 + 10 * index
        attribution = rng.normal(scale=2.0, size=len(LABELS)) * records / 10
        sites[site_id] = Site(site_id, np.concatenate([attribution, [records * CLIP]]))
    return sites


def start_sites(
    address: str, spec: RoundSpec, sites: dict[str, Site]
) -> dict[str, threading.Thread]:
    threads = {
        site_id: threading.Thread(target=site.run, args=(address, spec), name=site_id, daemon=True)
        for site_id, site in sites.items()
    }
    for thread in threads.values():
        thread.start()
    return threads


def join(threads: Iterable[threading.Thread]) -> None:
    for thread in threads:
        thread.join(2 * WAIT_S)
        assert not thread.is_alive(), f"{thread.name} still running"


def wait(event: threading.Event, what: str) -> None:
    assert event.wait(WAIT_S), f"timed out waiting for {what}"


def assert_released_plain_sum(deployment: Deployment, sites: dict[str, Site]) -> Release:
    """Every site completed with one release, which holds each input exactly once."""
    outcomes = [site.outcome for site in sites.values()]
    assert all(isinstance(o, RoundStatus) for o in outcomes), outcomes
    statuses = cast(list[RoundStatus], outcomes)
    assert {s.phase for s in statuses} == {RoundPhase.COMPLETE}
    release_ids = {s.release_id for s in statuses}
    assert len(release_ids) == 1 and "" not in release_ids
    assert deployment.release_ids() == list(release_ids)
    release = deployment.release(release_ids.pop())

    total = np.sum([site.vector for site in sites.values()], axis=0)
    count = total[-1] / CLIP
    assert release.noised_count == pytest.approx(count, abs=1e-3)
    np.testing.assert_allclose([v.value for v in release.values], total[:-1] / count, atol=1e-5)
    assert sorted(c.site_id for c in release.costs) == sorted(sites)
    assert release.params["sites_in_sum"] == str(len(sites))
    return release


def journal(deployment: Deployment, round_id: str) -> list[tuple[str, str]]:
    return [
        (action, site)
        for action, site in deployment.rows(
            "SELECT action, site_id FROM round_journal WHERE round_id = :r ORDER BY id", r=round_id
        )
    ]


def assert_round_state_dropped(deployment: Deployment, round_id: str) -> None:
    """A finished round leaves neither journal nor masked running sum behind."""
    assert journal(deployment, round_id) == []
    assert deployment.rows("SELECT * FROM round_sums WHERE round_id = :r", r=round_id) == []


# -- tests ------------------------------------------------------------------------------


@pytest.mark.both_backends
@pytest.mark.parametrize("lost", ["site-c", "site-d"], ids=["third-submit", "last-submit"])
def test_killed_while_collecting_resumes_and_counts_every_input_once(
    deployment: Deployment, lost: str
) -> None:
    """Some sites submit; the next submission is accepted, then the aggregator is killed
    before it answers, and the site retries until the restarted aggregator recognises it
    (``third-submit``: the third of four; ``last-submit``: the fourth, which closed the
    collecting phase). With ``third-submit`` the last site masks and submits while the
    aggregator is down, and retries until it is back.
    """
    spec = round_spec(f"collect-{lost}", phase_timeout_s=WAIT_S)
    open_round(deployment, spec)
    sites = make_sites(seed=1)
    for site in sites.values():
        site.unmask_gate.set()
    sites[lost].after_submit = deployment.aggregator.kill
    # With third-submit, site-d masks and submits while the aggregator is down.
    early, down = (
        (["site-a", "site-b"], "site-d")
        if lost == "site-c"
        else (["site-a", "site-b", "site-c"], "")
    )
    threads = start_sites(deployment.address, spec, sites)

    for site_id in early:
        wait(sites[site_id].at_submit, f"{site_id} to reach masking")
        sites[site_id].submit_gate.set()
    deployment.wait_for(spec.round_id, lambda s: len(s.submitted) == len(early))

    sites[lost].submit_gate.set()  # accepted, then the aggregator is killed
    wait(deployment.aggregator.killed, "the aggregator to be killed")

    # While it is down: the accepted submissions are journaled exactly once, the stored
    # running sum is masked (it does not decode to the sum of those inputs) and nothing
    # was released.
    submitted = [site for action, site in journal(deployment, spec.round_id) if action == "submit"]
    assert sorted(submitted) == sorted([*early, lost])
    (blob,) = deployment.rows(
        "SELECT running_sum FROM round_sums WHERE round_id = :r", r=spec.round_id
    )[0]
    codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)
    stored = codec.decode(np.frombuffer(blob, dtype="<u8").astype(np.uint64))
    partial = np.sum([sites[s].vector for s in submitted], axis=0)
    assert not np.allclose(stored, partial, atol=1.0)
    assert deployment.rows("SELECT * FROM releases") == []

    if down:  # this site masks and submits while nobody listens
        sites[down].submit_gate.set()
        wait(sites[down].submit_refused, f"{down} to find the aggregator down")
        assert set(sites[down].submit_errors) == {grpc.StatusCode.UNAVAILABLE}

    deployment.aggregator.start()
    for site in sites.values():
        site.submit_gate.set()
    join(threads.values())

    assert_released_plain_sum(deployment, sites)
    # The lost reply was retried: the restarted aggregator recognised the duplicate.
    assert sites[lost].submit_accepted == 1
    assert grpc.StatusCode.ALREADY_EXISTS in sites[lost].submit_errors
    if down:
        assert sites[down].submit_accepted == 1
    assert_round_state_dropped(deployment, spec.round_id)


@pytest.mark.both_backends
def test_killed_while_unmasking_resumes_and_releases_the_sum(deployment: Deployment) -> None:
    spec = round_spec("unmask", phase_timeout_s=WAIT_S)
    open_round(deployment, spec)
    sites = make_sites(seed=2)
    for site in sites.values():
        site.submit_gate.set()
    threads = start_sites(deployment.address, spec, sites)
    for site_id in ("site-a", "site-b"):
        sites[site_id].unmask_gate.set()
    deployment.wait_for(spec.round_id, lambda s: len(s.unmasked) == 2)
    for site_id in ("site-c", "site-d"):
        wait(sites[site_id].at_unmask, f"{site_id} to be asked to unmask")

    deployment.aggregator.kill()
    entries = journal(deployment, spec.round_id)
    assert sorted(s for a, s in entries if a == "submit") == sorted(SITES)
    assert sorted(s for a, s in entries if a == "unmask") == ["site-a", "site-b"]
    assert deployment.rows("SELECT * FROM releases") == []

    deployment.aggregator.start()
    assert deployment.status(spec.round_id).phase is RoundPhase.UNMASKING
    assert deployment.release_ids() == []  # two of three needed shares reveal nothing
    sites["site-c"].unmask_gate.set()
    sites["site-d"].unmask_gate.set()
    join(threads.values())

    assert_released_plain_sum(deployment, sites)
    assert_round_state_dropped(deployment, spec.round_id)


def test_deadline_passed_while_down_aborts_the_round_after_restart(
    deployment: Deployment,
) -> None:
    """Two of four sites submit (the threshold is three), the aggregator dies, the
    sites that submitted give up, and the collecting deadline passes before it comes
    back: the restarted aggregator aborts the round and releases nothing.
    """
    spec = round_spec("abort", phase_timeout_s=8.0)
    open_round(deployment, spec)
    sites = make_sites(seed=3)
    for site_id in ("site-a", "site-b"):
        sites[site_id].submit_gate.set()
        sites[site_id].retry_s = 1.0  # they give up while the aggregator is down
    threads = start_sites(deployment.address, spec, sites)
    status = deployment.wait_for(spec.round_id, lambda s: len(s.submitted) == 2)
    assert status.phase is RoundPhase.COLLECTING
    deadline = time.monotonic() + status.seconds_left

    deployment.aggregator.kill()
    for site_id in ("site-a", "site-b"):
        sites[site_id].unmask_gate.set()
        threads[site_id].join(WAIT_S)
        assert isinstance(sites[site_id].outcome, ProtocolError), sites[site_id].outcome
    time.sleep(max(0.0, deadline - time.monotonic()) + 0.5)

    deployment.aggregator.start()
    status = deployment.status(spec.round_id)
    assert status.phase is RoundPhase.ABORTED, status
    assert "fewer than the threshold 3" in status.reason
    assert status.release_id == ""

    # The late sites learn that the round is over; nothing is released or left stored.
    sites["site-c"].submit_gate.set()
    sites["site-d"].submit_gate.set()
    join(threads.values())
    for site_id in ("site-c", "site-d"):
        assert isinstance(sites[site_id].outcome, StaleRoundError), sites[site_id].outcome
        assert sites[site_id].submit_accepted == 0
    assert deployment.release_ids() == []
    assert deployment.rows("SELECT phase FROM rounds WHERE round_id = :r", r=spec.round_id) == [
        ("aborted",)
    ]
    assert_round_state_dropped(deployment, spec.round_id)
    assert all(isinstance(site.outcome, FedlensError) for site in sites.values())
