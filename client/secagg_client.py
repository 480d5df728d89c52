"""The site's side of a secure-aggregation round, over gRPC.

Three steps, each a call or a poll: advertise an X25519 key, wait until every site of the
round has (checking that the keys returned are exactly the round's sites, this site's own
key among them), then submit the masked vector. Only this module and :mod:`fedlens.wire`
touch the generated stubs on the site; every call has a deadline and failures come back
as fedlens errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import grpc

from fedlens import wire
from fedlens.channels import open_channel
from fedlens.errors import DropoutError, IntegrityError, StaleRoundError
from fedlens.status_codes import error_from_rpc
from fedlens.types import KeyAdvertisement, MaskedSubmission, RoundPhase, RoundStatus
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc

__all__ = ["MAX_MESSAGE_BYTES", "AggregationClient"]

logger = logging.getLogger(__name__)

# A contribution of a million float coordinates as uint64 is about 10 MB on the wire.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024

_Reply = TypeVar("_Reply")


class AggregationClient:
    """A connection to the aggregator's ``Aggregation`` service.

    Parameters
    ----------
    address
        ``host:port`` of the aggregator.
    call_timeout_s
        Deadline of every single call.
    poll_interval
        Seconds between polls while waiting for peers' keys.
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
        self._poll = poll_interval
        self._sleep = sleep
        self._clock = clock

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AggregationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., _Reply], request: Any) -> _Reply:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self._address) from None

    def advertise(self, adv: KeyAdvertisement) -> RoundStatus:
        reply = self._call(self._stub.AdvertiseKey, wire.key_advertisement_to_proto(adv))
        return wire.round_status_from_proto(reply.status)

    def wait_for_peers(
        self,
        round_id: str,
        site_id: str,
        *,
        expected: Collection[str],
        own_key: bytes,
        timeout_s: float,
    ) -> dict[str, bytes]:
        """Every site's public key, once all have advertised.

        Raises
        ------
        DropoutError
            Not every site advertised within ``timeout_s``.
        StaleRoundError
            The aggregator aborted the round.
        IntegrityError
            The keys returned are not exactly the round's sites, or this site's key is
            not its own: submitting would leave the contribution unmasked.
        """
        deadline = self._clock() + timeout_s
        request = aggregation_pb2.GetPeerKeysRequest(round_id=round_id, site_id=site_id)
        while True:
            reply = self._call(self._stub.GetPeerKeys, request)
            if reply.keys:
                keys = {k.site_id: bytes(k.public_key) for k in reply.keys}
                if set(keys) != set(expected) or len(keys) < 2 or keys.get(site_id) != own_key:
                    raise IntegrityError(
                        f"round {round_id}: the aggregator returned keys for {sorted(keys)}, "
                        f"expected {sorted(expected)} with this site's own key"
                    )
                return keys
            status = wire.round_status_from_proto(reply.status)
            if status.phase is RoundPhase.ABORTED:
                raise StaleRoundError(f"round {round_id} aborted: {status.reason}")
            if self._clock() > deadline:
                raise DropoutError(
                    f"round {round_id}: timed out after {timeout_s:.0f}s waiting for the other "
                    f"sites' keys (have {', '.join(status.advertised) or 'none'})"
                )
            self._sleep(self._poll)

    def submit(self, sub: MaskedSubmission) -> RoundStatus:
        reply = self._call(self._stub.SubmitMasked, wire.masked_submission_to_proto(sub))
        return wire.round_status_from_proto(reply.status)

    def decline(self, round_id: str, site_id: str, reason: str) -> RoundStatus:
        """Tell the aggregator this site will not contribute; the round aborts."""
        request = aggregation_pb2.DeclineRoundRequest(
            round_id=round_id, site_id=site_id, reason=reason
        )
        reply = self._call(self._stub.DeclineRound, request)
        return wire.round_status_from_proto(reply.status)
