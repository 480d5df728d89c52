"""Budget planning: splits that use the budget, fixed plans checked, bad settings named."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlens.errors import ConfigurationError
from privacy import PrivacyLedger
from privacy.planning import PlanRequest, check_plan, plan_budget, training_schedule

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def request(**kwargs: object) -> PlanRequest:
    base: dict[str, object] = dict(
        budget_epsilon=4.0, delta=1e-5, records=8000, batch_size=256, rounds=3, local_epochs=2
    )
    base.update(kwargs)
    return PlanRequest(**base)  # type: ignore[arg-type]


@given(
    budget=st.floats(0.5, 8.0),
    share=st.floats(0.3, 0.9),
    records=st.integers(2000, 20000),
    rounds=st.integers(1, 4),
    releases=st.integers(1, 3),
)
@settings(max_examples=6, deadline=None)
def test_a_split_uses_the_budget_and_the_ledger_accepts_every_event(
    budget: float, share: float, records: int, rounds: int, releases: int
) -> None:
    plan = plan_budget(
        request(
            budget_epsilon=budget,
            training_share=share,
            records=records,
            rounds=rounds,
            releases=releases,
        )
    )
    assert budget * 0.999 <= plan.epsilon_total <= budget
    assert plan.training_epsilon <= share * budget
    ledger = PrivacyLedger(budget, 1e-5)
    for event in plan.events(NOW):
        ledger.record(event)  # raises if any event did not fit
    assert ledger.epsilon_spent() == pytest.approx(plan.epsilon_total, rel=1e-12)
    assert len(ledger.events) == rounds + releases


def test_composing_gives_the_release_less_noise_than_splitting_epsilon_additively() -> None:
    plan = plan_budget(request())
    additive = check_plan(request(), 0.7 * 4.0, 0.3 * 4.0, 1e-5)
    assert plan.release_noise_multiplier is not None
    assert additive.release_noise_multiplier is not None
    assert plan.release_noise_multiplier < 0.6 * additive.release_noise_multiplier
    assert additive.epsilon_total < 3.5  # the additive split leaves budget unused


def test_without_releases_training_gets_the_whole_budget() -> None:
    plan = plan_budget(request(releases=0, training_share=1.0))
    assert plan.release_noise_multiplier is None and plan.release_epsilon == 0.0
    assert 3.99 <= plan.epsilon_total <= 4.0
    assert len(plan.events(NOW)) == 3


def test_a_fixed_plan_that_does_not_fit_is_refused_with_its_composed_epsilon() -> None:
    with pytest.raises(
        ConfigurationError, match=r"does not fit the site budget ε = 4 .* ε = 4\.\d"
    ):
        check_plan(request(), 3.5, 2.5, 1e-6)
    fits = check_plan(request(), 2.8, 1.2, 1e-6)
    assert fits.epsilon_total < 4.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget_epsilon": 0.0}, r"epsilon must be finite and > 0, got 0"),
        ({"budget_epsilon": -1.0}, r"epsilon must be finite and > 0"),
        ({"budget_epsilon": float("nan")}, r"epsilon must be finite and > 0"),
        ({"delta": 0.0}, r"delta must be in \(0, 1/records\) = \(0, 0.000125\)"),
        ({"delta": 2e-4}, r"delta must be in \(0, 1/records\) = \(0, 0.000125\) for 8000"),
        ({"records": 0}, r"records must be an integer >= 1"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1"),
        ({"rounds": 0}, r"rounds must be an integer >= 1"),
        ({"releases": -1}, r"releases must be an integer >= 0"),
        ({"training_share": 0.0}, r"training_share must be in \(0, 1\]"),
        ({"training_share": 1.0}, r"training_share must be below 1 when releases > 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting_and_range(
    kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        request(**kwargs)


def test_bad_fixed_plan_settings_are_named() -> None:
    with pytest.raises(ConfigurationError, match="train_epsilon must be finite and > 0"):
        check_plan(request(), 0.0, 1.0, 1e-6)
    with pytest.raises(ConfigurationError, match="release_epsilon must be finite and > 0"):
        check_plan(request(), 1.0, -1.0, 1e-6)
    with pytest.raises(ConfigurationError, match=r"release_delta must be in \(0, 1\)"):
        check_plan(request(), 1.0, 1.0, 1.0)


def test_schedule_counts_expected_passes() -> None:
    assert training_schedule(1000, 100, 2) == (0.1, 20)
    assert training_schedule(50, 256, 3) == (1.0, 3)
    with pytest.raises(ConfigurationError, match="at least one record"):
        training_schedule(0, 1, 1)
