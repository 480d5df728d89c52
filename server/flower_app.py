"""The fedlens Flower ServerApp: FedAvg training rounds, then one explanation round
(after a second-order round for the influence kinds, :mod:`server.influence_rounds`).
With ``job-id`` set it trains nothing and runs an analyst's job (:mod:`server.job_app`).

The explanation round: open a round at the aggregator over gRPC, send ``query.explain``
to every site with the global model and the round's parameters, and wait until the
aggregator reports the round complete (release stored) or aborted (nothing revealed).
A summary of the run goes to ``out-dir/summary.json`` when ``out-dir`` is set.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from client.training import evaluate
from fedlens import wire
from fedlens.channels import bearer_metadata
from fedlens.datasets import load_dataset
from fedlens.errors import ConfigurationError, DropoutError, FedlensError, ProtocolError
from fedlens.models import build_model
from fedlens.runconfig import INFLUENCE_KINDS, RunConfig
from fedlens.settings import Settings
from fedlens.status_codes import error_from_rpc
from fedlens.types import RoundPhase, RoundStatus, SiteLedger
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc
from server.influence_rounds import run_influence
from server.polling_grid import PollingGrid
from server.round_specs import explanation_round_spec

__all__ = ["app", "run_explanation_round"]

logger = logging.getLogger(__name__)

app = ServerApp()


@dataclass
class SiteLog:
    """What the coordinator learnt about each site from its replies (no site data)."""

    names: dict[int, str] = field(default_factory=dict)
    epsilon_total: dict[str, float] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)
    # Each site's latest ledger snapshot (JSON), forwarded to the coordinator's mirror.
    ledgers: dict[str, str] = field(default_factory=dict)

    def note_ledger(self, name: str, reply: Message) -> None:
        record = reply.content.config_records.get("ledger")
        if record is not None and isinstance(record.get("json"), str):
            self.ledgers[name] = str(record["json"])


class TrackingFedAvg(FedAvg):
    """FedAvg that also records each site's name, ε spent and refusals from the replies."""

    def __init__(self, log: SiteLog, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.log = log

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                name = self.log.names.get(node, f"node {node}")
                self.log.refusals[name] = reply.error.reason or "unknown error"
                logger.warning("%s refused round %d: %s", name, server_round, reply.error.reason)
                continue
            site = reply.content.config_records.get("site")
            name = str(site["site-name"]) if site is not None else f"node {node}"
            self.log.names[node] = name
            metrics = reply.content.metric_records.get("metrics")
            if metrics is not None and "epsilon-total" in metrics:
                self.log.epsilon_total[name] = float(metrics["epsilon-total"])  # type: ignore[arg-type]
            self.log.note_ledger(name, reply)
        return super().aggregate_train(server_round, replies)


def coordinator_metadata() -> tuple[tuple[str, str], ...]:
    """The coordinator's token (``FEDLENS_TOKEN`` in the ServerApp's environment, never in
    the run configuration, which every site receives), as call metadata."""
    return bearer_metadata(Settings().token_value)


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise DropoutError(f"only {len(nodes)} of {count} sites connected in {timeout_s:.0f}s")
        time.sleep(0.5)


def _await_round(
    stub: aggregation_pb2_grpc.AggregationStub, round_id: str, timeout_s: float
) -> RoundStatus:
    deadline = time.monotonic() + timeout_s
    request = aggregation_pb2.GetRoundStatusRequest(round_id=round_id)
    while True:
        status = wire.round_status_from_proto(stub.GetRoundStatus(request))
        if status.phase.finished or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def run_explanation_round(
    grid: Grid,
    run: RunConfig,
    arrays: ArrayRecord,
    nodes: list[int],
    log: SiteLog,
    extra_params: Mapping[str, str] | None = None,
    public: Mapping[str, np.ndarray] | None = None,
) -> RoundStatus:
    """Open a round at the aggregator, ask every site to contribute, await the release.

    ``public`` arrays (released factors, checkpoints) travel to every site beside the
    model, as the message's ``public`` record.
    """
    dataset = load_dataset(run.dataset, seed=run.seed)
    names = [log.names.get(n, f"node-{n}") for n in nodes]
    round_id = uuid.uuid4().hex
    try:
        spec = explanation_round_spec(
            run, dataset.preprocessor, names, round_id=round_id, extra_params=extra_params
        )
    except ConfigurationError as exc:
        logger.warning("explanation round not opened: %s", exc)
        return RoundStatus(
            round_id=round_id,
            phase=RoundPhase.ABORTED,
            reason=f"refused before any site was asked: {exc}",
        )
    params = dict(spec.params)
    with grpc.insecure_channel(run.aggregator) as channel:
        stub = aggregation_pb2_grpc.AggregationStub(channel)
        report_ledgers(stub, log)
        try:
            stub.OpenRound(
                aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec)),
                metadata=coordinator_metadata(),
            )
        except grpc.RpcError as exc:
            error = error_from_rpc(exc, run.aggregator)
            logger.warning("explanation round refused by the coordinator: %s", error)
            return RoundStatus(
                round_id=spec.round_id,
                phase=RoundPhase.ABORTED,
                advertised=(),
                submitted=(),
                release_id="",
                reason=f"refused before any site was asked: {error}",
            )
        logger.info("explanation round %s opened at %s", spec.round_id, run.aggregator)
        config = ConfigRecord(
            {
                "round-id": spec.round_id,
                "kind": spec.kind,
                "site-ids": json.dumps(names),
                "aggregator": run.aggregator,
                "epsilon": run.explain_epsilon,
                "delta": run.explain_delta,
                "clip-bound": run.attribution_clip,
                "bits": spec.bits,
                "scale": spec.scale,
                "timeout": run.phase_timeout_s,
                "params": json.dumps(params),
                "threshold": spec.threshold,
                "degree": spec.degree,
                "noise": spec.noise,
                "colluding": spec.colluding,
            }
        )
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            "config": config,
            "arrays": arrays,
        }
        if public:
            records["public"] = ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in public.items()}
            )
        messages = [
            Message(
                content=RecordDict(records),
                dst_node_id=node,
                message_type="query.explain",
            )
            for node in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=3 * run.phase_timeout_s))
        failed: list[str] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            name = log.names.get(node, f"node-{node}")
            if reply.has_error():
                log.refusals[name] = reply.error.reason or "unknown error"
                failed.append(f"{name}: {log.refusals[name]}")
                logger.warning("%s failed the explanation round: %s", name, reply.error.reason)
                continue
            metrics = reply.content.metric_records.get("metrics")
            if metrics is not None and "epsilon-total" in metrics:
                log.epsilon_total[name] = float(metrics["epsilon-total"])  # type: ignore[arg-type]
            log.note_ledger(name, reply)
        report_ledgers(stub, log)
        status = _await_round(stub, spec.round_id, 0 if failed else run.phase_timeout_s)
        if failed and not status.phase.finished:
            # The aggregator aborts the round at its deadline, revealing nothing; the
            # coordinator need not wait for that to report why.
            status = replace(status, phase=RoundPhase.ABORTED, reason="; ".join(failed))
        return status


def publish_model(run: RunConfig, arrays: ArrayRecord) -> str:
    """Send the trained global model to the coordinator, for analysts' own inputs.

    Returns its id, or "" if the coordinator refused it (logged; the run goes on, since
    the explanation round does not need it).
    """
    buffer = io.BytesIO()
    torch.save(arrays.to_torch_state_dict(), buffer)
    request = aggregation_pb2.PublishModelRequest(
        dataset=run.dataset,
        model=run.model,
        state=buffer.getvalue(),
        params={
            "seed": str(run.seed),
            "rounds": str(run.rounds),
            "train_epsilon": repr(run.train_epsilon),
        },
    )
    with grpc.insecure_channel(run.aggregator) as channel:
        stub = aggregation_pb2_grpc.AggregationStub(channel)
        try:
            reply = stub.PublishModel(request, timeout=60, metadata=coordinator_metadata())
        except grpc.RpcError as exc:
            logger.warning("coordinator refused the trained model: %s", exc.details())
            return ""
    logger.info("trained model stored as %s", reply.model_id)
    return str(reply.model_id)


def report_ledgers(stub: aggregation_pb2_grpc.AggregationStub, log: SiteLog) -> None:
    """Send every site's latest ledger snapshot to the coordinator's mirror.

    A snapshot the coordinator refuses (malformed, or rewriting mirrored events) is
    logged and audited there; it does not stop the run, since every site still checks
    its own ledger before it spends.
    """
    for name, snapshot in sorted(log.ledgers.items()):
        try:
            ledger = SiteLedger.from_dict(json.loads(snapshot))
            stub.ReportLedger(
                aggregation_pb2.ReportLedgerRequest(ledger=wire.site_ledger_to_proto(ledger)),
                timeout=30,
                metadata=coordinator_metadata(),
            )
        except (ValueError, FedlensError) as exc:
            logger.warning("ledger snapshot of %s is malformed: %s", name, exc)
        except grpc.RpcError as exc:
            logger.warning("coordinator refused the ledger of %s: %s", name, exc.details())


def _write_summary(run: RunConfig, summary: Mapping[str, object]) -> None:
    if run.out_dir:
        out = Path(run.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))


@app.main()
def main(grid: Grid, context: Context) -> None:
    grid = PollingGrid(grid)
    run = RunConfig.from_flower(context.run_config)
    if run.job_id:  # an analyst's job: explain the stored model, no training
        from server.job_app import run_job  # it imports this module

        run_job(grid, run)
        return
    dataset = load_dataset(run.dataset, seed=run.seed)
    test = dataset.test_data()
    model = build_model(run.model, dataset.preprocessor.dimension, seed=run.seed)
    nodes = _wait_for_nodes(grid, run.num_sites, run.phase_timeout_s)
    logger.info("%d sites connected; %d training rounds", len(nodes), run.rounds)

    history: list[dict[str, float]] = []
    # The global model after each training round: TracIn's checkpoints.
    checkpoints: list[dict[str, torch.Tensor]] = []

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        if server_round > 0:
            checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
        accuracy, loss = evaluate(model, test.features, test.labels)
        history.append({"round": server_round, "accuracy": accuracy, "loss": loss})
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    log = SiteLog()
    strategy = TrackingFedAvg(
        log,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        weighted_by_key="weight",
        min_train_nodes=run.num_sites,
        min_available_nodes=run.num_sites,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=run.rounds,
        evaluate_fn=evaluate_global,
        train_config=ConfigRecord({"learning-rate": run.learning_rate}),
    )
    trained = [n for n in nodes if n in log.names and log.names[n] not in log.refusals]
    if len(trained) < 2:
        refusals = "; ".join(f"{k}: {v}" for k, v in log.refusals.items()) or "no replies"
        _write_summary(run, {"phase": "aborted", "reason": refusals, "refusals": log.refusals})
        raise ProtocolError(f"training failed at too many sites ({refusals})")
    model_id = publish_model(run, result.arrays)
    model.load_state_dict(result.arrays.to_torch_state_dict())
    if run.explain_kind in INFLUENCE_KINDS:
        names = [log.names.get(n, f"node-{n}") for n in trained]
        statuses = run_influence(
            run,
            dataset,
            model,
            names,
            checkpoints,
            lambda r, extra, public: run_explanation_round(
                grid, r, result.arrays, trained, log, extra, public
            ),
        )
    else:
        statuses = [run_explanation_round(grid, run, result.arrays, trained, log)]
    status = statuses[-1]
    summary = {
        "accuracy": history[-1]["accuracy"] if history else None,
        "history": history,
        "round_id": status.round_id,
        "phase": status.phase.value,
        "reason": status.reason,
        "release_id": status.release_id,
        # Every round of the run, in order (a second-order round before an influence one).
        "rounds": [
            {"round_id": s.round_id, "phase": s.phase.value, "release_id": s.release_id}
            for s in statuses
        ],
        "model_id": model_id,
        "epsilon_total": log.epsilon_total,
        "refusals": log.refusals,
    }
    _write_summary(run, summary)
    if status.phase is not RoundPhase.COMPLETE:
        raise ProtocolError(
            f"explanation round {status.round_id} did not complete: {status.reason}"
        )
    logger.info("release %s stored", status.release_id)
