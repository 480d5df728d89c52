"""The site refuses an explanation its budget cannot pay, before computing or sending."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from client.explanation import ExplainRequest, contribute_explanation
from client.ledger_store import LedgerStore
from client.secagg_client import AggregationClient
from fedlens.errors import BudgetExceededError, ConfigurationError
from fedlens.models import build_model
from privacy import SeededRandom

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def request(epsilon: float) -> ExplainRequest:
    return ExplainRequest(
        round_id="r",
        kind="global_attribution",
        site_ids=("a", "b"),
        aggregator="127.0.0.1:1",
        epsilon=epsilon,
        delta=1e-6,
        clip_bound=0.5,
        bits=40,
        scale=1e5,
        timeout_s=1.0,
    )


def unreachable(address: str) -> AggregationClient:
    # A port nothing listens on: the site's decline cannot be delivered, and must not
    # hide the refusal itself.
    return AggregationClient("127.0.0.1:1", call_timeout_s=2.0)


def test_release_past_the_budget_is_refused_before_any_work(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite")
    ledger = store.load(1.0, 1e-5)
    with pytest.raises(BudgetExceededError, match="budget"):
        contribute_explanation(
            request(epsilon=2.0),
            site_id="a",
            model=build_model("logistic", 3),
            features=np.zeros((5, 3), dtype=np.float32),
            labels=np.zeros(5, dtype=np.int64),
            ledger=ledger,
            store=store,
            rng=SeededRandom(0),
            now=NOW,
            connect=unreachable,
        )
    assert store.history() == []
    assert ledger.epsilon_spent() == 0.0


def test_a_site_outside_the_round_is_refused(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite")
    with pytest.raises(ConfigurationError, match="not among the round's sites"):
        contribute_explanation(
            request(epsilon=0.5),
            site_id="z",
            model=build_model("logistic", 3),
            features=np.zeros((5, 3), dtype=np.float32),
            labels=np.zeros(5, dtype=np.int64),
            ledger=store.load(1.0, 1e-5),
            store=store,
            rng=SeededRandom(0),
            now=NOW,
            connect=unreachable,
        )


def test_two_writers_of_one_ledger_cannot_overspend_together(tmp_path: Path) -> None:
    from privacy import LedgerEvent, gaussian_noise_multiplier

    path = tmp_path / "ledger.sqlite"
    first, second = LedgerStore(path), LedgerStore(path)
    first.load(1.0, 1e-5)  # a process that loaded before the other one spent
    event = LedgerEvent(
        kind="gaussian", noise_multiplier=gaussian_noise_multiplier(0.8, 1e-5), created_at=NOW
    )
    second.spend(event, 1.0, 1e-5)
    with pytest.raises(BudgetExceededError):
        first.spend(event, 1.0, 1e-5)
    assert len(first.history()) == 1


def test_a_site_whose_cohort_is_too_small_declines_before_advertising_and_nobody_spends(
    tmp_path: Path,
) -> None:
    import threading
    import time

    from explain.global_attribution import attribution_params
    from fedlens.datasets import load_dataset
    from fedlens.errors import ExplanationError, ProtocolError
    from fedlens.types import RoundPhase, RoundSpec
    from server.aggregation import Aggregator, QueryHandler
    from server.grpc_server import serve
    from server.storage import Store

    pre = load_dataset("synthetic_hospitals").preprocessor
    group_b = pre.encoded_names.index("group=B")
    rng = np.random.default_rng(0)
    big = rng.random((200, pre.dimension)).astype(np.float32)
    big[:, group_b] = 1.0
    small = big[:20].copy()  # 20 records in the cohort, below the minimum of 50
    params = attribution_params(pre, method="feature_ablation", cohort={"group": ["B"]})
    spec = RoundSpec(
        round_id="cohort-r",
        kind="global_attribution",
        site_ids=("a", "b"),
        length=pre.dimension + 1,
        bits=48,
        scale=1e5,
        clip_bound=0.5,
        labels=pre.encoded_names,
        phase_timeout_s=30.0,
        params=params,
    )
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    aggregator = Aggregator(store)
    running = serve(aggregator, QueryHandler(store))
    try:
        aggregator.open_round(spec)
        explain = ExplainRequest(
            round_id=spec.round_id,
            kind=spec.kind,
            site_ids=spec.site_ids,
            aggregator=running.address,
            epsilon=0.5,
            delta=1e-6,
            clip_bound=spec.clip_bound,
            bits=spec.bits,
            scale=spec.scale,
            timeout_s=20.0,
            params=spec.params,
        )
        stores = {s: LedgerStore(tmp_path / f"ledger-{s}.sqlite") for s in spec.site_ids}
        ledgers = {s: stores[s].load(5.0, 1e-5) for s in spec.site_ids}
        model = build_model("logistic", pre.dimension, seed=0)

        def run(site: str, features: np.ndarray) -> None:
            contribute_explanation(
                explain,
                site_id=site,
                model=model,
                features=features,
                labels=np.zeros(len(features), dtype=np.int64),
                ledger=ledgers[site],
                store=stores[site],
                rng=SeededRandom(1),
                now=NOW,
            )

        failures: list[BaseException] = []

        def site_b() -> None:
            try:
                run("b", big)
            except BaseException as exc:  # asserted on below
                failures.append(exc)

        # Site b joins first and waits for its peer; site a then refuses.
        thread = threading.Thread(target=site_b)
        thread.start()
        for _ in range(200):
            if aggregator.status(spec.round_id).advertised == ("b",):
                break
            time.sleep(0.05)
        with pytest.raises(ExplanationError, match="fewer than 50 records") as refused:
            run("a", small)
        assert "20" not in str(refused.value)  # the refusal does not reveal the count
        thread.join(30)
        status = aggregator.status(spec.round_id)
    finally:
        running.stop(grace=None)
        store.close()
    assert status.phase is RoundPhase.ABORTED
    assert status.advertised == ("b",)  # site a never advertised a key
    assert "site a declined" in status.reason
    assert len(failures) == 1 and isinstance(failures[0], ProtocolError)
    for site in spec.site_ids:
        assert stores[site].history() == []
        assert ledgers[site].epsilon_spent() == 0.0
