"""Local explanations: exact for a logistic model, validated input, DP baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from explain.local import (
    available_methods,
    baseline_from_feature_stats,
    decode_numeric,
    encode_record,
    explain_input,
    schema_baseline,
    validate_record,
)
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.models import build_model
from tests.explain.adult_model import (
    adult_features,
    adult_preprocessor,
    complete_records,
    feature_stats_values,
    trained_logistic,
)

PRE = adult_preprocessor()


def logistic_with_known_weights() -> tuple[torch.nn.Module, np.ndarray]:
    model = build_model("logistic", PRE.dimension)
    w = np.random.default_rng(1).normal(size=PRE.dimension)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor(w[None, :], dtype=torch.float32))
        model.linear.bias.fill_(0.3)
    return model, w.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("method", available_methods())
def test_logistic_attributions_equal_w_times_x_minus_b(method: str) -> None:
    model, w = logistic_with_known_weights()
    record = complete_records(1)[0]
    baseline = baseline_from_feature_stats(PRE, feature_stats_values()[0])
    result = explain_input(model, PRE, record, baseline, method=method)
    per_column = w * (result.encoded - baseline)
    expected = {name: per_column[list(cols)].sum() for name, cols in PRE.groups.items()}
    got = {a.feature: a.attribution for a in result.attributions}
    assert got == pytest.approx(expected, abs=1e-5)
    assert sum(got.values()) == pytest.approx(result.logit - result.baseline_logit, abs=1e-4)
    magnitudes = [abs(a.attribution) for a in result.attributions]
    assert magnitudes == sorted(magnitudes, reverse=True)


def test_prediction_matches_the_model_and_probability_is_of_the_predicted_class() -> None:
    model = trained_logistic()
    for record in complete_records(5):
        result = explain_input(model, PRE, record, schema_baseline(PRE))
        logit = float(model(torch.tensor(result.encoded[None, :], dtype=torch.float32)).detach())
        assert result.logit == pytest.approx(logit, abs=1e-6)
        p = 1 / (1 + math.exp(-logit))
        assert result.positive_probability == pytest.approx(p)
        assert result.probability == pytest.approx(max(p, 1 - p))
        assert result.predicted_label == PRE.schema.classes[int(logit > 0)]
        assert result.record["age"] == record["age"]


def test_mlp_attributions_are_complete() -> None:
    model = build_model("mlp", PRE.dimension, seed=3)
    record = complete_records(1)[0]
    result = explain_input(model, PRE, record, schema_baseline(PRE))
    total = sum(a.attribution for a in result.attributions)
    assert total == pytest.approx(result.logit - result.baseline_logit, abs=2e-3)


def test_numbers_may_arrive_as_text() -> None:
    record = {
        k: str(int(v)) if isinstance(v, float) else v for k, v in complete_records(1)[0].items()
    }
    values = validate_record(PRE.schema, record)
    assert isinstance(values["age"], float)
    assert np.array_equal(encode_record(PRE, values), encode_record(PRE, complete_records(1)[0]))


GOOD = complete_records(1)[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"age": None}, "lacks the features: age"),
        ({"height": 180}, "unknown features 'height'"),
        ({"age": 120}, "feature 'age': 120 is out of range; expected a number in [17, 90]"),
        ({"hours-per-week": 0}, "feature 'hours-per-week': 0 is out of range"),
        ({"age": float("nan")}, "feature 'age': expected a number in [17, 90], got nan"),
        ({"capital-gain": "inf"}, "feature 'capital-gain': expected a number in [0, 99999]"),
        ({"age": True}, "feature 'age': expected a number"),
        ({"age": "old"}, "feature 'age': expected a number in [17, 90], got 'old'"),
        (
            {"sex": "Unknown"},
            "feature 'sex': 'Unknown' is not a known category; accepted: Female, Male",
        ),
        ({"workclass": 3}, "feature 'workclass': 3 is not a known category; accepted: Private"),
    ],
)
def test_bad_records_are_refused_naming_the_feature(
    change: dict[str, object], expected: str
) -> None:
    record = dict(GOOD)
    for name, value in change.items():
        if value is None:
            del record[name]
        else:
            record[name] = value
    with pytest.raises(ConfigurationError) as info:
        explain_input(trained_logistic(), PRE, record, schema_baseline(PRE))
    assert expected in str(info.value)


def test_unknown_method_and_bad_baseline_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="available: integrated_gradients, occlusion"):
        explain_input(trained_logistic(), PRE, GOOD, schema_baseline(PRE), method="shap")
    with pytest.raises(ExplanationError, match="baseline must be"):
        explain_input(trained_logistic(), PRE, GOOD, np.zeros(3))


def test_feature_stats_baseline_is_the_column_means() -> None:
    x, _ = adult_features()
    baseline = baseline_from_feature_stats(PRE, feature_stats_values()[0])
    assert baseline == pytest.approx(x.mean(axis=0), abs=1e-9)
    with pytest.raises(ExplanationError, match="lacks age:mean"):
        baseline_from_feature_stats(PRE, feature_stats_values()[0][1:])


def test_schema_baseline_is_midpoints_and_uniform_categories() -> None:
    base = schema_baseline(PRE)
    assert base[PRE.groups["age"][0]] == 0.5
    assert base[list(PRE.groups["sex"])] == pytest.approx([0.5, 0.5])
    for spec in PRE.schema.features:
        assert base[list(PRE.groups[spec.name])].sum() == pytest.approx(
            0.5 if spec.kind == "numeric" else 1.0
        )


@pytest.mark.parametrize("name", ["age", "capital-gain", "hours-per-week"])
def test_decode_inverts_the_encoding(name: str) -> None:
    spec = PRE.schema.feature(name)
    for raw in (spec.low, spec.high, (spec.low + spec.high) / 3):
        u = encode_record(PRE, {**GOOD, name: raw})[PRE.groups[name][0]]
        assert decode_numeric(spec, u) == pytest.approx(raw, rel=1e-5, abs=1e-3)
