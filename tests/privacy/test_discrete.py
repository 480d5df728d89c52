"""Discrete Gaussian accounting, and ledgers that mix it with PLD-covered events."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlens.errors import BudgetExceededError, ConfigurationError
from privacy import (
    LedgerEvent,
    PrivacyLedger,
    discrete_gaussian_noise_multiplier,
    epsilon_of_discrete_gaussian,
    epsilon_of_dpsgd,
)
from privacy.gaussian import new_accountant

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _zcdp_to_dp(rho: float, delta: float) -> float:
    """Bun & Steinke 2016, Proposition 1.3: ρ-zCDP implies (ρ + 2√(ρ ln(1/δ)), δ)-DP."""
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


@given(
    z=st.floats(0.3, 20.0),
    count=st.integers(1, 50),
    delta=st.floats(1e-9, 1e-3),
)
@settings(max_examples=40, deadline=None)
def test_epsilon_is_within_the_classical_zcdp_conversion(
    z: float, count: int, delta: float
) -> None:
    rho = count / (2 * z * z)
    eps = epsilon_of_discrete_gaussian(z, delta, count)
    # The conversion used (Canonne, Kamath, Steinke 2020) is never worse than Bun & Steinke's.
    assert 0 < eps <= _zcdp_to_dp(rho, delta) * (1 + 1e-9)


@given(epsilon=st.floats(0.1, 10.0), delta=st.floats(1e-9, 1e-4), count=st.integers(1, 10))
@settings(max_examples=25, deadline=None)
def test_calibration_never_overshoots_and_is_nearly_tight(
    epsilon: float, delta: float, count: int
) -> None:
    z = discrete_gaussian_noise_multiplier(epsilon, delta, count)
    assert epsilon_of_discrete_gaussian(z, delta, count) <= epsilon
    assert epsilon_of_discrete_gaussian(z * (1 - 1e-3), delta, count) > epsilon * 0.99


def test_invalid_settings_name_the_setting() -> None:
    with pytest.raises(ConfigurationError, match="epsilon must be finite and > 0"):
        discrete_gaussian_noise_multiplier(0.0, 1e-5)
    with pytest.raises(ConfigurationError, match="delta must be in"):
        epsilon_of_discrete_gaussian(1.0, 1.5)
    with pytest.raises(ConfigurationError, match="count must be an integer"):
        epsilon_of_discrete_gaussian(1.0, 1e-5, 0)
    with pytest.raises(ConfigurationError, match="sampling_rate 1"):
        LedgerEvent(
            kind="discrete_gaussian", noise_multiplier=2.0, sampling_rate=0.5, created_at=NOW
        )


def test_a_discrete_event_moves_the_whole_ledger_to_rdp() -> None:
    training = LedgerEvent(
        kind="dpsgd", noise_multiplier=1.1, sampling_rate=0.03, steps=300, created_at=NOW
    )
    release = LedgerEvent(kind="discrete_gaussian", noise_multiplier=4.0, created_at=NOW)
    ledger = PrivacyLedger(8.0, 1e-5)
    ledger.record(training)
    assert ledger.accountant == "pld"
    pld_only = ledger.epsilon_spent()
    assert pld_only == pytest.approx(epsilon_of_dpsgd(1.1, 0.03, 300, 1e-5), rel=1e-9)
    ledger.record(release)
    assert ledger.accountant == "rdp"
    expected = new_accountant("rdp")
    expected.compose(training.dp_event())
    expected.compose(release.dp_event())
    assert ledger.epsilon_spent() == pytest.approx(expected.get_epsilon(1e-5), rel=1e-12)
    # Reloading the same events gives the same accountant and ε.
    again = PrivacyLedger(8.0, 1e-5, ledger.events)
    assert again.accountant == "rdp"
    assert again.epsilon_spent() == pytest.approx(ledger.epsilon_spent(), rel=1e-12)


def test_a_discrete_event_that_does_not_fit_is_refused_and_changes_nothing() -> None:
    ledger = PrivacyLedger(1.0, 1e-5)
    ledger.record(LedgerEvent(kind="gaussian", noise_multiplier=6.0, created_at=NOW))
    spent = ledger.epsilon_spent()
    with pytest.raises(BudgetExceededError, match="discrete_gaussian"):
        ledger.record(LedgerEvent(kind="discrete_gaussian", noise_multiplier=1.0, created_at=NOW))
    assert ledger.accountant == "pld"
    assert ledger.epsilon_spent() == spent and len(ledger.events) == 1
