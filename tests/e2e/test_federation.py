"""End to end with the real Flower runtime: SuperLink, SuperNodes, ClientApp processes,
DP-SGD, Integrated Gradients, masked aggregation over gRPC, stored release.

The aggregator is started by the test so that it can keep what it received and check
that no site's vector ever arrived unmasked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from client.ledger_store import LedgerStore
from fedlens.datasets import load_dataset
from fedlens.runconfig import RunConfig
from fedlens.types import MaskedSubmission, RoundPhase, RoundStatus
from privacy import FixedPointCodec
from server.aggregation import Aggregator, QueryHandler
from server.deployment import LocalFederation, SiteSpec
from server.grpc_server import serve
from server.round_specs import MAX_RECORDS_PER_SITE
from server.storage import Store


class RecordingAggregator(Aggregator):
    """An aggregator that also keeps every masked vector it was sent."""

    received: list[MaskedSubmission]

    def submit(self, sub: MaskedSubmission) -> RoundStatus:
        self.received.append(sub)
        return super().submit(sub)


def test_synthetic_hospitals_release_ranks_the_planted_features(tmp_path: Path) -> None:
    dataset = load_dataset("synthetic_hospitals")
    truth = dataset.truth
    assert truth is not None
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    aggregator = RecordingAggregator(store)
    aggregator.received = []
    server = serve(aggregator, QueryHandler(store))
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
        learning_rate=2.0,
        train_epsilon=6.0,
        explain_epsilon=3.0,
        aggregator=server.address,
        out_dir=str(tmp_path / "out"),
        phase_timeout_s=60.0,
    )
    try:
        with LocalFederation(tmp_path / "flower", sites) as federation:
            outcome = federation.run(run.to_flower(), timeout_s=600)
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert outcome.completed, (outcome, summary)
        assert summary["phase"] == RoundPhase.COMPLETE.value
        release = store.get_release(summary["release_id"])
    finally:
        server.stop()

    # The planted truth: every informative feature outranks every irrelevant one.
    ranking = [v.name for v in release.grouped]
    worst_informative = max(ranking.index(f) for f in truth.informative)
    best_irrelevant = min(ranking.index(f) for f in truth.irrelevant)
    assert worst_informative < best_irrelevant, ranking
    # The privacy noise is small next to the signal at this budget.
    top = release.grouped[0]
    assert abs(top.value) > 10 * top.noise_std

    # Every site paid for the release and stayed within its budget.
    assert sorted(c.site_id for c in release.costs) == [f"site-{i}" for i in range(4)]
    assert all(c.epsilon_total <= 10.0 for c in release.costs)
    assert summary["accuracy"] > 0.6

    # What reached the aggregator is masked: decoded, its coordinates are spread over the
    # whole field, far outside anything a real contribution (|v| <= records * clip) holds.
    assert len(aggregator.received) == 4
    spec_bits = {s.values.dtype for s in aggregator.received}
    assert spec_bits == {np.dtype(np.uint64)}
    codec = FixedPointCodec.choose(
        num_sites=4, max_abs=MAX_RECORDS_PER_SITE * run.attribution_clip, precision=1e-5
    )
    plausible = 2_000 * run.attribution_clip + 1_000  # 1,500 records per hospital, plus noise
    for sub in aggregator.received:
        decoded = codec.decode(sub.values)
        assert np.mean(np.abs(decoded) <= plausible) < 0.05

    # The trained model reached the coordinator, for analysts' own inputs.
    assert store.get_model(summary["model_id"]).dataset == "synthetic_hospitals"
    # The coordinator mirrors every site's ledger exactly: three training rounds, one release.
    mirrored = {m.site_id: m for m in QueryHandler(store).list_budgets()}
    assert sorted(mirrored) == [f"site-{i}" for i in range(4)]
    for i in range(4):
        own = LedgerStore(tmp_path / f"site-{i}" / "ledger.sqlite").read()
        assert mirrored[f"site-{i}"].events == own.events
        assert [e.kind for e in own.events] == ["dpsgd"] * 3 + ["gaussian"]
        assert mirrored[f"site-{i}"].epsilon_spent == own.epsilon_spent()
    # And nothing stored by the aggregator holds a masked or unmasked vector.
    dumped = json.dumps(store.dump(), default=str)
    for sub in aggregator.received:
        assert str(int(sub.values[0])) not in dumped
    store.close()
