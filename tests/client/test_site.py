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
from privacy import LedgerEvent

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


def test_a_run_that_cannot_fit_the_budget_is_refused_before_any_work(tmp_path: Path) -> None:
    s = site(tmp_path, 1.5)
    with pytest.raises(ConfigurationError, match=r"plan does not fit the site budget ε = 1.5"):
        s.train(initial_state(), 1, now=NOW)  # type: ignore[arg-type]
    assert LedgerStore(tmp_path / "ledger.sqlite").history() == []


def test_a_run_the_rest_of_the_budget_cannot_pay_is_refused_recording_nothing(
    tmp_path: Path,
) -> None:
    s = site(tmp_path, 3.0)
    for server_round in (1, 2):
        s.train(initial_state(), server_round, now=NOW)  # type: ignore[arg-type]
    before = LedgerStore(tmp_path / "ledger.sqlite").history()
    assert len(before) == 2
    # A second run fits an empty ledger but not this one: refused at its first round.
    with pytest.raises(BudgetExceededError, match=r"this run .* would bring it to"):
        s.train(initial_state(), 1, now=NOW)  # type: ignore[arg-type]
    assert LedgerStore(tmp_path / "ledger.sqlite").history() == before


def test_a_round_whose_event_no_longer_fits_is_refused_recording_nothing(tmp_path: Path) -> None:
    s = site(tmp_path, 3.0)
    s.train(initial_state(), 1, now=NOW)  # type: ignore[arg-type]
    # Another process of the site spent most of what was left meanwhile.
    store = LedgerStore(tmp_path / "ledger.sqlite")
    store.spend(LedgerEvent(kind="gaussian", noise_multiplier=1.7, created_at=NOW), 3.0, 1e-5)
    before = store.history()
    with pytest.raises(BudgetExceededError, match="training round 2"):
        s.train(initial_state(), 2, now=NOW)  # type: ignore[arg-type]
    assert store.history() == before


def test_delta_must_be_below_one_over_the_records(tmp_path: Path) -> None:
    config = SiteConfig.from_flower(
        {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path), "delta": 8e-3}
    )
    with pytest.raises(ConfigurationError, match=r"delta must be in \(0, 1/records\)"):
        Site(RUN, config).train(initial_state(), 1, now=NOW)  # type: ignore[arg-type]
    assert LedgerStore(tmp_path / "ledger.sqlite").history() == []


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
