"""Secure aggregation over real gRPC on loopback, against the same flow with no cryptography.

    python -m benchmarks.secagg --sites 100 --dim 100000 --dropout 0.1 --json OUT
        [--scaling] [--flower-sites 10 | --no-flower] [--profile OUT.prof]

One round each of three modes, every site holding a float32 vector of shape ``(dim,)``:

``plain``
    The baseline: the same four-phase message flow, over the same ``Aggregation`` gRPC
    service, messages, server options (16 handler threads, 64 MiB messages), client
    (:class:`client.secagg_client.AggregationClient`) and poll interval, with no
    cryptography in it. Sites advertise empty keys, wait for the key list, send an empty
    share list, wait, submit their float32 vector as bytes in ``SubmitMaskedRequest.values``,
    wait for the unmask request, send an empty unmask message and poll the status until
    the round is complete. The server (a minimal servicer defined here) tracks who answered
    each phase, returns the same status fields (the four lists of site ids) and adds every
    vector into a float64 running sum in memory; it keeps no journal, audit log or store.
``complete``
    fedlens protocol v2 (Bonawitz et al. 2017) with masks between every pair of sites: the
    real :class:`server.aggregation.Aggregator` behind :func:`server.grpc_server.serve`
    over a SQLite store (journal and audit log included), and
    :func:`client.secagg_client.run_secure_round` at every site.
``secaggplus``
    The same with the SecAgg+ graph of degree
    :func:`privacy.secagg_graph.recommended_degree` (which is the complete graph up to 173
    sites, so at 100 sites this mode runs the same protocol as ``complete``).

``round(dropout * sites)`` sites, chosen by the seed, drop out after the sharing phase: they
advertise, share their keys, wait for the shares, and then send ``DeclineRound`` instead of a
vector, in every mode. The aggregator therefore has to rebuild their mask keys and remove
their pairwise masks from the survivors' vectors. Declining, rather than going silent, lets
every mode close the phase as soon as the survivors have answered instead of waiting for a
deadline (a silent drop would add the phase timeout to every mode alike). The threshold is
the default, ``floor(2n/3) + 1``.

Measurements. The aggregator runs in its own process (one process for the fedlens rounds of
one invocation, another for the plain rounds); that process reports its CPU time
(``time.process_time``, every thread, gRPC's included) from just before ``OpenRound`` to the
end of the round, its resident memory before the round and its peak during the round
(``VmHWM`` from ``/proc/self/status``, reset through ``/proc/self/clear_refs`` when the round
begins; ``ru_maxrss`` cannot be reset and, for a child started by ``vfork`` + ``exec``, can
report the parent's peak). Sites run as threads of this process (or of ``--site-workers``
processes); each site's CPU time is its thread's ``time.thread_time`` over its part in the
round (gRPC's own I/O threads excluded). The round's wall time runs from ``OpenRound`` to
the last site seeing the round end. ``prg_floor_s`` is the CPU time of expanding, with the
protocol's own ChaCha20 generator (:func:`privacy.secagg_crypto.self_mask` and
:func:`~privacy.secagg_crypto.expand_mask`), exactly the masks the aggregator must remove:
one self mask per survivor and one pairwise mask per (dropped site, surviving neighbour).
``server_ratio = server_cpu_s / (prg_floor_s + plain_server_cpu_s)`` for the fedlens mode
with the lower server CPU; the target is 1.5.

Every fedlens round is checked: the sum the aggregator releases (handed to a post-processor
registered here under the kind ``benchmark_sum``, which stores a release with no values)
must equal, exactly, the fixed-point decoding (:class:`privacy.FixedPointCodec`) of the sum
of the survivors' encodings, and lie within one quantisation step per survivor of the plain
float64 sum of their vectors. The plain round's sum must equal that float64 sum. Any
mismatch raises :class:`fedlens.errors.IntegrityError`.

Flower's SecAgg+ (``benchmarks.flower_secaggplus``) runs at ``--flower-sites`` sites when that
module imports and works; otherwise its fields are null and ``flower_error`` says why.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import pstats
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.secagg_client import MAX_MESSAGE_BYTES, AggregationClient, SiteInput, run_secure_round
from fedlens import wire
from fedlens.errors import ConfigurationError, DropoutError, IntegrityError
from fedlens.types import PrivacyCost, RoundPhase, RoundSpec, RoundStatus
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc
from privacy import FixedPointCodec, SecureRandom, recommended_degree
from privacy.secagg_crypto import KEY_BYTES, expand_mask, self_mask
from privacy.secagg_params import SecAggParams, default_threshold
from privacy.secagg_site import SiteSession

__all__ = [
    "BenchmarkConfig",
    "RoundResult",
    "prg_floor",
    "run_benchmark",
    "run_rounds",
    "verify_released",
]

logger = logging.getLogger(__name__)

MODES = ("plain", "complete", "secaggplus")
FEDLENS_MODES = ("complete", "secaggplus")
KIND = "benchmark_sum"
MAX_ABS = 1.0  # site vectors are uniform on [-1, 1)
PRECISION = 1e-6  # fixed-point step
TARGET_RATIO = 1.5
_MIB = 1024 * 1024


# -- the round -------------------------------------------------------------------------


def site_ids(sites: int) -> tuple[str, ...]:
    return tuple(f"site-{i:04d}" for i in range(sites))


def site_vector(seed: int, index: int, dim: int) -> np.ndarray:
    """Site ``index``'s ``(dim,)`` float32 vector, uniform on ``[-1, 1)``."""
    rng = np.random.default_rng([seed, index])
    return rng.uniform(-MAX_ABS, MAX_ABS, dim).astype(np.float32)


def dropped_indices(sites: int, dropout: float, seed: int) -> frozenset[int]:
    """The ``round(dropout * sites)`` sites that drop out, drawn from the seed."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigurationError(f"dropout must be in [0, 1), got {dropout}")
    count = round(dropout * sites)
    survivors = sites - count
    if survivors < default_threshold(sites):
        raise ConfigurationError(
            f"{count} of {sites} sites dropping leaves {survivors}, below the threshold "
            f"{default_threshold(sites)}; use a dropout of at most about 1/3"
        )
    rng = np.random.default_rng([seed, 1])
    return frozenset(int(i) for i in rng.choice(sites, size=count, replace=False))


def codec_for(sites: int) -> FixedPointCodec:
    return FixedPointCodec.choose(num_sites=sites, max_abs=MAX_ABS, precision=PRECISION)


def degree_for(mode: str, sites: int) -> int:
    return recommended_degree(sites) if mode == "secaggplus" else 0


def round_spec(mode: str, sites: int, dim: int, round_id: str, timeout_s: float) -> RoundSpec:
    codec = codec_for(sites)
    return RoundSpec(
        round_id=round_id,
        kind=KIND,
        site_ids=site_ids(sites),
        length=dim,
        bits=codec.bits,
        scale=codec.scale,
        clip_bound=1.0,
        labels=(),
        phase_timeout_s=timeout_s,
        params={"benchmark_round": round_id},
        degree=degree_for(mode, sites),
    )


def protocol_params(spec: RoundSpec) -> SecAggParams:
    """What the sites and the aggregator derive from the spec (default threshold)."""
    return SecAggParams(
        round_id=spec.round_id,
        site_ids=spec.site_ids,
        threshold=spec.effective_threshold,
        length=spec.length,
        bits=spec.bits,
        degree=spec.degree,
    )


def prg_floor(params: SecAggParams, survivors: Sequence[str], dropped: Sequence[str]) -> float:
    """CPU seconds to expand the masks the aggregator removes, with the protocol's PRG.

    One self mask per survivor and one pairwise mask per (dropped site, surviving
    neighbour); random keys stand in for the rebuilt ones (the keystream costs the same).
    """
    alive = set(survivors)
    pairs = sum(len(params.neighbours[site] & alive) for site in dropped)
    keys = [os.urandom(KEY_BYTES) for _ in range(len(alive) + pairs)]
    start = time.thread_time()
    for key in keys[: len(alive)]:
        self_mask(key, round_id=params.round_id, length=params.length, bits=params.bits)
    for key in keys[len(alive) :]:
        expand_mask(key, params.length, params.bits)
    return time.thread_time() - start


# -- the plain baseline server ---------------------------------------------------------


class _PlainRound:
    """Who answered which phase, and a float64 running sum; no keys, shares or masks."""

    _ORDER = (
        RoundPhase.ADVERTISING,
        RoundPhase.SHARING,
        RoundPhase.COLLECTING,
        RoundPhase.UNMASKING,
        RoundPhase.COMPLETE,
    )

    def __init__(self, spec: RoundSpec) -> None:
        self.spec = spec
        self.phase = RoundPhase.ADVERTISING
        self.answered: dict[RoundPhase, list[str]] = {p: [] for p in self._ORDER}
        self.withdrawn: set[str] = set()
        self.total = np.zeros(spec.length, dtype=np.float64)
        self.lock = threading.Lock()

    def answer(self, phase: RoundPhase, site: str, vector: np.ndarray | None = None) -> None:
        with self.lock:
            if self.phase is not phase or site in self.answered[phase]:
                raise IntegrityError(f"{site} answered {phase.value} in {self.phase.value}")
            if vector is not None:
                if vector.shape != self.total.shape:
                    raise IntegrityError(f"vector from {site} has shape {vector.shape}")
                self.total += vector
            self.answered[phase].append(site)
            self._maybe_close()

    def withdraw(self, site: str) -> None:
        with self.lock:
            self.withdrawn.add(site)
            self._maybe_close()

    def _eligible(self) -> set[str]:
        index = self._ORDER.index(self.phase)
        if index == 0:
            return set(self.spec.site_ids)
        return set(self.answered[self._ORDER[index - 1]])

    def _maybe_close(self) -> None:
        while self.phase is not RoundPhase.COMPLETE and not (
            self._eligible() - set(self.answered[self.phase]) - self.withdrawn
        ):
            self.phase = self._ORDER[self._ORDER.index(self.phase) + 1]

    def status(self) -> aggregation_pb2.RoundStatus:
        with self.lock:
            a = self.answered
            return wire.round_status_to_proto(
                RoundStatus(
                    round_id=self.spec.round_id,
                    phase=self.phase,
                    advertised=tuple(sorted(a[RoundPhase.ADVERTISING])),
                    submitted=tuple(a[RoundPhase.COLLECTING]),
                    shared=tuple(sorted(a[RoundPhase.SHARING])),
                    unmasked=tuple(sorted(a[RoundPhase.UNMASKING])),
                )
            )


class _PlainServicer(aggregation_pb2_grpc.AggregationServicer):
    """The ``Aggregation`` service with the crypto taken out (the baseline)."""

    def __init__(self) -> None:
        self.rounds: dict[str, _PlainRound] = {}

    def OpenRound(  # noqa: N802 - gRPC method names
        self, request: aggregation_pb2.OpenRoundRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.OpenRoundResponse:
        spec = wire.round_spec_from_proto(request.spec)
        self.rounds[spec.round_id] = live = _PlainRound(spec)
        return aggregation_pb2.OpenRoundResponse(status=live.status())

    def AdvertiseKeys(  # noqa: N802
        self, request: aggregation_pb2.AdvertiseKeysRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.AdvertiseKeysResponse:
        live = self.rounds[request.round_id]
        live.answer(RoundPhase.ADVERTISING, request.keys.site_id)
        return aggregation_pb2.AdvertiseKeysResponse(status=live.status())

    def GetPeerKeys(  # noqa: N802
        self, request: aggregation_pb2.GetPeerKeysRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.GetPeerKeysResponse:
        live = self.rounds[request.round_id]
        status = live.status()
        if live.phase is RoundPhase.ADVERTISING:
            return aggregation_pb2.GetPeerKeysResponse(status=status)
        keys = [aggregation_pb2.SignedKeys(site_id=site) for site in status.advertised]
        return aggregation_pb2.GetPeerKeysResponse(status=status, keys=keys)

    def ShareKeys(  # noqa: N802
        self, request: aggregation_pb2.ShareKeysRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.ShareKeysResponse:
        live = self.rounds[request.round_id]
        live.answer(RoundPhase.SHARING, request.site_id)
        return aggregation_pb2.ShareKeysResponse(status=live.status())

    def GetShares(  # noqa: N802
        self, request: aggregation_pb2.GetSharesRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.GetSharesResponse:
        live = self.rounds[request.round_id]
        ready = live.phase not in (RoundPhase.ADVERTISING, RoundPhase.SHARING)
        return aggregation_pb2.GetSharesResponse(status=live.status(), ready=ready)

    def SubmitMasked(  # noqa: N802
        self, request: aggregation_pb2.SubmitMaskedRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.SubmitMaskedResponse:
        live = self.rounds[request.round_id]
        vector = np.frombuffer(request.values, dtype="<f4")
        live.answer(RoundPhase.COLLECTING, request.site_id, vector)
        return aggregation_pb2.SubmitMaskedResponse(status=live.status())

    def GetUnmaskRequest(  # noqa: N802
        self, request: aggregation_pb2.GetUnmaskRequestRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.GetUnmaskRequestResponse:
        live = self.rounds[request.round_id]
        status = live.status()
        if live.phase not in (RoundPhase.UNMASKING, RoundPhase.COMPLETE):
            return aggregation_pb2.GetUnmaskRequestResponse(status=status)
        survivors = sorted(status.submitted)
        dropped = sorted(set(status.shared) - set(survivors))
        return aggregation_pb2.GetUnmaskRequestResponse(
            status=status, ready=True, survivors=survivors, dropped=dropped
        )

    def Unmask(  # noqa: N802
        self, request: aggregation_pb2.UnmaskRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.UnmaskResponse:
        live = self.rounds[request.round_id]
        live.answer(RoundPhase.UNMASKING, request.site_id)
        return aggregation_pb2.UnmaskResponse(status=live.status())

    def GetRoundStatus(  # noqa: N802
        self, request: aggregation_pb2.GetRoundStatusRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.RoundStatus:
        return self.rounds[request.round_id].status()

    def DeclineRound(  # noqa: N802
        self, request: aggregation_pb2.DeclineRoundRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.DeclineRoundResponse:
        live = self.rounds[request.round_id]
        live.withdraw(request.site_id)
        return aggregation_pb2.DeclineRoundResponse(status=live.status())

    def PublishModel(  # noqa: N802
        self, request: aggregation_pb2.PublishModelRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.PublishModelResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")

    def ReportLedger(  # noqa: N802
        self, request: aggregation_pb2.ReportLedgerRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.ReportLedgerResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")


# -- the server process ----------------------------------------------------------------


def _memory_kib() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                fields[line.split(":")[0]] = int(line.split()[1])
    return fields


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


class _ThreadProfiles:
    """One cProfile per gRPC handler thread (cProfile sees only the thread it runs in)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def profiled(*args: Any, **kwargs: Any) -> Any:
            profile = getattr(self._local, "profile", None)
            if profile is None:
                profile = self._local.profile = cProfile.Profile(time.thread_time)
                with self._lock:
                    self._all.append(profile)
            profile.enable()
            try:
                return method(*args, **kwargs)
            finally:
                profile.disable()

        return profiled

    def dump(self, path: Path) -> None:
        with self._lock:
            stats = pstats.Stats(self._all[0])
            for profile in self._all[1:]:
                stats.add(profile)
        stats.dump_stats(str(path))


def _start_fedlens(
    workdir: Path, profiles: _ThreadProfiles | None
) -> tuple[str, Any, Callable[[str], np.ndarray | None]]:
    # Imported here: the aggregator pulls in torch, which the sites never need.
    from explain import ExplanationKind, PostProcessed, register_kind
    from server import grpc_server
    from server.aggregation import Aggregator, QueryHandler
    from server.storage import Store

    released: dict[str, np.ndarray] = {}

    def postprocess(
        noised_sum: np.ndarray,
        noise_std: float,
        clip_bound: float,
        labels: tuple[str, ...],
        params: Any,
    ) -> PostProcessed:
        # Also called on zeros when the round opens; the release overwrites that.
        released[params["benchmark_round"]] = noised_sum
        return PostProcessed(noised_count=0.0, values=(), grouped=())

    def contribute(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the benchmark kind only post-processes")

    register_kind(ExplanationKind(name=KIND, contribute=contribute, postprocess=postprocess))
    if profiles is not None:
        servicer = grpc_server.AggregationServicer
        for name in dir(aggregation_pb2_grpc.AggregationServicer):
            if not name.startswith("_"):
                setattr(servicer, name, profiles.wrap(getattr(servicer, name)))
    store = Store(f"sqlite:///{workdir / 'fedlens.db'}")
    running = grpc_server.serve(Aggregator(store), QueryHandler(store))
    return running.address, running, released.get


def _start_plain() -> tuple[str, Any, Callable[[str], np.ndarray | None]]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="plain-grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    servicer = _PlainServicer()
    aggregation_pb2_grpc.add_AggregationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def released(round_id: str) -> np.ndarray | None:
        live = servicer.rounds.get(round_id)
        return live.total if live is not None and live.phase is RoundPhase.COMPLETE else None

    return f"127.0.0.1:{port}", server, released


def _server_main(conn: Connection, kind: str, workdir: str, profile: bool) -> None:
    """The aggregator's process: serves, and answers ``begin``/``end``/``stop`` on ``conn``."""
    logging.basicConfig(level=logging.WARNING)
    profiles = _ThreadProfiles() if profile else None
    if kind == "plain":
        address, running, released = _start_plain()
    else:
        address, running, released = _start_fedlens(Path(workdir), profiles)
    conn.send(address)
    cpu0, rss0, reset = 0.0, 0, False
    while True:
        command, argument = conn.recv()
        if command == "begin":
            reset = _reset_peak()
            rss0 = _memory_kib()["VmRSS"]
            cpu0 = time.process_time()
            conn.send(None)
        elif command == "end":
            cpu = time.process_time() - cpu0
            memory = _memory_kib()
            profile_path = ""
            if profiles is not None:
                profile_path = str(Path(workdir) / f"{argument}.prof")
                profiles.dump(Path(profile_path))
            conn.send(
                {
                    "cpu_s": cpu,
                    "rss_before_mib": rss0 / 1024,
                    "peak_mib": memory["VmHWM"] / 1024,
                    "peak_is_round_peak": reset,
                    "released": released(argument),
                    "profile": profile_path,
                }
            )
        else:
            running.stop(None)
            conn.send(None)
            return


class ServerProcess:
    """An aggregator (fedlens or plain) in a process of its own."""

    def __init__(self, kind: str, workdir: Path, *, profile: bool = False) -> None:
        ctx = mp.get_context("spawn")
        self.kind = kind
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_server_main, args=(child, kind, str(workdir), profile), daemon=True
        )
        self._process.start()
        self._address: str | None = None

    @property
    def address(self) -> str:
        if self._address is None:
            self._address = str(self._receive(300.0))
        return self._address

    def _receive(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise DropoutError(f"the {self.kind} server process did not answer in {timeout:.0f}s")
        return self._conn.recv()

    def begin(self) -> None:
        self._conn.send(("begin", ""))
        self._receive(60.0)

    def end(self, round_id: str) -> dict[str, Any]:
        self._conn.send(("end", round_id))
        report: dict[str, Any] = self._receive(300.0)
        return report

    def stop(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("stop", ""))
                self._receive(30.0)
            except (OSError, EOFError, DropoutError):
                pass
        self._process.join(10.0)
        if self._process.is_alive():
            self._process.kill()


# -- the sites -------------------------------------------------------------------------


class _DroppedError(Exception):
    """Raised inside a dropping site's ``make_input``: it declines instead of submitting."""


@dataclass(frozen=True)
class SiteJob:
    """What a group of sites (one process or this one) needs to take part in a round."""

    mode: str
    address: str
    spec: RoundSpec
    indices: tuple[int, ...]
    dropped: frozenset[int]
    seed: int
    poll_s: float
    timeout_s: float


@dataclass
class SiteResult:
    site_id: str
    dropped: bool
    cpu_s: float = 0.0
    ended: float = 0.0
    error: str = ""


@dataclass
class GroupOutcome:
    """Per-site results, and the sums of this group's survivors (for the check)."""

    sites: list[SiteResult]
    float_sum: np.ndarray
    encoded_sum: np.ndarray | None


class SiteGroup:
    """Sites run as threads; everything but the round itself is prepared up front."""

    def __init__(self, job: SiteJob) -> None:
        self.job = job
        self.ids = site_ids(len(job.spec.site_ids))
        self.vectors = {i: site_vector(job.seed, i, job.spec.length) for i in job.indices}
        self.codec = FixedPointCodec(bits=job.spec.bits, scale=job.spec.scale)
        self.params = protocol_params(job.spec)
        _ = self.params.neighbours  # the graph is public; derive it before the clock starts
        self.identities = {i: Ed25519PrivateKey.generate() for i in job.indices}
        self.encoded: dict[int, np.ndarray] = {}
        self.clients = {
            i: AggregationClient(
                job.address, poll_interval=job.poll_s, call_timeout_s=job.timeout_s
            )
            for i in job.indices
        }

    def run(self) -> GroupOutcome:
        results = {i: SiteResult(self.ids[i], i in self.job.dropped) for i in self.job.indices}
        target = self._fedlens_site if self.job.mode in FEDLENS_MODES else self._plain_site
        threads = [
            threading.Thread(target=self._timed, args=(target, i, results[i]), daemon=True)
            for i in self.job.indices
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for client in self.clients.values():
            client.close()
        survivors = [i for i in self.job.indices if i not in self.job.dropped]
        float_sum = np.zeros(self.job.spec.length, dtype=np.float64)
        for i in survivors:
            float_sum += self.vectors[i]
        encoded_sum = None
        if self.job.mode in FEDLENS_MODES and survivors and len(self.encoded) == len(survivors):
            encoded_sum = self.codec.sum(self.encoded[i] for i in survivors)
        return GroupOutcome([results[i] for i in self.job.indices], float_sum, encoded_sum)

    def _timed(self, target: Callable[[int], None], index: int, result: SiteResult) -> None:
        start = time.thread_time()
        try:
            target(index)
        except Exception as exc:  # reported with the site, and fails the run
            result.error = f"{type(exc).__name__}: {exc}"
        result.cpu_s = time.thread_time() - start
        result.ended = time.monotonic()

    def _fedlens_site(self, index: int) -> None:
        site, client = self.ids[index], self.clients[index]
        session = SiteSession(self.params, site, self.identities[index])

        def make_input() -> SiteInput:
            if index in self.job.dropped:
                raise _DroppedError
            encoded = self.codec.encode(self.vectors[index], SecureRandom())
            self.encoded[index] = encoded
            return SiteInput(encoded, PrivacyCost(site, 0.0, 0.0, 0.0), 0.0)

        try:
            status = run_secure_round(client, session, make_input, timeout_s=self.job.timeout_s)
        except _DroppedError:
            client.decline(self.job.spec.round_id, site, "dropped out after sharing keys")
            return
        if status.phase is not RoundPhase.COMPLETE:
            raise DropoutError(f"round ended {status.phase.value}: {status.reason}")

    def _plain_site(self, index: int) -> None:
        site, client = self.ids[index], self.clients[index]
        stub, rid = client.stub, self.job.spec.round_id
        keys = aggregation_pb2.SignedKeys(site_id=site)
        client.call(
            stub.AdvertiseKeys, aggregation_pb2.AdvertiseKeysRequest(round_id=rid, keys=keys)
        )
        request = aggregation_pb2.GetPeerKeysRequest(round_id=rid, site_id=site)
        self._poll(client, stub.GetPeerKeys, request, lambda r: bool(r.keys))
        client.call(stub.ShareKeys, aggregation_pb2.ShareKeysRequest(round_id=rid, site_id=site))
        shares = aggregation_pb2.GetSharesRequest(round_id=rid, site_id=site)
        self._poll(client, stub.GetShares, shares, lambda r: bool(r.ready))
        if index in self.job.dropped:
            client.decline(rid, site, "dropped out after sharing keys")
            return
        values = np.ascontiguousarray(self.vectors[index], dtype="<f4").tobytes()
        submit = aggregation_pb2.SubmitMaskedRequest(round_id=rid, site_id=site, values=values)
        client.call(stub.SubmitMasked, submit)
        unmask = aggregation_pb2.GetUnmaskRequestRequest(round_id=rid, site_id=site)
        self._poll(client, stub.GetUnmaskRequest, unmask, lambda r: bool(r.ready))
        client.call(stub.Unmask, aggregation_pb2.UnmaskRequest(round_id=rid, site_id=site))
        status_request = aggregation_pb2.GetRoundStatusRequest(round_id=rid)
        done = (aggregation_pb2.ROUND_PHASE_COMPLETE, aggregation_pb2.ROUND_PHASE_ABORTED)
        reply = self._poll(client, stub.GetRoundStatus, status_request, lambda r: r.phase in done)
        if reply.phase != aggregation_pb2.ROUND_PHASE_COMPLETE:
            raise DropoutError(f"plain round ended {reply.phase}: {reply.reason}")

    def _poll(
        self,
        client: AggregationClient,
        method: Callable[..., Any],
        request: Any,
        ready: Callable[[Any], bool],
    ) -> Any:
        deadline = time.monotonic() + self.job.timeout_s
        while True:
            reply = client.call(method, request)
            if reply is not None and ready(reply):
                return reply
            if time.monotonic() > deadline:
                raise DropoutError(f"timed out polling {request.DESCRIPTOR.name}")
            client.sleep()


def _site_worker(job: SiteJob, ready: Any, go: Any, results: Any) -> None:
    group = SiteGroup(job)
    ready.put(os.getpid())
    go.wait()
    results.put(group.run())


def _run_site_groups(
    jobs: list[SiteJob], start_round: Callable[[], None], workers: int
) -> tuple[list[GroupOutcome], float]:
    """Prepare the sites, call ``start_round``, run them; outcomes and the start time."""
    if workers == 0:
        group = SiteGroup(jobs[0])
        started = time.monotonic()
        start_round()
        return [group.run()], started
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_site_worker, args=(job, ready, go, results), daemon=True)
        for job in jobs
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=300)
        started = time.monotonic()
        start_round()
        go.set()
        timeout = jobs[0].timeout_s * 5
        outcomes = [results.get(timeout=timeout) for _ in procs]
    except queue.Empty:
        raise DropoutError("a site worker process did not report in time") from None
    finally:
        for proc in procs:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
    return outcomes, started


# -- one round, measured ---------------------------------------------------------------


@dataclass
class RoundResult:
    mode: str
    sites: int
    dim: int
    degree: int
    seconds: float
    server_cpu_s: float
    server_peak_mib: float
    server_rss_before_mib: float
    site_cpu_s: list[float]
    dropped_site_cpu_s: list[float]
    prg_floor_s: float | None
    masks_removed: int
    max_abs_error: float
    error_bound: float
    sum_verified: bool
    profile: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "sites": self.sites,
            "dim": self.dim,
            "degree": self.degree,
            "seconds": round(self.seconds, 4),
            "server_cpu_s": round(self.server_cpu_s, 4),
            "server_peak_mib": round(self.server_peak_mib, 1),
            "server_rss_before_mib": round(self.server_rss_before_mib, 1),
            "server_round_mib": round(self.server_peak_mib - self.server_rss_before_mib, 1),
            "site_cpu_s_median": round(statistics.median(self.site_cpu_s), 4),
            "site_cpu_s_max": round(max(self.site_cpu_s), 4),
            "dropped_site_cpu_s_median": (
                round(statistics.median(self.dropped_site_cpu_s), 4)
                if self.dropped_site_cpu_s
                else None
            ),
            "prg_floor_s": None if self.prg_floor_s is None else round(self.prg_floor_s, 4),
            "masks_removed": self.masks_removed,
            "max_abs_error": self.max_abs_error,
            "error_bound": self.error_bound,
            "sum_verified": self.sum_verified,
        }


_round_counter = 0


def run_round(
    server: ServerProcess,
    mode: str,
    sites: int,
    dim: int,
    dropout: float,
    *,
    seed: int = 0,
    workers: int = 0,
    poll_s: float = 0.05,
    timeout_s: float = 600.0,
) -> RoundResult:
    """One round of ``mode`` against ``server``, measured and checked."""
    global _round_counter
    _round_counter += 1
    round_id = f"bench-{mode}-{sites}x{dim}-{os.getpid()}-{_round_counter}"
    spec = round_spec(mode, sites, dim, round_id, timeout_s)
    dropped = dropped_indices(sites, dropout, seed)
    groups = max(workers, 1)
    jobs = [
        SiteJob(
            mode,
            server.address,
            spec,
            tuple(range(g, sites, groups)),
            dropped,
            seed,
            poll_s,
            timeout_s,
        )
        for g in range(groups)
    ]
    channel = grpc.insecure_channel(server.address)
    stub = aggregation_pb2_grpc.AggregationStub(channel)

    def start_round() -> None:
        server.begin()
        stub.OpenRound(
            aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec)), timeout=60
        )

    try:
        outcomes, started = _run_site_groups(jobs, start_round, workers)
    finally:
        channel.close()
    report = server.end(round_id)
    results = [site for outcome in outcomes for site in outcome.sites]
    failed = [f"{r.site_id}: {r.error}" for r in results if r.error]
    if failed:
        raise DropoutError(f"{mode} round {round_id}: sites failed: {'; '.join(failed[:5])}")
    seconds = max(r.ended for r in results) - started

    survivors = [r.site_id for r in results if not r.dropped]
    gone = [r.site_id for r in results if r.dropped]
    expected = np.sum([o.float_sum for o in outcomes], axis=0)
    released = report["released"]
    if released is None:
        raise IntegrityError(f"{mode} round {round_id} released nothing")
    params = protocol_params(spec)
    floor: float | None = None
    masks = 0
    encoded: np.ndarray | None = None
    if mode != "plain":
        codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)
        partial = [o.encoded_sum for o in outcomes if o.encoded_sum is not None]
        encoded = codec.sum(partial) if partial else np.zeros(0, dtype=np.uint64)
        alive = set(survivors)
        masks = len(survivors) + sum(len(params.neighbours[s] & alive) for s in gone)
        floor = prg_floor(params, survivors, gone)
    error, bound = verify_released(
        f"{mode} round {round_id}", released, expected, encoded, spec, len(survivors)
    )
    return RoundResult(
        mode=mode,
        sites=sites,
        dim=dim,
        degree=params.degree if mode != "plain" else 0,
        seconds=seconds,
        server_cpu_s=report["cpu_s"],
        server_peak_mib=report["peak_mib"],
        server_rss_before_mib=report["rss_before_mib"],
        site_cpu_s=[r.cpu_s for r in results if not r.dropped],
        dropped_site_cpu_s=[r.cpu_s for r in results if r.dropped],
        prg_floor_s=floor,
        masks_removed=masks,
        max_abs_error=error,
        error_bound=bound,
        sum_verified=True,
        profile=report["profile"],
    )


def verify_released(
    what: str,
    released: np.ndarray,
    plain_sum: np.ndarray,
    encoded_sum: np.ndarray | None,
    spec: RoundSpec,
    survivors: int,
) -> tuple[float, float]:
    """Check a released sum; its largest error from ``plain_sum`` and the bound it met.

    Parameters
    ----------
    released
        ``(dim,)`` float64 sum the aggregator released.
    plain_sum
        ``(dim,)`` float64 sum of the survivors' float32 vectors.
    encoded_sum
        ``(dim,)`` uint64 sum modulo ``2**bits`` of the survivors' encodings for a masked
        round, whose decoding the release must equal exactly; ``None`` for the plain round.

    Raises
    ------
    IntegrityError
        The release differs from the decoded encodings, or from ``plain_sum`` by more than
        one quantisation step per survivor (``1e-9`` relative for the plain round).
    """
    released = np.asarray(released, dtype=np.float64)
    if released.shape != plain_sum.shape:
        raise IntegrityError(f"{what}: released shape {released.shape}, not {plain_sum.shape}")
    error = float(np.max(np.abs(released - plain_sum), initial=0.0))
    if encoded_sum is None:
        bound = 1e-9 * max(1.0, float(np.max(np.abs(plain_sum), initial=0.0)))
        exact = True
    else:
        codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)
        bound = survivors / spec.scale
        exact = encoded_sum.shape == released.shape and bool(
            np.array_equal(codec.decode(encoded_sum), released)
        )
    if not exact or not error <= bound:
        raise IntegrityError(
            f"{what}: the released sum differs from the sum of the survivors' vectors "
            f"(exact match with their encodings: {exact}; max |error| {error:.3g}, "
            f"allowed {bound:.3g})"
        )
    return error, bound


# -- the benchmark ---------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkConfig:
    sites: int = 100
    dim: int = 100_000
    dropout: float = 0.1
    seed: int = 0
    workers: int = 0
    poll_s: float = 0.05
    timeout_s: float = 600.0
    flower: bool = True
    flower_sites: int = 10
    flower_timeout_s: float = 900.0
    scaling: bool = False
    scaling_dim: int = 10_000
    scaling_site_counts: tuple[int, ...] = (25, 50, 100, 200)
    scaling_sites: int = 25
    scaling_dims: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    profile: Path | None = None


def run_rounds(
    modes: Sequence[str], config: BenchmarkConfig, sites: int, dim: int, workdir: Path
) -> dict[str, RoundResult]:
    """One round of each mode at ``sites`` x ``dim``, with one server process per kind."""
    servers: dict[str, ServerProcess] = {}
    try:
        # Both start at once: the fedlens one spends seconds importing.
        for kind in {"plain" if m == "plain" else "fedlens" for m in modes}:
            servers[kind] = ServerProcess(kind, workdir)
        results = {}
        for mode in modes:
            server = servers["plain" if mode == "plain" else "fedlens"]
            logger.info("%s: %d sites x %d, dropout %g", mode, sites, dim, config.dropout)
            results[mode] = run_round(
                server,
                mode,
                sites,
                dim,
                config.dropout,
                seed=config.seed,
                workers=config.workers,
                poll_s=config.poll_s,
                timeout_s=config.timeout_s,
            )
        return results
    finally:
        for server in servers.values():
            server.stop()


def best_mode(results: dict[str, RoundResult]) -> RoundResult:
    """The fedlens mode with the lower server CPU time."""
    return min((results[m] for m in FEDLENS_MODES if m in results), key=lambda r: r.server_cpu_s)


def run_flower(config: BenchmarkConfig) -> dict[str, Any]:
    empty: dict[str, Any] = {"flower_sites": None, "flower_secaggplus_s": None}
    if not config.flower:
        return {**empty, "flower_error": "not run (--no-flower)"}
    try:
        from benchmarks.flower_secaggplus import run_flower_secaggplus

        result: dict[str, Any] = run_flower_secaggplus(
            config.flower_sites, config.dim, config.dropout, timeout_s=config.flower_timeout_s
        )
        if not result.get("checked_sum", False):
            raise IntegrityError(f"Flower's sum did not check: {result}")
        float(result["flower_secaggplus_s"])
        int(result["flower_sites"])
    except Exception as exc:  # any failure of the other module leaves Flower's fields null
        logger.warning("Flower SecAgg+ did not run: %s", exc)
        return {**empty, "flower_error": f"{type(exc).__name__}: {exc}"}
    return result


def run_scaling(config: BenchmarkConfig, workdir: Path) -> dict[str, Any]:
    def point(sites: int, dim: int) -> dict[str, Any]:
        modes = ["complete"]
        if recommended_degree(sites) < sites - 1:
            modes.append("secaggplus")
        results = run_rounds(modes, config, sites, dim, workdir)
        best = best_mode(results)
        return {**best.summary(), "modes_run": modes}

    return {
        "by_sites": [point(n, config.scaling_dim) for n in config.scaling_site_counts],
        "by_dim": [point(config.scaling_sites, d) for d in config.scaling_dims],
        "note": "best fedlens mode (lower server CPU) at each point; server_round_mib is the "
        "server's peak resident memory during the round minus its memory before it",
    }


def run_profile(config: BenchmarkConfig, workdir: Path, out: Path) -> dict[str, Any]:
    """One more complete-graph round with the aggregator's handler threads under cProfile."""
    server = ServerProcess("fedlens", workdir, profile=True)
    try:
        result = run_round(
            server,
            "complete",
            config.sites,
            config.dim,
            config.dropout,
            seed=config.seed,
            workers=config.workers,
            poll_s=config.poll_s,
            timeout_s=config.timeout_s,
        )
    finally:
        server.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    stats = pstats.Stats(result.profile, stream=text)
    stats.dump_stats(str(out))
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return {
        "profile_file": str(out),
        "profiled_server_cpu_s": result.server_cpu_s,
        "profiled_seconds": result.seconds,
        "top": text.getvalue(),
    }


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Every measurement the CLI reports, as one JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="fedlens-secagg-") as tmp:
        workdir = Path(tmp)
        results = run_rounds(MODES, config, config.sites, config.dim, workdir)
        plain, best = results["plain"], best_mode(results)
        assert best.prg_floor_s is not None
        floor = best.prg_floor_s
        report: dict[str, Any] = {
            "benchmark": "secagg",
            "sites": config.sites,
            "dim": config.dim,
            "dropout": config.dropout,
            "dropped": round(config.dropout * config.sites),
            "threshold": default_threshold(config.sites),
            "secaggplus_degree": recommended_degree(config.sites),
            "secaggplus_is_complete_graph": recommended_degree(config.sites) >= config.sites - 1,
            "plain_s": plain.seconds,
            "secagg_s": results["complete"].seconds,
            "secaggplus_s": results["secaggplus"].seconds,
            "best_mode": best.mode,
            "server_cpu_s": best.server_cpu_s,
            "plain_server_cpu_s": plain.server_cpu_s,
            "prg_floor_s": floor,
            "server_ratio": best.server_cpu_s / (floor + plain.server_cpu_s),
            "target_ratio": TARGET_RATIO,
            "site_cpu_s_median": statistics.median(best.site_cpu_s),
            "plain_site_cpu_s_median": statistics.median(plain.site_cpu_s),
            "server_peak_mib": best.server_peak_mib,
            "server_rss_before_mib": best.server_rss_before_mib,
            "plain_server_peak_mib": plain.server_peak_mib,
            "sum_verified": all(r.sum_verified for r in results.values()),
            "modes": {mode: r.summary() for mode, r in results.items()},
        }
        flower = run_flower(config)
        report.update(
            {
                "flower_sites": flower.get("flower_sites"),
                "flower_secaggplus_s": flower.get("flower_secaggplus_s"),
                "flower_error": flower.get("flower_error"),
                "fedlens_at_flower_sites_s": None,
                "flower": flower,
            }
        )
        if report["flower_sites"] is not None:
            at = run_rounds(FEDLENS_MODES, config, int(report["flower_sites"]), config.dim, workdir)
            report["fedlens_at_flower_sites_s"] = best_mode(at).seconds
            report["fedlens_at_flower_sites"] = {m: r.summary() for m, r in at.items()}
        report["scaling"] = run_scaling(config, workdir) if config.scaling else None
        if config.profile is not None:
            report["profile"] = run_profile(config, workdir, config.profile)
    report.update(
        {
            "cores": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_1m": os.getloadavg()[0],
            "site_workers": config.workers,
            "poll_s": config.poll_s,
        }
    )
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['sites']} sites x {report['dim']} float32, dropout {report['dropout']} "
        f"({report['dropped']} dropped), threshold {report['threshold']}, {report['cores']} cores",
        f"{'mode':<11}{'wall s':>9}{'server cpu s':>14}{'site cpu s (med)':>18}"
        f"{'server peak MiB':>17}{'prg floor s':>13}  sum",
    ]
    for mode, r in report["modes"].items():
        floor = "-" if r["prg_floor_s"] is None else f"{r['prg_floor_s']:.3f}"
        lines.append(
            f"{mode:<11}{r['seconds']:>9.2f}{r['server_cpu_s']:>14.3f}"
            f"{r['site_cpu_s_median']:>18.4f}{r['server_peak_mib']:>17.1f}{floor:>13}"
            f"  {'ok' if r['sum_verified'] else 'MISMATCH'}"
        )
    lines.append(
        f"server ratio ({report['best_mode']}): {report['server_cpu_s']:.3f} / "
        f"({report['prg_floor_s']:.3f} + {report['plain_server_cpu_s']:.3f}) = "
        f"{report['server_ratio']:.2f} (target {TARGET_RATIO})"
    )
    if report["flower_sites"] is not None:
        lines.append(
            f"Flower SecAgg+ at {report['flower_sites']} sites: "
            f"{report['flower_secaggplus_s']:.2f} s; fedlens: "
            f"{report['fedlens_at_flower_sites_s']:.2f} s"
        )
    else:
        lines.append(f"Flower SecAgg+: not measured ({report['flower_error']})")
    scaling = report.get("scaling")
    if scaling:
        lines.append(
            f"{'sites':>6}{'dim':>9}{'mode':>12}{'wall s':>9}{'server cpu s':>14}"
            f"{'round MiB':>11}{'peak MiB':>10}"
        )
        for r in scaling["by_sites"] + scaling["by_dim"]:
            lines.append(
                f"{r['sites']:>6}{r['dim']:>9}{r['mode']:>12}{r['seconds']:>9.2f}"
                f"{r['server_cpu_s']:>14.3f}{r['server_round_mib']:>11.1f}"
                f"{r['server_peak_mib']:>10.1f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--site-workers", type=int, default=0, help="site processes (0: threads of this one)"
    )
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between polls")
    parser.add_argument("--timeout", type=float, default=600.0, help="phase timeout, seconds")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--flower-sites", type=int, default=10)
    parser.add_argument("--flower-timeout", type=float, default=900.0)
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--scaling-dim", type=int, default=10_000)
    parser.add_argument("--scaling-site-counts", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--scaling-sites", type=int, default=25)
    parser.add_argument(
        "--scaling-dims", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000]
    )
    parser.add_argument("--profile", type=Path, default=None, help="profile the aggregator")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = BenchmarkConfig(
        sites=args.sites,
        dim=args.dim,
        dropout=args.dropout,
        seed=args.seed,
        workers=args.site_workers,
        poll_s=args.poll,
        timeout_s=args.timeout,
        flower=not args.no_flower,
        flower_sites=args.flower_sites,
        flower_timeout_s=args.flower_timeout,
        scaling=args.scaling,
        scaling_dim=args.scaling_dim,
        scaling_site_counts=tuple(args.scaling_site_counts),
        scaling_sites=args.scaling_sites,
        scaling_dims=tuple(args.scaling_dims),
        profile=args.profile,
    )
    report = run_benchmark(config)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    if "profile" in report:
        print(report["profile"]["top"])


if __name__ == "__main__":
    main()
