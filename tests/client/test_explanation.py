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
