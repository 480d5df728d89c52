"""Cards: fixed, deterministic wording."""

from __future__ import annotations

import numpy as np

from explain.cards import prediction_card, release_card
from explain.counterfactual import Counterfactual, FeatureChange
from explain.local import FeatureAttribution, LocalExplanation
from fedlens.types import Release, ReleasedValue

CLASSES = ("<=50K", ">50K")


def local(logit: float, attributions: list[tuple[str, object, float]]) -> LocalExplanation:
    return LocalExplanation(
        record={},
        encoded=np.zeros(1),
        baseline=np.zeros(1),
        logit=logit,
        baseline_logit=0.0,
        attributions=tuple(FeatureAttribution(f, v, a) for f, v, a in attributions),  # type: ignore[arg-type]
        classes=CLASSES,
        method="integrated_gradients",
    )


ATTRS = [
    ("marital-status", "Married-civ-spouse", 1.2),
    ("capital-gain", 0.0, -0.4),
    ("education-num", 13.0, 0.85),
    ("hours-per-week", 45.5, 0.1),
    ("occupation", "Sales", 0.05),
]


def test_prediction_card_with_a_counterfactual() -> None:
    cf = Counterfactual(
        changes=(FeatureChange("occupation", "Sales", "Other-service"),),
        record={},
        logit=-0.25,
        distance=1.0,
        classes=CLASSES,
        limits_source="schema",
    )
    assert prediction_card(local(1.0, ATTRS), cf) == (
        "The model predicts >50K with probability 0.73. The main reasons are "
        "marital-status = Married-civ-spouse (+1.20), education-num = 13 (+0.85) and "
        "hours-per-week = 45.5 (+0.10), compared with an average record. Changing "
        "occupation to Other-service would change the outcome to <=50K (probability 0.56)."
    )


def test_prediction_card_for_the_negative_class_without_a_counterfactual() -> None:
    card = prediction_card(
        local(-2.0, ATTRS),
        None,
        top=2,
        no_counterfactual="No small change flips it.",
        reference="the middle of every schema range",
    )
    assert card == (
        "The model predicts <=50K with probability 0.88. The main reason is "
        "capital-gain = 0 (\u22120.40), compared with the middle of every schema range. "
        "No small change flips it."
    )
    assert card == prediction_card(
        local(-2.0, ATTRS),
        None,
        top=2,
        no_counterfactual="No small change flips it.",
        reference="the middle of every schema range",
    )


def test_prediction_card_when_nothing_pushes() -> None:
    assert prediction_card(local(0.5, [("age", 30.0, -0.1)])) == (
        "The model predicts >50K with probability 0.62. "
        "No feature pushes the prediction away from an average record."
    )


def test_release_card() -> None:
    release = Release(
        release_id="r1",
        round_id="round",
        kind="global_attribution",
        created_at="2025-01-01T00:00:00+00:00",
        noised_count=30162.4,
        values=(ReleasedValue("age", 0.1, 0.002),),
        grouped=(
            ReleasedValue("age", 0.1, 0.002),
            ReleasedValue("marital-status", -0.41, 0.003),
            ReleasedValue("sex", 0.1, 0.0021),
            ReleasedValue("race", 0.02, 0.0021),
        ),
        costs=(),
    )
    assert release_card(release) == (
        "Release r1 (global_attribution) averages over about 30162 records. The features "
        "with the largest values are marital-status (\u22120.41), age (+0.10) and sex (+0.10). "
        "Each value carries privacy noise with standard deviation about 0.0021."
    )


def test_release_card_without_noise_or_groups() -> None:
    release = Release(
        release_id="r2",
        round_id="round",
        kind="feature_stats",
        created_at="",
        noised_count=100.0,
        values=(ReleasedValue("age:mean", 0.3, 0.0), ReleasedValue("age:std", 0.1, 0.0)),
        grouped=(),
        costs=(),
    )
    assert release_card(release, top=1) == (
        "Release r2 (feature_stats) averages over about 100 records. The entries with the "
        "largest values are age:mean (+0.30). The values carry no privacy noise."
    )
