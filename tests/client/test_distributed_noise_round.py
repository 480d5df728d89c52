"""Distributed noise end to end: sites add discrete Gaussian shares inside secure
aggregation over real gRPC, one dies before submitting, and the release, the ledgers and
the declared noise agree with the calibration."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.explanation import ExplainRequest, contribute_explanation
from client.ledger_store import LedgerStore
from client.secagg_client import AggregationClient
from explain import l2_sensitivity
from explain.global_attribution import attribution_params
from fedlens.datasets import load_dataset
from fedlens.models import build_model
from fedlens.types import RoundPhase, RoundSpec
from privacy import (
    SecureRandom,
    calibrate_shares,
    discrete_gaussian_noise_multiplier,
    encoded_sensitivity,
    epsilon_of_discrete_gaussian,
)
from server.aggregation import Aggregator, QueryHandler
from server.grpc_server import serve
from server.storage import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SITES = ("a", "b", "c", "d")
EPSILON, DELTA = 1.0, 1e-6


class _DiesBeforeSubmitting(AggregationClient):
    """A site whose process dies after it has spent, before its vector leaves."""

    def call(self, method: Any, request: Any) -> Any:
        if method == self.stub.SubmitMasked:
            raise RuntimeError("site process died")
        return super().call(method, request)


def test_distributed_noise_release_survives_a_dropout(tmp_path: Path) -> None:
    pre = load_dataset("synthetic_hospitals").preprocessor
    params = attribution_params(pre, method="feature_ablation")
    spec = RoundSpec(
        round_id="dist-r",
        kind="global_attribution",
        site_ids=SITES,
        length=pre.dimension + 1,
        bits=48,
        scale=1e5,
        clip_bound=0.5,
        labels=pre.encoded_names,
        phase_timeout_s=10.0,
        params=params,
        threshold=3,
        noise="distributed",
        colluding=1,
    )
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    aggregator = Aggregator(store)
    running = serve(aggregator, QueryHandler(store))
    rng = np.random.default_rng(0)
    features = {s: rng.random((120, pre.dimension)).astype(np.float32) for s in SITES}
    model = build_model("logistic", pre.dimension, seed=0)
    stores = {s: LedgerStore(tmp_path / f"ledger-{s}.sqlite") for s in SITES}
    ledgers = {s: stores[s].load(8.0, 1e-5) for s in SITES}
    outcomes: dict[str, object] = {}
    try:
        aggregator.open_round(spec)
        explain = ExplainRequest(
            round_id=spec.round_id,
            kind=spec.kind,
            site_ids=SITES,
            aggregator=running.address,
            epsilon=EPSILON,
            delta=DELTA,
            clip_bound=spec.clip_bound,
            bits=spec.bits,
            scale=spec.scale,
            timeout_s=20.0,
            params=spec.params,
            threshold=3,
            noise="distributed",
            colluding=1,
        )

        def run(site: str) -> None:
            connect = _DiesBeforeSubmitting if site == "d" else AggregationClient
            try:
                outcomes[site] = contribute_explanation(
                    explain,
                    site_id=site,
                    model=model,
                    features=features[site],
                    labels=np.zeros(120, dtype=np.int64),
                    ledger=ledgers[site],
                    store=stores[site],
                    rng=SecureRandom(),
                    now=NOW,
                    connect=connect,
                )
            except Exception as exc:  # asserted on below
                outcomes[site] = exc

        threads = [threading.Thread(target=run, args=(s,)) for s in SITES]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        status = aggregator.status(spec.round_id)
        release = store.get_release(status.release_id) if status.release_id else None
    finally:
        running.stop(grace=None)
    assert isinstance(outcomes["d"], RuntimeError)
    assert status.phase is RoundPhase.COMPLETE, status.reason
    assert set(status.submitted) == {"a", "b", "c"}
    assert release is not None

    # Each honest share is sized for threshold - colluding = 2 sites.
    target_z = discrete_gaussian_noise_multiplier(EPSILON, DELTA)
    calibration = calibrate_shares(
        noise_multiplier=target_z,
        sensitivity=encoded_sensitivity(l2_sensitivity(0.5), 1e5, spec.length),
        dimension=spec.length,
        threshold=3,
        colluding=1,
    )
    assert calibration.min_honest == 2
    for site in SITES:  # d spent too: it died after recording its release
        (event,) = stores[site].history()
        assert event["kind"] == "discrete_gaussian"
        assert event["noise_multiplier"] == pytest.approx(calibration.effective_noise_multiplier)
        assert event["noise_multiplier"] == pytest.approx(target_z, rel=1e-6)
    for cost in release.costs:
        assert cost.epsilon == pytest.approx(
            epsilon_of_discrete_gaussian(calibration.effective_noise_multiplier, DELTA)
        )
    # Three shares are in the sum: its noise std, per count, as the release declares it.
    share_std = calibration.share_sigma / 1e5
    assert release.values[0].noise_std == pytest.approx(
        math.sqrt(3) * share_std / release.noised_count, rel=1e-6
    )
    assert math.sqrt(3) * share_std >= target_z * l2_sensitivity(0.5)
    # The three submitters' 360 records, within five standard deviations of the noise on
    # the count, whose coordinate carries clip_bound per record.
    count_std = math.sqrt(3) * share_std / spec.clip_bound
    assert abs(release.noised_count - 360) <= 5 * count_std
