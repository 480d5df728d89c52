"""The site's side of a secure-aggregation round, over gRPC.

Advertise an X25519 key, wait until every site of the round has, mask the encoded
contribution with the pairwise masks (:mod:`privacy.masking`) and submit it. Only this
module and :mod:`fedlens.wire` touch the generated stubs on the site.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from fedlens import wire
from fedlens.errors import DropoutError, StaleRoundError
from fedlens.types import KeyAdvertisement, MaskedSubmission, PrivacyCost, RoundPhase, RoundStatus
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc
from privacy import generate_keypair, mask_vector

__all__ = ["AggregationClient", "SubmitOutcome"]

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class SubmitOutcome:
    status: RoundStatus
    peers: tuple[str, ...]


class AggregationClient:
    """A connection to the aggregator's ``Aggregation`` service.

    Parameters
    ----------
    address
        ``host:port`` of the aggregator.
    poll_interval
        Seconds between polls while waiting for peers' keys.
    sleep, clock
        Injected for tests; ``time.sleep`` and ``time.monotonic`` by default.
    """

    def __init__(
        self,
        address: str,
        *,
        poll_interval: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = aggregation_pb2_grpc.AggregationStub(self._channel)
        self._poll = poll_interval
        self._sleep = sleep
        self._clock = clock

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AggregationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self, round_id: str) -> RoundStatus:
        msg = self._stub.GetRoundStatus(aggregation_pb2.GetRoundStatusRequest(round_id=round_id))
        return wire.round_status_from_proto(msg)

    def contribute(
        self,
        *,
        round_id: str,
        site_id: str,
        encoded: np.ndarray,
        bits: int,
        cost: PrivacyCost,
        noise_std: float,
        timeout_s: float,
    ) -> SubmitOutcome:
        """Run the site's whole protocol for one round and return the round's status.

        Parameters
        ----------
        encoded
            ``(length,)`` uint64 fixed-point contribution, already noised.
        timeout_s
            How long to wait for the other sites' keys before giving up.

        Raises
        ------
        DropoutError
            Not every site advertised a key in time; nothing was submitted.
        StaleRoundError
            The round was aborted by the aggregator.
        """
        keys = generate_keypair()
        adv = KeyAdvertisement(round_id=round_id, site_id=site_id, public_key=keys.public_bytes)
        self._stub.AdvertiseKey(wire.key_advertisement_to_proto(adv))
        peers = self._wait_for_peers(round_id, site_id, timeout_s)
        masked = mask_vector(encoded, keys, site_id, peers, round_id, bits)
        sub = MaskedSubmission(
            round_id=round_id, site_id=site_id, values=masked, cost=cost, noise_std=noise_std
        )
        reply = self._stub.SubmitMasked(wire.masked_submission_to_proto(sub))
        status = wire.round_status_from_proto(reply.status)
        return SubmitOutcome(status=status, peers=tuple(sorted(peers)))

    def _wait_for_peers(self, round_id: str, site_id: str, timeout_s: float) -> dict[str, bytes]:
        deadline = self._clock() + timeout_s
        request = aggregation_pb2.GetPeerKeysRequest(round_id=round_id, site_id=site_id)
        while True:
            try:
                reply = self._stub.GetPeerKeys(request)
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
                    raise StaleRoundError(exc.details() or "round aborted") from exc
                raise
            if reply.keys:
                return {k.site_id: bytes(k.public_key) for k in reply.keys}
            status = wire.round_status_from_proto(reply.status)
            if status.phase is RoundPhase.ABORTED:
                raise StaleRoundError(f"round {round_id} aborted: {status.reason}")
            if self._clock() > deadline:
                raise DropoutError(
                    f"round {round_id}: timed out after {timeout_s:.0f}s waiting for the other "
                    f"sites' keys (have {', '.join(status.advertised) or 'none'})"
                )
            self._sleep(self._poll)
