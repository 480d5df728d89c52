"""The baseline: the ``Aggregation`` gRPC service with the cryptography taken out.

Sites advertise empty keys, wait for the key list, send an empty share list, wait, submit
their float32 vector as bytes in ``SubmitMaskedRequest.values``, wait for the unmask request,
send an empty unmask message and poll the status until the round is complete; a site that
drops out sends ``DeclineRound`` instead of its vector. The servicer here tracks who answered
each phase, returns the same status fields as the real one (the four lists of site ids) and
adds every vector into a float64 running sum in memory; it keeps no journal, audit log or
store. Its gRPC server has 16 handler threads and 64 MiB messages (the fedlens server,
:func:`server.grpc_server.serve`, has 8 by default and turns HTTP/2 bandwidth probing off).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from client.secagg_client import MAX_MESSAGE_BYTES
from fedlens import wire
from fedlens.errors import IntegrityError
from fedlens.types import RoundPhase, RoundSpec, RoundStatus
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc

__all__ = ["start_plain_server"]


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

    def GetModel(  # noqa: N802
        self, request: aggregation_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.GetModelResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")

    def FinishJob(  # noqa: N802
        self, request: aggregation_pb2.FinishJobRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.FinishJobResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")


def start_plain_server() -> tuple[str, Any, Callable[[str], np.ndarray | None]]:
    """Serve the baseline on a free loopback port.

    Returns its address, the server (to stop) and a lookup of a completed round's
    ``(dim,)`` float64 sum by round id (``None`` until the round completes).
    """
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
