"""The coordinator's gRPC server: Aggregation and Query services, health and reflection.

Servicers are thin: decode with :mod:`fedlens.wire`, call the handler, encode. Errors
are mapped to status codes once, by :class:`server.errors.ErrorMappingInterceptor`.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client.secagg_client import MAX_MESSAGE_BYTES
from fedlens import wire
from fedlens.channels import server_credentials
from fedlens.errors import ConfigurationError
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc, query_pb2, query_pb2_grpc
from server.access import AccessControl, AccessInterceptor, current_principal
from server.aggregation import Aggregator, QueryHandler
from server.errors import ErrorMappingInterceptor
from server.jobs import JobQueue
from server.query_handler import LruCache

__all__ = ["AggregationServicer", "QueryServicer", "RunningServer", "serve"]

logger = logging.getLogger(__name__)


class AggregationServicer(aggregation_pb2_grpc.AggregationServicer):
    def __init__(self, aggregator: Aggregator, jobs: JobQueue) -> None:
        self._agg = aggregator
        self._jobs = jobs

    def OpenRound(  # noqa: N802 - gRPC method names
        self, request: aggregation_pb2.OpenRoundRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.OpenRoundResponse:
        status = self._agg.open_round(wire.round_spec_from_proto(request.spec))
        return aggregation_pb2.OpenRoundResponse(status=wire.round_status_to_proto(status))

    def AdvertiseKeys(  # noqa: N802
        self, request: aggregation_pb2.AdvertiseKeysRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.AdvertiseKeysResponse:
        keys = wire.signed_keys_from_proto(request.round_id, request.keys)
        status = self._agg.advertise(keys, bytes(request.keys.identity_public))
        return aggregation_pb2.AdvertiseKeysResponse(status=wire.round_status_to_proto(status))

    def GetPeerKeys(  # noqa: N802
        self, request: aggregation_pb2.GetPeerKeysRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.GetPeerKeysResponse:
        status, keys = self._agg.peer_keys(request.round_id, request.site_id)
        return aggregation_pb2.GetPeerKeysResponse(
            status=wire.round_status_to_proto(status),
            keys=[wire.signed_keys_to_proto(k, ident) for _, (k, ident) in sorted(keys.items())],
        )

    def ShareKeys(  # noqa: N802
        self, request: aggregation_pb2.ShareKeysRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.ShareKeysResponse:
        shares = wire.sealed_shares_from_proto(request.round_id, request.shares)
        status = self._agg.share(request.round_id, request.site_id, shares)
        return aggregation_pb2.ShareKeysResponse(status=wire.round_status_to_proto(status))

    def GetShares(  # noqa: N802
        self, request: aggregation_pb2.GetSharesRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.GetSharesResponse:
        status, shares = self._agg.shares_for(request.round_id, request.site_id)
        return aggregation_pb2.GetSharesResponse(
            status=wire.round_status_to_proto(status),
            ready=shares is not None,
            shares=wire.sealed_shares_to_proto(shares or ()),
        )

    def SubmitMasked(  # noqa: N802
        self, request: aggregation_pb2.SubmitMaskedRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.SubmitMaskedResponse:
        with self._agg.audited("submit_masked", request.round_id, request.site_id):
            submission = wire.masked_submission_from_proto(request)
        status = self._agg.submit(submission)
        return aggregation_pb2.SubmitMaskedResponse(status=wire.round_status_to_proto(status))

    def GetUnmaskRequest(  # noqa: N802
        self, request: aggregation_pb2.GetUnmaskRequestRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.GetUnmaskRequestResponse:
        status, unmask = self._agg.unmask_request(request.round_id, request.site_id)
        return aggregation_pb2.GetUnmaskRequestResponse(
            status=wire.round_status_to_proto(status),
            ready=unmask is not None,
            survivors=list(unmask.survivors) if unmask else [],
            dropped=list(unmask.dropped) if unmask else [],
        )

    def Unmask(  # noqa: N802
        self, request: aggregation_pb2.UnmaskRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.UnmaskResponse:
        with self._agg.audited("unmask", request.round_id, request.site_id):
            shares = wire.revealed_shares_from_proto(
                request.round_id, request.site_id, request.shares
            )
        status = self._agg.unmask(request.round_id, request.site_id, shares)
        return aggregation_pb2.UnmaskResponse(status=wire.round_status_to_proto(status))

    def GetRoundStatus(  # noqa: N802
        self, request: aggregation_pb2.GetRoundStatusRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.RoundStatus:
        return wire.round_status_to_proto(self._agg.status(request.round_id))

    def DeclineRound(  # noqa: N802
        self, request: aggregation_pb2.DeclineRoundRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.DeclineRoundResponse:
        status = self._agg.decline(request.round_id, request.site_id, request.reason)
        return aggregation_pb2.DeclineRoundResponse(status=wire.round_status_to_proto(status))

    def PublishModel(  # noqa: N802
        self, request: aggregation_pb2.PublishModelRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.PublishModelResponse:
        model_id = self._agg.publish_model(
            dataset=request.dataset,
            model=request.model,
            state=request.state,
            params=dict(request.params),
        )
        return aggregation_pb2.PublishModelResponse(model_id=model_id)

    def ReportLedger(  # noqa: N802
        self, request: aggregation_pb2.ReportLedgerRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.ReportLedgerResponse:
        mirrored = self._agg.report_ledger(wire.site_ledger_from_proto(request.ledger))
        return aggregation_pb2.ReportLedgerResponse(
            epsilon_spent=mirrored.epsilon_spent, events=len(mirrored.events)
        )

    def GetModel(  # noqa: N802
        self, request: aggregation_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.GetModelResponse:
        stored, state = self._agg.get_model(request.model_id)
        return aggregation_pb2.GetModelResponse(
            model_id=stored.model_id,
            dataset=stored.dataset,
            model=stored.model,
            state=state,
            params=dict(stored.params),
        )

    def FinishJob(  # noqa: N802
        self, request: aggregation_pb2.FinishJobRequest, context: grpc.ServicerContext
    ) -> aggregation_pb2.FinishJobResponse:
        job = self._jobs.finish(
            request.job_id,
            release_id=request.release_id,
            reason=request.reason,
            refused=request.refused,
        )
        return aggregation_pb2.FinishJobResponse(state=job.state.value)


class QueryServicer(query_pb2_grpc.QueryServicer):
    """The analysts' Query service.

    Encoded answers are kept, bounded (least recently used go first): a release's by its
    id, since a stored release never changes, and a listing's by its limit, kind and the
    store's release version, which :meth:`server.query_handler.QueryHandler.release_listing`
    checks on every call (so a new release, saved by any process, shows at once). A kept
    message is shared by every call that answers it and is never mutated.

    Parameters
    ----------
    cached_releases, cached_listings
        How many encoded releases and listings to keep; 0 keeps none.
    """

    def __init__(
        self,
        handler: QueryHandler,
        jobs: JobQueue,
        access: AccessControl | None = None,
        *,
        cached_releases: int = 512,
        cached_listings: int = 64,
    ) -> None:
        self._handler = handler
        self._jobs = jobs
        self._access = access
        self._releases: LruCache[str, query_pb2.Release] = LruCache(cached_releases)
        self._listings: LruCache[tuple[int, int, str], query_pb2.ListReleasesResponse] = LruCache(
            cached_listings
        )

    def ListReleases(  # noqa: N802
        self, request: query_pb2.ListReleasesRequest, context: grpc.ServicerContext
    ) -> query_pb2.ListReleasesResponse:
        listing = self._handler.release_listing(limit=request.limit, kind=request.kind)
        return self._listings.get_or_compute(
            (listing.version, listing.limit, listing.kind),
            lambda: query_pb2.ListReleasesResponse(
                releases=[wire.release_summary_to_proto(s) for s in listing.summaries]
            ),
        )

    def GetRelease(  # noqa: N802
        self, request: query_pb2.GetReleaseRequest, context: grpc.ServicerContext
    ) -> query_pb2.Release:
        release_id = request.release_id
        return self._releases.get_or_compute(
            release_id, lambda: wire.release_to_proto(self._handler.get_release(release_id))
        )

    def ListBudgets(  # noqa: N802
        self, request: query_pb2.ListBudgetsRequest, context: grpc.ServicerContext
    ) -> query_pb2.ListBudgetsResponse:
        ledgers = self._handler.list_budgets(
            site_id=request.site_id, reserved=self._jobs.reserved_epsilon()
        )
        return query_pb2.ListBudgetsResponse(
            ledgers=[wire.site_ledger_to_proto(ledger) for ledger in ledgers]
        )

    def ExplainInput(  # noqa: N802
        self, request: query_pb2.ExplainInputRequest, context: grpc.ServicerContext
    ) -> query_pb2.ExplainInputResponse:
        record, model_id, top = wire.explain_input_request_from_proto(request)
        explanation = self._handler.explain_input(record, model_id=model_id, top=top)
        return wire.input_explanation_to_proto(explanation)

    def SubmitJob(  # noqa: N802
        self, request: query_pb2.SubmitJobRequest, context: grpc.ServicerContext
    ) -> query_pb2.Job:
        principal = current_principal.get()
        who = f"{principal.name} ({principal.token_id})" if principal else "anonymous"
        allowance = (
            self._access.allowance(principal.token_id)
            if principal is not None and self._access is not None
            else None
        )
        job = self._jobs.submit(
            wire.job_request_from_proto(request), submitted_by=who, allowance=allowance
        )
        return wire.job_to_proto(job)

    def GetJob(  # noqa: N802
        self, request: query_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> query_pb2.Job:
        return wire.job_to_proto(self._jobs.get(request.job_id))

    def ListJobs(  # noqa: N802
        self, request: query_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> query_pb2.ListJobsResponse:
        jobs = self._jobs.list_jobs(limit=request.limit, state=request.state)
        return query_pb2.ListJobsResponse(jobs=[wire.job_to_proto(j) for j in jobs])


@dataclass
class RunningServer:
    """A started server, the port it bound (useful with port 0) and whether it uses TLS."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    tls: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


SERVICE_NAMES = (
    aggregation_pb2.DESCRIPTOR.services_by_name["Aggregation"].full_name,
    query_pb2.DESCRIPTOR.services_by_name["Query"].full_name,
)


def serve(
    aggregator: Aggregator,
    query: QueryHandler,
    *,
    address: str = "127.0.0.1:0",
    max_workers: int = 8,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    access: AccessControl | None = None,
    jobs: JobQueue | None = None,
) -> RunningServer:
    """Start the gRPC server on ``address`` (port 0 picks a free port) and return it.

    With ``tls_cert`` (PEM certificate chain, the server's first) and ``tls_key`` (its
    PEM private key) the port speaks TLS only; clients need the CA that signed the chain
    (:func:`fedlens.channels.open_channel`). Without them it is plaintext: bind it to
    loopback or a trusted network.

    With ``access`` every call is checked against its tokens and roles
    (:mod:`server.access`); without it every call is open, as for a test harness.

    ``jobs`` is the analysts' job queue (:mod:`server.jobs`); by default one on the
    aggregator's store.

    Raises
    ------
    ConfigurationError
        Only one of ``tls_cert`` and ``tls_key`` is given, either cannot be read or they
        do not match, or ``address`` cannot be bound.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigurationError("TLS needs both a certificate chain and its private key")
    credentials = (
        None if tls_cert is None or tls_key is None else server_credentials(tls_cert, tls_key)
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fedlens-grpc"),
        interceptors=[
            ErrorMappingInterceptor(),
            *([AccessInterceptor(access)] if access is not None else []),
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Without BDP probing the HTTP/2 windows stay small, so requests waiting for
            # a worker hold little memory: the aggregator's memory follows the number of
            # workers and the vector length, not the number of sites sending at once.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    jobs = jobs if jobs is not None else JobQueue(aggregator)
    aggregation_pb2_grpc.add_AggregationServicer_to_server(
        AggregationServicer(aggregator, jobs), server
    )
    query_pb2_grpc.add_QueryServicer_to_server(QueryServicer(query, jobs, access), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*SERVICE_NAMES, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise ConfigurationError(f"cannot bind the gRPC server to {address!r}")
    server.start()
    logger.info(
        "fedlens gRPC server listening on port %d (%s)", port, "TLS" if credentials else "plaintext"
    )
    return RunningServer(
        server=server, port=port, health=health_servicer, tls=credentials is not None
    )
