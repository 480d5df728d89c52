"""ServerApp: wait for every SuperNode, then run one round of Flower's SecAgg+.

The round is Flower's legacy ``DefaultWorkflow`` with ``SecAggPlusWorkflow`` as its fit
workflow and a legacy ``FedAvg`` that samples every site (Flower's documented way to use
SecAgg+). The workflow is subclassed only to time its four stages; the protocol is
Flower's, unchanged. ``out-dir/result.json`` receives the timings (wall clock for the
start-up marks, ``perf_counter`` for durations) and ``out-dir/aggregate.npy`` the vector
the workflow left as the global model: the SecAgg+ weighted mean over the surviving sites,
shape ``(dim,)``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp

from .vectors import WEIGHT

__all__ = ["TimedSecAggPlusWorkflow", "app"]

logger = logging.getLogger(__name__)

app = ServerApp()


class TimedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, recording each stage's seconds and the round's counts."""

    def __init__(self, num_shares: int, reconstruction_threshold: int) -> None:
        super().__init__(num_shares, reconstruction_threshold, max_weight=float(WEIGHT))
        self.stage_s: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.completed = False

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        start = time.perf_counter()
        ok = super().setup_stage(grid, context, state)
        self.stage_s["setup"] = time.perf_counter() - start
        self.counts.update(
            sampled=len(state.sampled_node_ids),
            num_shares=state.num_shares,
            threshold=state.threshold,
        )
        return ok

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        start = time.perf_counter()
        ok = super().share_keys_stage(grid, context, state)
        self.stage_s["share_keys"] = time.perf_counter() - start
        return ok

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        start = time.perf_counter()
        ok = super().collect_masked_vectors_stage(grid, context, state)
        self.stage_s["collect_masked_vectors"] = time.perf_counter() - start
        self.counts["survivors"] = len(state.active_node_ids)
        return ok

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        start = time.perf_counter()
        ok = super().unmask_stage(grid, context, state)
        self.stage_s["unmask"] = time.perf_counter() - start
        self.completed = ok
        return ok


def _wait_for_nodes(grid: Grid, sites: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        seen = len(list(grid.get_node_ids()))
        if seen >= sites or time.monotonic() >= deadline:
            return seen
        time.sleep(0.2)


@app.main()
def main(grid: Grid, context: Context) -> None:
    entered = time.time()
    cfg = context.run_config
    sites = int(cfg["num-sites"])
    dim = int(cfg["dim"])
    out_dir = Path(str(cfg["out-dir"]))

    seen = _wait_for_nodes(grid, sites, float(cfg["node-wait"]))
    nodes_ready = time.time()
    if seen < sites:
        raise RuntimeError(f"only {seen} of {sites} SuperNodes registered")

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=sites,
        min_available_clients=sites,
        initial_parameters=ndarrays_to_parameters([np.zeros(dim, dtype=np.float32)]),
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    secagg = TimedSecAggPlusWorkflow(int(cfg["num-shares"]), int(cfg["reconstruction-threshold"]))
    round_s: list[float] = []

    def timed_fit(grid: Grid, context: Context) -> None:
        start = time.perf_counter()
        secagg(grid, context)
        round_s.append(time.perf_counter() - start)

    start = time.perf_counter()
    DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)
    workflow_s = time.perf_counter() - start

    (aggregate,) = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "aggregate.npy", np.asarray(aggregate))
    result = {
        "serverapp_entered": entered,
        "nodes_ready": nodes_ready,
        "round_s": round_s[0],
        "workflow_s": workflow_s,
        "stage_s": secagg.stage_s,
        "completed": secagg.completed,
        **secagg.counts,
    }
    # Written last and renamed into place: the benchmark waits for this file.
    partial = out_dir / "result.json.partial"
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(out_dir / "result.json")
