"""Kind-specific release cards, on releases made by the kinds' own post-processors."""

from __future__ import annotations

import re

import pytest

from explain.cards import release_card
from fedlens.types import Release, ReleasedValue
from tests.explain.test_figures import KIND_PARAMS, real_release


def test_fairness_card_names_the_groups_and_the_gap_with_an_interval() -> None:
    release = real_release("fairness")
    card = release_card(release)
    rates = {v.name: v for v in release.values}
    gap = rates["gap:demographic_parity:race"]
    assert card.startswith("Release rel-fairness (fairness) compares how the model treats groups")
    # race has the largest selection-rate gap in this release: named first, with both groups.
    assert (
        "By race, the share of records the model predicts positive is highest for race=A "
        f"({100 * rates['race=A:selection_rate'].value:.0f}% \u00b1 "
    ) in card
    assert "lowest for race=B" in card
    assert (
        f"a difference of {100 * gap.value:.0f} \u00b1 {100 * 1.96 * gap.noise_std:.0f} "
        "percentage points"
    ) in card
    assert "differs most between race=A and race=B" in card
    assert "95% ranges of the privacy noise" in card


def test_fairness_card_says_when_a_gap_could_be_noise() -> None:
    values = (
        ReleasedValue("sex=F:selection_rate", 0.30, 0.05),
        ReleasedValue("sex=M:selection_rate", 0.32, 0.05),
        ReleasedValue("gap:demographic_parity:sex", 0.02, 0.07),
    )
    card = release_card(Release("r", "round", "fairness", "", 200.0, values, (), ()))
    assert "highest for sex=M (32% \u00b1 10) and lowest for sex=F (30% \u00b1 10)" in card
    assert "could be due to the privacy noise alone" in card


def test_attribution_card_names_the_features_and_says_what_the_sign_means() -> None:
    card = release_card(real_release("global_attribution", noise_std=5.0))
    assert re.search(r"largest values are age \(\+0\.\d\d\), hours-per-week", card)
    assert "towards the positive class" in card
    assert "The effect of sex is too small to tell apart from the noise." in card


def test_attribution_card_for_both_classes_names_class_one() -> None:
    grouped = (
        ReleasedValue("age|class=1", 0.4, 0.01),
        ReleasedValue("age|class=0", -0.4, 0.01),
        ReleasedValue("sex|class=1", -0.1, 0.01),
        ReleasedValue("sex|class=0", 0.1, 0.01),
    )
    release = Release("r", "round", "global_attribution", "", 100.0, grouped, grouped, ())
    assert "largest values are age (+0.40) and sex (\u22120.10)." in release_card(release)


def test_group_influence_card_names_who_pushed_up_and_down() -> None:
    values = (
        ReleasedValue("label=1/influence", 0.8, 0.1),
        ReleasedValue("label=1/count", 300.0, 2.0),
        ReleasedValue("label=0/influence", -0.5, 0.1),
        ReleasedValue("label=0/count", 200.0, 2.0),
        ReleasedValue("site=h3/influence", 0.05, 0.1),
        ReleasedValue("site=h3/count", 20.0, 2.0),
    )
    card = release_card(Release("r", "round", "group_influence", "", 500.0, values, (), ()))
    assert "Pushed the prediction up most: label=1 (+0.80 \u00b1 0.20) and site=h3" in card
    assert "Pushed it down most: label=0 (\u22120.50 \u00b1 0.20)." in card
    assert "The effect of site=h3 could be due to the privacy noise alone." in card


def test_site_contribution_card_names_helpful_sites() -> None:
    card = release_card(real_release("site_contribution"))
    assert "Most helpful: hospital-a" in card


@pytest.mark.parametrize("kind", sorted(KIND_PARAMS))
def test_every_kind_gets_its_own_card(kind: str) -> None:
    release = real_release(kind)
    card = release_card(release)
    assert card.startswith(f"Release rel-{kind} ({kind}) ")
    assert card == release_card(release)  # deterministic
    generic = f"Release rel-{kind} ({kind}) averages over about 500 records. The "
    if kind != "global_attribution":
        assert not card.startswith(generic), card
    assert "nan" not in card


@pytest.mark.parametrize(
    ("kind", "phrase"),
    [
        ("feature_stats", "Averages: age 0."),
        ("influence_prototypes", "no real record is shown"),
        ("self_influence", "often mislabelled or unusual"),
        ("loo_unfairness", "would each flip a prediction on their own"),
        ("hessian", "influence jobs use them"),
    ],
)
def test_kind_wording(kind: str, phrase: str) -> None:
    assert phrase in release_card(real_release(kind))


def test_non_finite_values_are_skipped_by_the_generic_card() -> None:
    values = (ReleasedValue("a", float("nan"), 0.1), ReleasedValue("b", 0.2, 0.1))
    card = release_card(Release("r", "round", "new_kind", "", float("nan"), values, (), ()))
    assert card == (
        "Release r (new_kind) averages over an unknown number of records. The entries with "
        "the largest values are b (+0.20). Each value carries privacy noise with standard "
        "deviation about 0.1."
    )
