"""The site's side of a secure-aggregation round over gRPC.

:func:`run_secure_round` drives a :class:`privacy.secagg_site.SiteSession` against the
aggregator: advertise signed keys, wait for the neighbours' keys, send sealed shares,
wait for the shares addressed to this site, submit the masked input, wait for the unmask
request, reveal shares, and wait for the round to end. Every wait is a poll with the
round's phase deadline as its limit.

This module and everything it imports need only numpy, grpcio, protobuf and cryptography
(no torch, no Flower): it is also the thin client a mobile or embedded prototype uses.
A call that finds the aggregator unavailable (for instance while it restarts) is retried
until ``retry_s`` has passed; a retried submission that the aggregator had already
counted is recognised and not sent twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from fedlens import wire
from fedlens.channels import open_channel
from fedlens.errors import DropoutError, DuplicateSubmissionError, IntegrityError, StaleRoundError
from fedlens.secagg_types import SecAggPhase
from fedlens.status_codes import error_from_rpc
from fedlens.types import MaskedSubmission, PrivacyCost, RoundStatus
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc
from privacy.secagg_site import SiteSession

__all__ = ["MAX_MESSAGE_BYTES", "AggregationClient", "SiteInput", "run_secure_round"]

logger = logging.getLogger(__name__)

# A contribution of a million float coordinates as uint64 is 8 MB on the wire.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_Reply = TypeVar("_Reply")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class AggregationClient:
    """A connection to the aggregator's ``Aggregation`` service.

    Parameters
    ----------
    address
        ``host:port`` of the aggregator.
    call_timeout_s
        Deadline of every single call.
    poll_interval
        Seconds between polls while waiting for a phase to close.
    retry_s
        How long a call keeps being retried while the aggregator is unavailable.
    sleep, clock
        Injected for tests; ``time.sleep`` and ``time.monotonic`` by default.
    tls_ca
        The CA certificate (PEM) of the aggregator's TLS certificate; plaintext without it.
    """

    def __init__(
        self,
        address: str,
        *,
        call_timeout_s: float = 30.0,
        poll_interval: float = 0.05,
        retry_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        tls_ca: Path | None = None,
    ) -> None:
        self._address = address
        self._channel = open_channel(
            address,
            tls_ca=tls_ca,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = aggregation_pb2_grpc.AggregationStub(self._channel)
        self._timeout = call_timeout_s
        self.poll_interval = poll_interval
        self._retry_s = retry_s
        self._sleep = sleep
        self.clock = clock

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AggregationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sleep(self, polls: int = 0) -> None:
        """Wait before the next poll: ``poll_interval``, growing by half with every poll
        of the same wait up to 20 times that, so many waiting sites do not flood the
        aggregator while a phase is long."""
        self._sleep(self.poll_interval * min(20.0, 1.5**polls))

    def call(self, method: Callable[..., _Reply], request: Any) -> _Reply | None:
        """One call, retried while the aggregator is unavailable.

        Returns ``None`` when a retry of a state-changing call finds that the first attempt
        may have been accepted before its reply was lost: the aggregator answers
        ALREADY_EXISTS, or FAILED_PRECONDITION because that attempt closed the phase. The
        polls that follow tell which: a message that was not accepted leaves this site
        out of the next phase, and the site's own checks then refuse to go on.
        """
        give_up = self.clock() + self._retry_s
        attempt = 0
        while True:
            try:
                return method(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, self._address)
                if attempt and isinstance(error, DuplicateSubmissionError | StaleRoundError):
                    return None
                if exc.code() not in _RETRYABLE or self.clock() > give_up:
                    raise error from None
                attempt += 1
                logger.info("aggregator at %s unavailable; retrying", self._address)
                self._sleep(min(1.0, 0.1 * attempt))

    @property
    def stub(self) -> aggregation_pb2_grpc.AggregationStub:
        return self._stub

    def status(self, round_id: str) -> RoundStatus:
        request = aggregation_pb2.GetRoundStatusRequest(round_id=round_id)
        reply = self.call(self._stub.GetRoundStatus, request)
        assert reply is not None  # a read is never answered ALREADY_EXISTS
        return wire.round_status_from_proto(reply)

    def decline(self, round_id: str, site_id: str, reason: str) -> RoundStatus:
        """Tell the aggregator this site will not contribute; it counts as dropped."""
        request = aggregation_pb2.DeclineRoundRequest(
            round_id=round_id, site_id=site_id, reason=reason
        )
        reply = self.call(self._stub.DeclineRound, request)
        return (
            self.status(round_id) if reply is None else wire.round_status_from_proto(reply.status)
        )


@dataclass(frozen=True)
class SiteInput:
    """What a site submits: its encoded vector and what producing it cost."""

    encoded: np.ndarray
    cost: PrivacyCost
    noise_std: float


def run_secure_round(
    client: AggregationClient,
    session: SiteSession,
    make_input: Callable[[], SiteInput],
    *,
    timeout_s: float,
    pinned: Mapping[str, bytes] | None = None,
) -> RoundStatus:
    """Take part in one round; returns its final status (complete or aborted).

    Parameters
    ----------
    make_input
        Called once the site's neighbours have shared their keys, right before masking:
        a site records its privacy spend there, so a round that never gathers enough
        sites costs it nothing.
    timeout_s
        Longest wait for any one phase.
    pinned
        Identity keys this site already trusts (site id -> raw Ed25519 key); a relayed
        identity that differs is refused. Others are taken from the aggregator's registry.

    Raises
    ------
    StaleRoundError
        The round aborted before this site submitted.
    DropoutError
        A phase did not close within ``timeout_s``, or too few neighbours took part.
    IntegrityError
        The aggregator relayed keys, shares or requests that fail the site's checks.
    """
    round_id, site_id, stub = session.params.round_id, session.site_id, client.stub
    identity = session.identity_public
    keys = session.advertise()
    client.call(
        stub.AdvertiseKeys,
        aggregation_pb2.AdvertiseKeysRequest(
            round_id=round_id, keys=wire.signed_keys_to_proto(keys, identity)
        ),
    )
    poll = aggregation_pb2.GetPeerKeysRequest(round_id=round_id, site_id=site_id)
    reply = _wait(client, stub.GetPeerKeys, poll, lambda r: bool(r.keys), timeout_s, "keys")
    advertised = {k.site_id: wire.signed_keys_from_proto(round_id, k) for k in reply.keys}
    identities = {k.site_id: bytes(k.identity_public) for k in reply.keys}
    for site, key in (pinned or {}).items():
        if site in identities and identities[site] != key:
            raise IntegrityError(f"the identity relayed for {site} differs from the pinned one")
    if identities.get(site_id) != identity:
        raise IntegrityError("the aggregator relayed another identity key for this site")
    sealed = session.share_keys(advertised, identities)
    client.call(
        stub.ShareKeys,
        aggregation_pb2.ShareKeysRequest(
            round_id=round_id, site_id=site_id, shares=wire.sealed_shares_to_proto(sealed)
        ),
    )
    poll_shares = aggregation_pb2.GetSharesRequest(round_id=round_id, site_id=site_id)
    got = _wait(client, stub.GetShares, poll_shares, lambda r: r.ready, timeout_s, "shares")
    received = wire.sealed_shares_from_proto(round_id, got.shares)
    site_input = make_input()
    masked = session.masked_input(site_input.encoded, received)
    submission = MaskedSubmission(round_id, site_id, masked, site_input.cost, site_input.noise_std)
    client.call(stub.SubmitMasked, wire.masked_submission_to_proto(submission))
    poll_unmask = aggregation_pb2.GetUnmaskRequestRequest(round_id=round_id, site_id=site_id)
    request = _wait(
        client, stub.GetUnmaskRequest, poll_unmask, lambda r: r.ready, timeout_s, "unmask"
    )
    revealed = session.unmask(tuple(request.survivors), tuple(request.dropped))
    client.call(
        stub.Unmask,
        aggregation_pb2.UnmaskRequest(
            round_id=round_id,
            site_id=site_id,
            shares=wire.revealed_shares_to_proto(revealed),
        ),
    )
    deadline = client.clock() + timeout_s
    polls = 0
    while True:
        status = client.status(round_id)
        if status.phase.finished:
            return status
        if client.clock() > deadline:
            raise DropoutError(f"round {round_id}: did not finish within {timeout_s:.0f}s")
        client.sleep(polls)
        polls += 1


def _wait(
    client: AggregationClient,
    method: Callable[..., Any],
    request: Any,
    ready: Callable[[Any], bool],
    timeout_s: float,
    what: str,
) -> Any:
    deadline = client.clock() + timeout_s
    polls = 0
    while True:
        reply = client.call(method, request)
        if reply is not None and ready(reply):
            return reply
        status = wire.round_status_from_proto(reply.status) if reply is not None else None
        if status is not None and status.phase is SecAggPhase.ABORTED:
            raise StaleRoundError(f"round {status.round_id} aborted: {status.reason}")
        if client.clock() > deadline:
            raise DropoutError(
                f"round {request.round_id}: timed out after {timeout_s:.0f}s waiting for {what}"
            )
        client.sleep(polls)
        polls += 1
