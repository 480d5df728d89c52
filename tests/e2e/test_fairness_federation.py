"""A fairness release end to end with the real Flower runtime (slow: ``make test-slow``).

Four hospitals of ``synthetic_hospitals`` train with DP-SGD, then release DP confusion
counts per group through secure aggregation; the planted label bias against group B
shows as a gap whose noise interval excludes zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlens.datasets import load_dataset
from fedlens.runconfig import RunConfig
from fedlens.types import RoundPhase
from server.aggregation import Aggregator, QueryHandler
from server.deployment import LocalFederation, SiteSpec
from server.grpc_server import serve
from server.storage import Store


@pytest.mark.slow
def test_fairness_release_shows_the_planted_bias(tmp_path: Path) -> None:
    truth = load_dataset("synthetic_hospitals").truth
    assert truth is not None
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    server = serve(Aggregator(store), QueryHandler(store))
    sites = [
        SiteSpec(
            name=f"site-{i}",
            node_config={
                "partition-id": i,
                "num-partitions": 4,
                "state-dir": str(tmp_path / f"site-{i}"),
                "epsilon": 10.0,
                "delta": 1e-5,
                "threads": 1,
            },
        )
        for i in range(4)
    ]
    run = RunConfig(
        dataset="synthetic_hospitals",
        partition="natural",
        num_sites=4,
        rounds=3,
        local_epochs=5,
        batch_size=128,
        train_epsilon=6.0,
        explain_kind="fairness",
        explain_epsilon=3.0,
        aggregator=server.address,
        out_dir=str(tmp_path / "out"),
        phase_timeout_s=60.0,
    )
    try:
        with LocalFederation(tmp_path / "flower", sites) as federation:
            outcome = federation.run(run.to_flower(), timeout_s=900)
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert outcome.completed, (outcome, summary)
        assert summary["phase"] == RoundPhase.COMPLETE.value
        release = store.get_release(summary["release_id"])
    finally:
        server.stop()
        store.close()
    values = {v.name: v for v in release.values}
    attribute, biased = truth.sensitive_attribute, truth.biased_group
    tpr = {g: values[f"{attribute}={g}:tpr"] for g in ("A", "B")}
    other = "A" if biased == "B" else "B"
    # Half of group B's true positives were relabelled negative in training: the model
    # learns to under-predict B, so B's TPR measured against the same labels differs.
    gap = values[f"gap:equalised_odds:{attribute}"]
    assert gap.value - 1.96 * gap.noise_std > 0, (gap, tpr)
    assert tpr[biased].value != pytest.approx(tpr[other].value)
    assert sorted(c.site_id for c in release.costs) == [f"site-{i}" for i in range(4)]
