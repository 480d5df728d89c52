"""The sites of a benchmark round: threads of this process or of ``--site-workers`` processes.

Everything but the round itself (vectors, identity keys, the public graph, the clients) is
prepared before the round opens. In the fedlens modes each site runs
:func:`client.secagg_client.run_secure_round`; in ``plain`` it walks the same four phases
against the baseline (:mod:`benchmarks.secagg_plain`) with the same
:class:`client.secagg_client.AggregationClient`. A site chosen to drop out advertises, shares
its keys, waits for the shares, and then sends ``DeclineRound`` instead of a vector.
Declining, rather than going silent, lets every mode close the phase as soon as the
survivors have answered instead of waiting for a deadline (a silent drop would add the phase
timeout to every mode alike).

Each site's CPU time is its thread's ``time.thread_time`` over its part in the round (gRPC's
own I/O threads excluded); it also records when it saw the round end. Each group of sites
returns the float64 sum of its survivors' vectors and, in the fedlens modes, the sum of their
fixed-point encodings, for the check of the released sum.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks.secagg_setup import FEDLENS_MODES, protocol_params, site_ids, site_vector
from client.secagg_client import AggregationClient, SiteInput, run_secure_round
from fedlens.errors import DropoutError
from fedlens.types import PrivacyCost, RoundPhase, RoundSpec
from fedlens.v1 import aggregation_pb2
from privacy import FixedPointCodec, SecureRandom
from privacy.secagg_site import SiteSession

__all__ = ["GroupOutcome", "SiteGroup", "SiteJob", "SiteResult", "run_site_groups"]

_DECLINE_REASON = "dropped out after sharing keys"


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
            client.decline(self.job.spec.round_id, site, _DECLINE_REASON)
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
            client.decline(rid, site, _DECLINE_REASON)
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


def run_site_groups(
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
