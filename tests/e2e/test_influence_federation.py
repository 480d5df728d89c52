"""Influence end to end with the real Flower runtime (slow: ``make test-slow``).

Four hospitals of ``synthetic_hospitals`` train with DP-SGD; the ServerApp then runs a
``hessian`` round and a ``self_influence`` round broken down by site (every site's
policy allows it). The hospital whose labels were flipped at random holds the largest
share of records with high self-influence, and its operator's ``fedlens client review``
uses the released factors and lists mostly flipped records first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.review import review_site
from fedlens.datasets import load_dataset
from fedlens.runconfig import RunConfig
from server.aggregation import Aggregator, QueryHandler
from server.deployment import LocalFederation, SiteSpec
from server.grpc_server import serve
from server.storage import Store


@pytest.mark.slow
def test_self_influence_by_site_points_at_the_flipped_hospital(tmp_path: Path) -> None:
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
                "site-breakdown": True,
            },
        )
        for i in range(4)
    ]
    run = RunConfig.model_validate(
        {
            "dataset": "synthetic_hospitals",
            "partition": "natural",
            "num-sites": 4,
            "num-server-rounds": 3,
            "local-epochs": 5,
            "batch-size": 128,
            "train-epsilon": 6.0,
            "explain-kind": "self_influence",
            "explain-epsilon": 1.5,
            "influence-group-by": "site",
            "aggregator": server.address,
            "out-dir": str(tmp_path / "out"),
            "phase-timeout": 60.0,
        }
    )
    assert run.releases == 2
    try:
        with LocalFederation(tmp_path / "flower", sites) as federation:
            outcome = federation.run(run.to_flower(), timeout_s=900)
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert outcome.completed, (outcome, summary)
        assert [r["phase"] for r in summary["rounds"]] == ["complete", "complete"], summary
        factors = store.get_release(summary["rounds"][0]["release_id"])
        release = store.get_release(summary["release_id"])
    finally:
        server.stop()
        store.close()
    assert factors.kind == "hessian" and release.kind == "self_influence"
    assert release.params["second_order_release"] == factors.release_id
    shares = {v.name.split("/")[0]: v for v in release.grouped}
    flipped = f"site-{truth.flipped_site}"
    others = [v.value for name, v in shares.items() if name not in (flipped, "(withheld)")]
    assert shares[flipped].value > max(others), shares
    # Locally, the flipped hospital's operator sees its flips first, scored with the
    # factors the federation released for the final model.
    review = review_site(tmp_path / flipped, top=20)
    assert review.curvature == "released"
    listed = np.array([row["row"] for row in review.rows])
    assert np.isin(listed, truth.flipped_indices).mean() >= 0.6  # base rate 0.25
