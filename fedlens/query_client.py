"""An analyst's client of the ``Query`` service: needs grpcio and protobuf only."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc

from fedlens import wire
from fedlens.channels import bearer_metadata, describe_target, open_channel
from fedlens.jobs import Job, JobRequest
from fedlens.status_codes import error_from_rpc
from fedlens.types import InputExplanation, Release, ReleaseSummary, SiteLedger
from fedlens.v1 import query_pb2, query_pb2_grpc

__all__ = ["QueryClient"]

_Reply = TypeVar("_Reply")


class QueryClient:
    """Reads releases from a coordinator.

    Parameters
    ----------
    address
        ``host:port`` of the coordinator's gRPC server.
    timeout_s
        Deadline of every call.
    tls_ca
        The CA certificate (PEM) of the server's TLS certificate; plaintext without it.
    token
        The caller's token (``fedlens admin token issue``), sent with every call; a
        coordinator that checks tokens refuses calls without one.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 10.0,
        tls_ca: Path | None = None,
        token: str | None = None,
    ) -> None:
        self._address = describe_target(address, tls_ca)
        self._channel = open_channel(address, tls_ca=tls_ca)
        self._stub = query_pb2_grpc.QueryStub(self._channel)
        self._timeout = timeout_s
        self._metadata = bearer_metadata(token)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_releases(self, *, limit: int = 0, kind: str = "") -> list[ReleaseSummary]:
        reply = self._call(
            self._stub.ListReleases, query_pb2.ListReleasesRequest(limit=limit, kind=kind)
        )
        return [wire.release_summary_from_proto(r) for r in reply.releases]

    def get_release(self, release_id: str) -> Release:
        reply = self._call(
            self._stub.GetRelease, query_pb2.GetReleaseRequest(release_id=release_id)
        )
        return wire.release_from_proto(reply)

    def list_budgets(self, *, site_id: str = "") -> list[SiteLedger]:
        """Every site's ledger as the coordinator mirrors it, with its composed ε."""
        reply = self._call(self._stub.ListBudgets, query_pb2.ListBudgetsRequest(site_id=site_id))
        return [wire.site_ledger_from_proto(ledger) for ledger in reply.ledgers]

    def explain_input(
        self, record: Mapping[str, str], *, model_id: str = "", top: int = 0
    ) -> InputExplanation:
        """Explain one input (raw values as text) with the coordinator's global model.

        Raises
        ------
        IntegrityError
            The server refused the record (INVALID_ARGUMENT); the message names the feature.
        NotFoundError
            No such model, or none stored yet.
        """
        request = wire.explain_input_request_to_proto(record, model_id=model_id, top=top)
        return wire.input_explanation_from_proto(self._call(self._stub.ExplainInput, request))

    def submit_job(self, request: JobRequest) -> Job:
        """Ask the coordinator for an explanation round (or an identical earlier answer).

        Raises
        ------
        IntegrityError
            The request is malformed, too large, or asks for a cohort below the
            coordinator's minimum (INVALID_ARGUMENT); nothing was spent.
        BudgetExceededError
            Some site's mirrored ledger cannot pay for it (RESOURCE_EXHAUSTED); the
            message names the site.
        PermissionDeniedError
            The token's role is below analyst.
        """
        reply = self._call(self._stub.SubmitJob, wire.job_request_to_proto(request))
        return wire.job_from_proto(reply)

    def get_job(self, job_id: str) -> Job:
        reply = self._call(self._stub.GetJob, query_pb2.GetJobRequest(job_id=job_id))
        return wire.job_from_proto(reply)

    def list_jobs(self, *, limit: int = 0, state: str = "") -> list[Job]:
        """Jobs, newest first (only those in ``state`` if given)."""
        reply = self._call(self._stub.ListJobs, query_pb2.ListJobsRequest(limit=limit, state=state))
        return [wire.job_from_proto(j) for j in reply.jobs]

    def _call(self, method: Callable[..., _Reply], request: Any) -> _Reply:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self._address) from None
