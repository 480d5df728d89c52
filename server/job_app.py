"""The ServerApp's explain-only runs: an analyst's job (:mod:`server.jobs`).

With ``job-id`` in the run configuration, the ServerApp trains nothing. It fetches the
stored global model the job was priced against (``GetModel``), takes as the round's
sites those whose ledgers the coordinator mirrors (``ListBudgets``), runs the
explanation round — after the second-order round(s) for an influence kind, as a training
run would — and reports the outcome with ``FinishJob``: the release, or why there is
none. Everything it sends the sites is public (the global model, released factors).
"""

from __future__ import annotations

import io
import logging

import grpc
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedlens.datasets import load_dataset
from fedlens.models import build_model
from fedlens.query_client import QueryClient
from fedlens.runconfig import INFLUENCE_KINDS, RunConfig
from fedlens.settings import Settings
from fedlens.types import RoundPhase, RoundStatus
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc
from server.influence_rounds import run_influence

__all__ = ["run_job"]

logger = logging.getLogger(__name__)


def run_job(grid: Grid, run: RunConfig) -> RoundStatus:
    """Run job ``run.job_id`` over the connected sites and report its outcome.

    Returns the last round's status. Any error is reported as the job's failure first,
    then raised, so that the Flower run fails too.
    """
    from server.flower_app import coordinator_metadata  # flower_app imports this module

    metadata = coordinator_metadata()
    with grpc.insecure_channel(run.aggregator) as channel:
        stub = aggregation_pb2_grpc.AggregationStub(channel)
        try:
            status = _explain(grid, run, stub, metadata)
        except Exception as exc:
            _finish(stub, metadata, run.job_id, reason=f"{type(exc).__name__}: {exc}")
            raise
        if status.phase is RoundPhase.COMPLETE:
            _finish(stub, metadata, run.job_id, release_id=status.release_id)
        else:
            refused = status.reason.startswith("refused") or not status.round_id
            _finish(stub, metadata, run.job_id, reason=status.reason, refused=refused)
        return status


def _explain(
    grid: Grid,
    run: RunConfig,
    stub: aggregation_pb2_grpc.AggregationStub,
    metadata: tuple[tuple[str, str], ...],
) -> RoundStatus:
    from server.flower_app import SiteLog, _wait_for_nodes, run_explanation_round

    stored = stub.GetModel(
        aggregation_pb2.GetModelRequest(model_id=run.job_model_id), timeout=60, metadata=metadata
    )
    dataset = load_dataset(stored.dataset, seed=run.seed)
    model = build_model(stored.model, dataset.preprocessor.dimension)
    model.load_state_dict(torch.load(io.BytesIO(stored.state), weights_only=True))
    with QueryClient(run.aggregator, timeout_s=60, token=Settings().token_value) as client:
        sites = sorted(ledger.site_id for ledger in client.list_budgets())
    nodes = _wait_for_nodes(grid, len(sites), run.phase_timeout_s)
    # Every site receives the whole list and finds itself in it; which node is which is
    # learnt from the replies.
    log = SiteLog(names=dict(zip(nodes, sites, strict=True)))
    arrays = ArrayRecord(model.state_dict())
    logger.info(
        "job %s: %s over %d sites with model %s",
        run.job_id,
        run.explain_kind,
        len(sites),
        stored.model_id,
    )
    if run.explain_kind not in INFLUENCE_KINDS:
        return run_explanation_round(grid, run, arrays, nodes, log)
    statuses = run_influence(
        run,
        dataset,
        model,
        sites,
        [],
        lambda r, extra, public: run_explanation_round(grid, r, arrays, nodes, log, extra, public),
    )
    return statuses[-1]


def _finish(
    stub: aggregation_pb2_grpc.AggregationStub,
    metadata: tuple[tuple[str, str], ...],
    job_id: str,
    *,
    release_id: str = "",
    reason: str = "",
    refused: bool = False,
) -> None:
    request = aggregation_pb2.FinishJobRequest(
        job_id=job_id, release_id=release_id, reason=reason[:2000], refused=refused
    )
    try:
        stub.FinishJob(request, timeout=30, metadata=metadata)
    except grpc.RpcError as exc:
        logger.warning("coordinator refused the outcome of job %s: %s", job_id, exc.details())
