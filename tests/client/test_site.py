"""A site's training and message decoding, in process, with real data, Opacus and ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from client.flower_app import explain_request_from_config
from client.ledger_store import LedgerStore
from client.site import Site
from client.site_config import SiteConfig
from fedlens.datasets import load_dataset
from fedlens.errors import BudgetExceededError, ConfigurationError
from fedlens.models import build_model
from fedlens.runconfig import RunConfig

RUN = RunConfig(dataset="breast_cancer", num_sites=2, rounds=2, train_epsilon=2.0)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def site(state_dir: Path, epsilon: float) -> Site:
    config = SiteConfig.from_flower(
        {
            "partition-id": 0,
            "num-partitions": 2,
            "state-dir": str(state_dir),
            "epsilon": epsilon,
            "delta": 1e-5,
            "threads": 1,
        }
    )
    return Site(RUN, config)


def initial_state() -> dict[str, object]:
    dimension = load_dataset("breast_cancer").preprocessor.dimension
    return dict(build_model("logistic", dimension).state_dict())


def test_training_spends_within_budget_and_records_it(tmp_path: Path) -> None:
    outcome = site(tmp_path, 4.0).train(initial_state(), 1, now=NOW)  # type: ignore[arg-type]
    # One of the two planned rounds: less than the whole training budget.
    assert 0.5 < outcome.epsilon_total < 2.0
    history = LedgerStore(tmp_path / "ledger.sqlite").history()
    assert [row["kind"] for row in history] == ["dpsgd"]
    assert set(outcome.state) == {"linear.weight", "linear.bias"}


def test_training_past_the_budget_is_refused_before_any_work(tmp_path: Path) -> None:
    s = site(tmp_path, 1.5)
    first = s.train(initial_state(), 1, now=NOW)  # type: ignore[arg-type]
    assert first.epsilon_total < 1.5
    with pytest.raises(BudgetExceededError, match="budget"):
        s.train(initial_state(), 2, now=NOW)  # type: ignore[arg-type]
    assert len(LedgerStore(tmp_path / "ledger.sqlite").history()) == 1


def test_bad_node_config_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="node config epsilon"):
        site(tmp_path, -1.0)
    with pytest.raises(ConfigurationError, match="partition-id 3 must be below"):
        SiteConfig.from_flower({"partition-id": 3, "num-partitions": 2})


GOOD = {
    "round-id": "r",
    "kind": "global_attribution",
    "site-ids": '["site-0", "site-1"]',
    "aggregator": "127.0.0.1:1",
    "epsilon": 1.0,
    "delta": 1e-6,
    "clip-bound": 0.5,
    "bits": 40,
    "scale": 1e5,
    "timeout": 5.0,
    "params": "{}",
}


def test_explain_config_decodes() -> None:
    request = explain_request_from_config(ConfigRecord(GOOD))  # type: ignore[arg-type]
    assert request.site_ids == ("site-0", "site-1")
    assert request.bits == 40


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bits": "forty"}, "'bits' must be int"),
        ({"site-ids": "[not json"}, "malformed JSON"),
        ({"epsilon": -1.0}, "epsilon must be finite and > 0"),
        ({"delta": 2.0}, "delta must be in"),
    ],
)
def test_bad_explain_config_is_refused(change: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        explain_request_from_config(ConfigRecord({**GOOD, **change}))  # type: ignore[arg-type]


def test_missing_explain_key_is_named() -> None:
    cfg = {k: v for k, v in GOOD.items() if k != "scale"}
    with pytest.raises(ConfigurationError, match="lacks 'scale'"):
        explain_request_from_config(ConfigRecord(cfg))  # type: ignore[arg-type]
