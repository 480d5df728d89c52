"""The privacy ledger: composition, refusal before recording, never over budget."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlens.errors import BudgetExceededError, ConfigurationError
from privacy import (
    LedgerEvent,
    PrivacyLedger,
    epsilon_of_dpsgd,
    epsilon_of_gaussian,
    gaussian_noise_multiplier,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DELTA = 1e-5


def gaussian(z: float, label: str = "") -> LedgerEvent:
    return LedgerEvent(kind="gaussian", noise_multiplier=z, label=label, created_at=NOW)


def dpsgd(z: float, q: float, steps: int) -> LedgerEvent:
    return LedgerEvent(
        kind="dpsgd", noise_multiplier=z, sampling_rate=q, steps=steps, created_at=NOW
    )


def test_empty_ledger_has_spent_nothing() -> None:
    ledger = PrivacyLedger(2.0, DELTA)
    assert ledger.epsilon_spent() == 0.0
    assert ledger.remaining() == 2.0
    assert ledger.events == ()


def test_one_event_costs_what_the_mechanism_costs() -> None:
    ledger = PrivacyLedger(10.0, DELTA)
    assert ledger.record(gaussian(3.0)) == pytest.approx(epsilon_of_gaussian(3.0, DELTA))
    other = PrivacyLedger(10.0, DELTA)
    assert other.record(dpsgd(1.0, 0.03, 300)) == pytest.approx(
        epsilon_of_dpsgd(1.0, 0.03, 300, DELTA)
    )


def test_composition_is_tighter_than_adding_and_worse_than_one_event() -> None:
    ledger = PrivacyLedger(100.0, DELTA)
    one = ledger.record(gaussian(4.0))
    two = ledger.record(gaussian(4.0))
    assert one < two < 2 * one
    # Two Gaussians of std z compose to one of std z / sqrt(2).
    assert two == pytest.approx(epsilon_of_gaussian(4.0 / 2**0.5, DELTA), rel=1e-3)


def test_a_release_calibrated_to_the_budget_fits_exactly() -> None:
    z = gaussian_noise_multiplier(1.0, DELTA)
    ledger = PrivacyLedger(1.0, DELTA)
    assert ledger.check(gaussian(z)) <= 1.0
    ledger.record(gaussian(z))
    with pytest.raises(BudgetExceededError):
        ledger.check(gaussian(20.0))


def test_refusal_names_budget_spent_and_outcome_and_records_nothing() -> None:
    ledger = PrivacyLedger(1.0, DELTA)
    ledger.record(gaussian(6.0, "first"))
    spent = ledger.epsilon_spent()
    big = gaussian(1.0, "too much")
    would = ledger.epsilon_with(big)
    with pytest.raises(BudgetExceededError) as info:
        ledger.record(big)
    message = str(info.value)
    assert "budget ε = 1" in message
    assert f"spent ε = {spent:.4g}" in message
    assert f"ε = {would:.4g}" in message
    assert "'too much'" in message
    assert ledger.events == (gaussian(6.0, "first"),)
    assert ledger.epsilon_spent() == spent


def test_epsilon_with_does_not_record_and_results_are_cached() -> None:
    ledger = PrivacyLedger(5.0, DELTA)
    event = dpsgd(1.0, 0.03, 200)
    after = ledger.epsilon_with(event)
    assert ledger.events == () and ledger.epsilon_spent() == 0.0
    assert ledger.check(event) == after
    assert ledger.record(event) == after
    assert ledger.epsilon_spent() == after
    assert ledger.remaining() == pytest.approx(5.0 - after)


def test_events_passed_in_are_composed() -> None:
    events = [gaussian(3.0), dpsgd(1.0, 0.05, 100)]
    ledger = PrivacyLedger(50.0, DELTA, events)
    replayed = PrivacyLedger(50.0, DELTA)
    for event in events:
        replayed.record(event)
    assert ledger.epsilon_spent() == replayed.epsilon_spent()
    assert ledger.events == tuple(events)


def test_stored_events_beyond_the_budget_load_but_block_everything() -> None:
    ledger = PrivacyLedger(0.5, DELTA, [gaussian(1.0)])
    assert ledger.epsilon_spent() > 0.5
    assert ledger.remaining() == 0.0
    with pytest.raises(BudgetExceededError):
        ledger.check(gaussian(1e6))


event_strategy = st.one_of(
    st.builds(gaussian, st.floats(min_value=0.5, max_value=20.0)),
    st.builds(
        dpsgd,
        st.floats(min_value=0.7, max_value=10.0),
        st.floats(min_value=0.001, max_value=1.0),
        st.integers(min_value=1, max_value=50),
    ),
)


@settings(max_examples=20, deadline=None)
@given(
    budget=st.floats(min_value=0.2, max_value=8.0),
    requests=st.lists(event_strategy, min_size=1, max_size=6),
)
def test_ledger_never_exceeds_its_budget(budget: float, requests: list[LedgerEvent]) -> None:
    ledger = PrivacyLedger(budget, DELTA)
    for event in requests:
        before_events, before_spent = ledger.events, ledger.epsilon_spent()
        would = ledger.epsilon_with(event)
        try:
            after = ledger.record(event)
        except BudgetExceededError:
            assert would > budget
            assert ledger.events == before_events
            assert ledger.epsilon_spent() == before_spent
        else:
            assert after == would <= budget
            assert ledger.events == (*before_events, event)
        assert ledger.epsilon_spent() <= budget
    # The cached running composition equals a fresh composition of the recorded events.
    fresh = PrivacyLedger(budget, DELTA, ledger.events)
    assert fresh.epsilon_spent() == pytest.approx(ledger.epsilon_spent(), rel=1e-9, abs=1e-12)


def test_event_round_trips_through_a_dict() -> None:
    event = LedgerEvent(
        kind="dpsgd",
        noise_multiplier=1.25,
        sampling_rate=0.02,
        steps=500,
        label="round 7",
        created_at=NOW + timedelta(microseconds=17),
    )
    data = event.to_dict()
    assert data["created_at"] == "2025-03-01T12:00:00.000017+00:00"
    assert LedgerEvent.from_dict(data) == event


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "laplace", "noise_multiplier": 1.0}, "kind"),
        ({"kind": "gaussian", "noise_multiplier": 0.0}, "noise_multiplier"),
        ({"kind": "gaussian", "noise_multiplier": float("inf")}, "noise_multiplier"),
        ({"kind": "dpsgd", "noise_multiplier": 1.0, "sampling_rate": 0.0}, "sampling_rate"),
        ({"kind": "dpsgd", "noise_multiplier": 1.0, "steps": 0}, "steps"),
        ({"kind": "dpsgd", "noise_multiplier": 1.0, "steps": 2.5}, "steps"),
        ({"kind": "gaussian", "noise_multiplier": 1.0, "steps": 3}, "gaussian"),
    ],
)
def test_invalid_events_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        LedgerEvent(created_at=NOW, **kwargs)  # type: ignore[arg-type]


def test_from_dict_names_a_missing_field() -> None:
    data = gaussian(2.0).to_dict()
    del data["noise_multiplier"]
    with pytest.raises(ConfigurationError, match="noise_multiplier"):
        LedgerEvent.from_dict(data)
    with pytest.raises(ConfigurationError):
        LedgerEvent.from_dict({**gaussian(2.0).to_dict(), "created_at": "yesterday"})


@pytest.mark.parametrize(
    ("budget", "delta", "match"),
    [
        (0.0, 1e-5, "budget_epsilon"),
        (float("nan"), 1e-5, "budget_epsilon"),
        (1.0, 0.0, "delta"),
        (1.0, 1.0, "delta"),
    ],
)
def test_invalid_budget_is_rejected(budget: float, delta: float, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        PrivacyLedger(budget, delta)
