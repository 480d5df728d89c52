"""ExplainInput over real gRPC: a trained adult model and a feature_stats release in the store."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import torch

from fedlens.cli import main
from fedlens.errors import IntegrityError, NotFoundError
from fedlens.query_client import QueryClient
from fedlens.types import PrivacyCost, Release, RoundSpec
from fedlens.v1 import query_pb2
from tests.explain.adult_model import (
    adult_preprocessor,
    complete_records,
    feature_stats_values,
    stats_params,
    trained_state,
)
from tests.server.conftest import Coordinator

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def as_text(record: dict[str, object]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}


def save_model(coordinator: Coordinator) -> str:
    return coordinator.store.save_model(
        dataset="adult", model="logistic", state=trained_state(), now=NOW, params={"seed": 0}
    )


def save_feature_stats(coordinator: Coordinator) -> str:
    values, labels, count = feature_stats_values()
    spec = RoundSpec(
        round_id="stats-1",
        kind="feature_stats",
        site_ids=("a", "b"),
        length=len(labels) + 1,
        bits=62,
        scale=2.0**20,
        clip_bound=1.0,
        labels=labels,
        params=stats_params(adult_preprocessor()),
    )
    coordinator.store.save_round(spec, "complete", now=NOW)
    release = Release(
        release_id="stats-release",
        round_id="stats-1",
        kind="feature_stats",
        created_at=NOW.isoformat(),
        noised_count=count,
        values=values,
        grouped=(),
        costs=(PrivacyCost("a", 0.5, 1e-6, 0.5),),
        params={"dataset": "adult"},
    )
    coordinator.store.save_release(release, created_at=NOW)
    return release.release_id


def test_store_keeps_models(coordinator: Coordinator) -> None:
    with pytest.raises(NotFoundError, match="no trained model is stored yet"):
        coordinator.store.latest_model()
    first = save_model(coordinator)
    later = coordinator.store.save_model(
        dataset="adult", model="logistic", state=trained_state(), now=NOW.replace(year=2026)
    )
    latest = coordinator.store.latest_model(dataset="adult")
    assert latest.model_id == later != first
    stored = coordinator.store.get_model(first)
    assert (stored.dataset, stored.model, dict(stored.params)) == (
        "adult",
        "logistic",
        {"seed": "0"},
    )
    for name, tensor in trained_state().items():
        assert torch.equal(stored.state[name], tensor)
    with pytest.raises(NotFoundError):
        coordinator.store.get_model("nope")


def test_explains_with_the_release_baseline_and_flips(coordinator: Coordinator) -> None:
    model_id = save_model(coordinator)
    release_id = save_feature_stats(coordinator)

    with QueryClient(coordinator.running.address) as client:
        for record in complete_records(4):
            result = client.explain_input(as_text(record))
            assert result.model_id == model_id
            assert result.baseline == f"feature_stats release {release_id}"
            assert result.method == "integrated_gradients"
            assert len(result.attributions) == len(adult_preprocessor().schema.names)
            assert result.card.startswith(
                f"The model predicts {result.predicted_label} with probability "
                f"{result.probability:.2f}."
            )
            assert 0.5 <= result.probability <= 1.0
            if not result.changes:
                assert result.counterfactual_note.startswith("no counterfactual found")
                continue
            assert {c.feature for c in result.changes}.isdisjoint({"age", "sex", "race"})
            assert "would change the outcome to" in result.card
            changed = {**as_text(record), **{c.feature: c.proposed for c in result.changes}}
            again = client.explain_input(changed)
            assert again.predicted_label == result.counterfactual_label != result.predicted_label
        top = client.explain_input(as_text(complete_records(1)[0]), model_id=model_id, top=3)
        assert len(top.attributions) == 3


def test_without_a_release_the_schema_is_the_baseline(coordinator: Coordinator) -> None:
    save_model(coordinator)
    with QueryClient(coordinator.running.address) as client:
        result = client.explain_input(as_text(complete_records(1)[0]))
    assert result.baseline == "schema"
    assert "compared with the middle of every schema range" in result.card


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"age": None}, "lacks the features: age"),
        ({"height": "180"}, "unknown features 'height'"),
        ({"age": "120"}, "feature 'age': 120 is out of range; expected a number in [17, 90]"),
        ({"age": "NaN"}, "feature 'age': expected a number in [17, 90], got 'NaN'"),
        ({"hours-per-week": "many"}, "feature 'hours-per-week': expected a number in [1, 99]"),
        ({"sex": "X"}, "feature 'sex': 'X' is not a known category; accepted: Female, Male"),
    ],
)
def test_bad_inputs_are_invalid_argument(
    coordinator: Coordinator, change: dict[str, str | None], expected: str
) -> None:
    save_model(coordinator)
    record = as_text(complete_records(1)[0])
    for name, value in change.items():
        if value is None:
            del record[name]
        else:
            record[name] = value
    with pytest.raises(grpc.RpcError) as info:
        coordinator.query.ExplainInput(query_pb2.ExplainInputRequest(record=record), timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in info.value.details()
    with QueryClient(coordinator.running.address) as client, pytest.raises(IntegrityError):
        client.explain_input(record)


def test_unknown_or_missing_model_is_not_found(coordinator: Coordinator) -> None:
    record = as_text(complete_records(1)[0])
    for model_id, message in (("", "no trained model is stored yet"), ("m9", "no model 'm9'")):
        with pytest.raises(grpc.RpcError) as info:
            coordinator.query.ExplainInput(
                query_pb2.ExplainInputRequest(record=record, model_id=model_id), timeout=10
            )
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert message in info.value.details()


def err(capsys: pytest.CaptureFixture[str]) -> str:
    """Standard error with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def test_cli_explain(
    coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_model(coordinator)
    save_feature_stats(coordinator)
    good = tmp_path / "input.json"
    good.write_text(json.dumps(complete_records(1)[0]))
    address = coordinator.running.address
    assert main(["explain", "--input", str(good), "--address", address, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["card"].startswith("The model predicts")
    assert out["baseline"] == "feature_stats release stats-release"
    assert main(["explain", "--input", str(good), "--address", address]) == 0
    assert "The model predicts" in capsys.readouterr().out
    # The same call beside the other Query calls.
    assert main(["query", "explain", "--input", str(good), "--address", address, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == out

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**complete_records(1)[0], "age": 200}))
    assert main(["explain", "--input", str(bad), "--address", address]) == 2
    assert "feature 'age': 200 is out of range" in err(capsys)
    bad.write_text(json.dumps({**complete_records(1)[0], "age": None}))
    assert main(["explain", "--input", str(bad), "--address", address]) == 2
    assert "feature 'age': expected a number or a category name" in err(capsys)
    bad.write_text("[1, 2]")
    assert main(["explain", "--input", str(bad), "--address", address]) == 2
    assert "must hold a JSON object" in err(capsys)
    missing = tmp_path / "missing.json"
    assert main(["explain", "--input", str(missing), "--address", address]) == 2
    assert "cannot read --input" in err(capsys)
