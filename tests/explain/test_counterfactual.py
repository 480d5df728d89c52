"""Counterfactuals flip the prediction, hold immutable features, stay within the limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explain.counterfactual import SearchLimits, find_counterfactual
from explain.local import encode_record, predict_logits
from fedlens.datasets import FeatureSpec, Preprocessor, Schema
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.models import build_model
from fedlens.types import ReleasedValue
from tests.explain.adult_model import (
    adult_preprocessor,
    complete_records,
    feature_stats_values,
    trained_logistic,
)

PRE = adult_preprocessor()


def released_limits() -> SearchLimits:
    return SearchLimits.from_feature_stats(PRE, feature_stats_values()[0], source="release r1")


def test_counterfactuals_flip_hold_immutables_and_stay_in_range() -> None:
    model, limits = trained_logistic(), released_limits()
    found = 0
    for record in complete_records(12):
        before = predict_logits(model, encode_record(PRE, record))[0] > 0
        try:
            cf = find_counterfactual(model, PRE, record, limits)
        except ExplanationError:
            continue
        found += 1
        after = predict_logits(model, encode_record(PRE, cf.record))[0] > 0
        assert after != before
        assert cf.predicted_label == PRE.schema.classes[int(after)]
        assert cf.probability >= 0.5
        assert 1 <= len(cf.changes) <= 3
        changed = {c.feature for c in cf.changes}
        assert changed.isdisjoint({"age", "sex", "race"})
        assert {k for k in record if cf.record[k] != record[k]} == changed
        encoded = encode_record(PRE, cf.record)
        for change in cf.changes:
            assert change.original == record[change.feature]
            assert change.proposed != change.original
            spec = PRE.schema.feature(change.feature)
            if spec.kind == "numeric":
                low, high = limits.numeric[spec.name]
                assert low - 1e-9 <= encoded[PRE.groups[spec.name][0]] <= high + 1e-9
                assert spec.low <= float(change.proposed) <= spec.high
                # The records are integral, so are the proposals.
                assert float(change.proposed).is_integer()
            else:
                assert change.proposed in limits.categories[spec.name]
    assert found >= 8


def test_immutable_features_are_configurable() -> None:
    model, record = trained_logistic(), complete_records(1)[0]
    only = "education-num"
    immutable = [n for n in PRE.schema.names if n != only]
    try:
        cf = find_counterfactual(model, PRE, record, released_limits(), immutable=immutable)
    except ExplanationError as exc:
        assert "mutable features (education-num)" in str(exc)
    else:
        assert [c.feature for c in cf.changes] == [only]


def test_unknown_immutable_name_and_bad_parameters_are_refused() -> None:
    record = complete_records(1)[0]
    with pytest.raises(ConfigurationError, match="unknown features 'height'"):
        find_counterfactual(
            trained_logistic(), PRE, record, released_limits(), immutable=["height"]
        )
    with pytest.raises(ConfigurationError, match="max_changes"):
        find_counterfactual(trained_logistic(), PRE, record, released_limits(), max_changes=0)


def test_refuses_with_a_clear_message_when_nothing_flips() -> None:
    # Only age (immutable) moves this model's logit: no allowed change can flip it.
    model = build_model("logistic", PRE.dimension)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.weight[0, PRE.groups["age"][0]] = 10.0
        model.linear.bias.fill_(-20.0)
    record = complete_records(1)[0]
    with pytest.raises(ExplanationError) as info:
        find_counterfactual(model, PRE, record, released_limits())
    message = str(info.value)
    assert "no counterfactual found: changing up to 3 of the mutable features" in message
    assert "within the release r1 ranges" in message
    assert "never changes the prediction from <=50K" in message
    assert "held fixed: age, race, sex" in message


TOY = Preprocessor(
    Schema(
        features=(
            FeatureSpec("a", "numeric", low=0.0, high=10.0),
            FeatureSpec("c", "categorical", categories=("u", "v", "w")),
            FeatureSpec("s", "categorical", categories=("x", "y"), immutable=True),
        ),
        label="label",
        classes=("no", "yes"),
    )
)


def toy_model(weights: list[float], bias: float) -> torch.nn.Module:
    model = build_model("logistic", TOY.dimension)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([weights]))
        model.linear.bias.fill_(bias)
    return model


def test_known_answer_the_smallest_numeric_move() -> None:
    # logit = 4 a_enc - 2 (+3 for s=y): a = 3 predicts "no"; a > 5 flips to "yes".
    model = toy_model([4.0, 0.0, 0.0, 0.0, 0.0, 3.0], -2.0)
    cf = find_counterfactual(
        model, TOY, {"a": 3, "c": "u", "s": "x"}, SearchLimits.from_schema(TOY)
    )
    assert [(c.feature, c.original, c.proposed) for c in cf.changes] == [("a", 3.0, 6.0)]
    assert cf.distance == pytest.approx(0.3)
    assert cf.predicted_label == "yes"


def test_known_answer_a_cheaper_category_swap_and_released_categories() -> None:
    # c = w adds 3 to the logit: one category swap (cost 1) flips; a alone cannot.
    model = toy_model([0.5, 0.0, 0.0, 3.0, 0.0, 0.0], -1.0)
    record = {"a": 3, "c": "u", "s": "x"}
    cf = find_counterfactual(model, TOY, record, SearchLimits.from_schema(TOY))
    assert [(c.feature, c.proposed) for c in cf.changes] == [("c", "w")]
    assert cf.distance == pytest.approx(1.0)
    # A release in which w is absent (frequency within its noise) leaves nothing to try.
    values = [
        ReleasedValue("a:low", 0.0, 0.0),
        ReleasedValue("a:high", 1.0, 0.0),
        ReleasedValue("c=u:freq", 0.5, 0.01),
        ReleasedValue("c=v:freq", 0.49, 0.01),
        ReleasedValue("c=w:freq", 0.01, 0.01),
    ]
    limits = SearchLimits.from_feature_stats(TOY, values)
    assert limits.categories["c"] == ("u", "v")
    with pytest.raises(ExplanationError, match="mutable features \\(a, c\\)"):
        find_counterfactual(model, TOY, record, limits)


def test_numeric_moves_respect_released_ranges() -> None:
    model = toy_model([4.0, 0.0, 0.0, 0.0, 0.0, 0.0], -2.0)
    narrow = [ReleasedValue("a:low", 0.1, 0.0), ReleasedValue("a:high", 0.45, 0.0)]
    limits = SearchLimits.from_feature_stats(TOY, narrow)
    assert limits.numeric["a"] == (0.1, 0.45)
    with pytest.raises(ExplanationError, match="no counterfactual found"):
        find_counterfactual(model, TOY, {"a": 3, "c": "u", "s": "x"}, limits)
    wide = [ReleasedValue("a:low", 0.1, 0.0), ReleasedValue("a:high", 0.9, 0.0)]
    cf = find_counterfactual(
        model, TOY, {"a": 3, "c": "u", "s": "x"}, SearchLimits.from_feature_stats(TOY, wide)
    )
    assert cf.changes[0].proposed == 6.0
    assert np.isclose(cf.logit, 4 * 0.6 - 2, atol=1e-6)
