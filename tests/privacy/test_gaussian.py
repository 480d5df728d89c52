"""Calibration and accounting: known answers, conservativeness, cross-checks, speed."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from fedlens.errors import ConfigurationError
from privacy import (
    dpsgd_noise_multiplier,
    epsilon_of_dpsgd,
    epsilon_of_gaussian,
    gaussian_noise_multiplier,
)


def analytic_gaussian_sigma(epsilon: float, delta: float) -> float:
    """Smallest σ of the analytic Gaussian mechanism (Balle & Wang, ICML 2018, Thm 8).

    With sensitivity 1, the mechanism is (ε, δ)-DP iff
    ``Φ(1/(2σ) - εσ) - e^ε Φ(-1/(2σ) - εσ) <= δ``; the left side decreases in σ.
    """

    def delta_of(sigma: float) -> float:
        a = 1 / (2 * sigma)
        return float(
            norm.cdf(a - epsilon * sigma) - math.exp(epsilon) * norm.cdf(-a - epsilon * sigma)
        )

    lo, hi = 1e-3, 1e4
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if delta_of(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def test_analytic_reference_is_right() -> None:
    # Balle & Wang's Figure/Table values: ε = 1, δ = 1e-5 needs σ ≈ 3.73.
    assert analytic_gaussian_sigma(1.0, 1e-5) == pytest.approx(3.73, abs=0.01)


@pytest.mark.parametrize(
    ("epsilon", "delta"), [(1.0, 1e-5), (0.5, 1e-6), (2.0, 1e-5), (4.0, 1e-3), (0.1, 1e-5)]
)
def test_gaussian_calibration_matches_the_analytic_gaussian_mechanism(
    epsilon: float, delta: float
) -> None:
    z = gaussian_noise_multiplier(epsilon, delta)
    exact = analytic_gaussian_sigma(epsilon, delta)
    assert z == pytest.approx(exact, rel=0.01)
    assert z >= exact * (1 - 1e-6)  # PLD with pessimistic discretisation never undercuts


@settings(max_examples=15, deadline=None)
@given(
    epsilon=st.floats(min_value=0.2, max_value=6.0),
    delta=st.sampled_from([1e-3, 1e-5, 1e-7]),
    accountant=st.sampled_from(["pld", "rdp"]),
)
def test_gaussian_calibration_is_conservative_and_nearly_tight(
    epsilon: float, delta: float, accountant: str
) -> None:
    z = gaussian_noise_multiplier(epsilon, delta, accountant=accountant)  # type: ignore[arg-type]
    assert epsilon_of_gaussian(z, delta, accountant=accountant) <= epsilon  # type: ignore[arg-type]
    smaller = epsilon_of_gaussian(z * 0.99, delta, accountant=accountant)  # type: ignore[arg-type]
    assert smaller > epsilon


DPSGD_CASES = [
    # epsilon, delta, sampling_rate, steps
    (1.0, 1e-5, 0.03, 100),
    (3.0, 1e-5, 0.03, 1000),
    (8.0, 1e-6, 0.01, 300),
    (0.5, 1e-5, 1.0, 1),
]


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize(("epsilon", "delta", "q", "steps"), DPSGD_CASES)
def test_dpsgd_calibration_is_conservative_and_nearly_tight(
    epsilon: float, delta: float, q: float, steps: int, accountant: str
) -> None:
    z = dpsgd_noise_multiplier(epsilon, delta, q, steps, accountant=accountant)  # type: ignore[arg-type]
    spent = epsilon_of_dpsgd(z, q, steps, delta, accountant=accountant)  # type: ignore[arg-type]
    assert spent <= epsilon
    assert spent > epsilon * 0.99
    assert epsilon_of_dpsgd(z * 0.99, q, steps, delta, accountant=accountant) > epsilon  # type: ignore[arg-type]


def test_one_full_batch_step_is_the_gaussian_mechanism() -> None:
    assert epsilon_of_dpsgd(2.0, 1.0, 1, 1e-5) == pytest.approx(epsilon_of_gaussian(2.0, 1e-5))
    assert dpsgd_noise_multiplier(1.0, 1e-5, 1.0, 1) == pytest.approx(
        gaussian_noise_multiplier(1.0, 1e-5), rel=1e-3
    )


def test_epsilon_grows_with_steps_and_sampling_rate_and_falls_with_noise() -> None:
    base = epsilon_of_dpsgd(1.0, 0.03, 200, 1e-5)
    assert epsilon_of_dpsgd(1.0, 0.03, 400, 1e-5) > base
    assert epsilon_of_dpsgd(1.0, 0.06, 200, 1e-5) > base
    assert epsilon_of_dpsgd(1.5, 0.03, 200, 1e-5) < base


@pytest.mark.parametrize(
    ("z", "q", "steps"), [(1.0, 0.03, 1000), (1.1, 0.01, 3000), (2.0, 0.05, 500), (0.8, 0.02, 200)]
)
def test_pld_epsilon_is_below_opacus_rdp_epsilon_and_close_to_it(
    z: float, q: float, steps: int
) -> None:
    accountants = pytest.importorskip("opacus.accountants")
    opacus_rdp = accountants.RDPAccountant()
    opacus_rdp.history = [(z, q, steps)]
    delta = 1e-5
    rdp_eps = float(opacus_rdp.get_epsilon(delta))
    pld_eps = epsilon_of_dpsgd(z, q, steps, delta)
    assert pld_eps <= rdp_eps
    assert pld_eps >= 0.6 * rdp_eps
    # dp_accounting's own RDP agrees with Opacus's to a few per cent.
    assert epsilon_of_dpsgd(z, q, steps, delta, accountant="rdp") == pytest.approx(
        rdp_eps, rel=0.05
    )


def test_dpsgd_calibration_is_fast() -> None:
    # Typical site training: q ≈ 0.03, a few hundred to a thousand steps. Generous bound
    # (about 0.2–0.6 s measured on two cores) that still catches a too-fine discretisation.
    for steps in (100, 1000):
        start = time.perf_counter()
        dpsgd_noise_multiplier(3.0, 1e-5, 0.03, steps)
        assert time.perf_counter() - start < 4.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: gaussian_noise_multiplier(0.0, 1e-5), r"epsilon must be finite and > 0"),
        (lambda: gaussian_noise_multiplier(float("inf"), 1e-5), r"epsilon"),
        (lambda: gaussian_noise_multiplier(float("nan"), 1e-5), r"epsilon"),
        (lambda: gaussian_noise_multiplier(1.0, 0.0), r"delta must be in \(0, 1\)"),
        (lambda: gaussian_noise_multiplier(1.0, 1.0), r"delta"),
        (lambda: dpsgd_noise_multiplier(1.0, 1e-5, 0.0, 10), r"sampling_rate must be in \(0, 1\]"),
        (lambda: dpsgd_noise_multiplier(1.0, 1e-5, 1.5, 10), r"sampling_rate"),
        (lambda: dpsgd_noise_multiplier(1.0, 1e-5, 0.1, 0), r"steps must be an integer >= 1"),
        (lambda: epsilon_of_dpsgd(1.0, 0.1, 2.5, 1e-5), r"steps"),  # type: ignore[arg-type]
        (lambda: epsilon_of_gaussian(0.0, 1e-5), r"noise_multiplier must be finite and > 0"),
        (lambda: epsilon_of_gaussian(1.0, 1e-5, accountant="moments"), r"accountant"),  # type: ignore[arg-type]
    ],
)
def test_invalid_parameters_name_the_parameter_and_range(call: object, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        call()  # type: ignore[operator]
