"""Calibration and accounting of the Gaussian mechanism and of DP-SGD.

Two mechanisms, both with L2 sensitivity 1 (callers scale the noise by their clip bound):

* the **Gaussian mechanism**: release ``f(D) + N(0, z**2 I)`` once;
* **DP-SGD** (Abadi et al., CCS 2016): ``steps`` releases of the Gaussian mechanism,
  each on a Poisson sample of the records (every record joins independently with
  probability ``sampling_rate``), i.e. ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
  GaussianDpEvent(z)), steps)``.

The neighbouring relation is add-or-remove one record. Privacy is computed with Google's
``dp_accounting``:

``"pld"`` (default)
    Privacy loss distributions (Koskela et al. 2020; Doroshenko et al., PETS 2022) with
    pessimistic discretisation, so every ε reported is an upper bound on the mechanism's
    true ε. The interval is :func:`pld_interval`: at most
    :data:`PLD_VALUE_DISCRETIZATION`, and finer for DP-SGD steps whose privacy loss
    (about ``q / z`` nats) is small against it, since a grid that does not resolve a step
    overstates ε (by 2x at ``q / z = Δ / 5``, cross-checked against Opacus's PRV
    accountant); with it, ε is tight to a few per cent.
``"rdp"``
    Rényi DP (Mironov 2017; Mironov, Talwar, Zhang 2019 for the subsampled Gaussian),
    converted to (ε, δ) with the conversion of Canonne, Kamath, Steinke 2020. Looser
    than PLD, kept for cross-checks and for mechanisms PLD does not cover.

Calibration returns, up to a relative ``1e-4``, the smallest noise multiplier whose ε
under the chosen accountant is at most the target. It is conservative by construction:
the returned value is one at which the same accountant (the same function that
:func:`epsilon_of_gaussian` or :func:`epsilon_of_dpsgd` call) was evaluated and found
within the target. The search is Brent's method on a bracket found by geometric steps
from an initial guess; for DP-SGD under PLD the guess comes from a cheap search at a
ten times coarser discretisation, so that only a handful of evaluations run at the
fine one (about 8 coarse and 5 fine evaluations). Measured on a two-core machine: a
Gaussian calibration takes 0.05 to 0.15 s under PLD and under 0.01 s under RDP; DP-SGD
with ``q = 0.03``, 100 to 1000 steps and ε from 1 to 8 takes 0.2 to 0.6 s under PLD when
the machine is idle (up to 0.9 s when it is busy) and 0.3 to 1.1 s under RDP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize

from fedlens.errors import ConfigurationError

__all__ = [
    "PLD_MIN_DISCRETIZATION",
    "PLD_VALUE_DISCRETIZATION",
    "AccountantName",
    "dpsgd_event",
    "dpsgd_noise_multiplier",
    "epsilon_of_dpsgd",
    "epsilon_of_gaussian",
    "gaussian_event",
    "gaussian_noise_multiplier",
    "new_accountant",
    "pld_interval",
]

AccountantName = Literal["pld", "rdp"]

PLD_VALUE_DISCRETIZATION = 1e-3
"""Discretisation interval of privacy-loss values for PLD accounting (in nats).

``1e-3`` keeps ε within about 1 % of the finer ``1e-4`` for 1000 DP-SGD steps at
``q = 0.03`` while being ten times faster (about 0.1 s per evaluation instead of 1 s).
"""

PLD_MIN_DISCRETIZATION = 1e-4
"""The finest interval :func:`pld_interval` chooses; finer grids cost time and memory."""

# Steps are resolved when the interval is at most this fraction of q / z (under 1 %
# overstatement at a third, measured against Opacus's PRV accountant).
_STEPS_PER_LOSS = 3.0

_COARSE_DISCRETIZATION = 1e-2
_RELATIVE_TOLERANCE = 1e-4
_COARSE_RELATIVE_TOLERANCE = 1e-2
_MAX_BRACKET_STEPS = 64


def pld_interval(noise_multiplier: float, sampling_rate: float = 1.0) -> float:
    """The PLD discretisation interval that resolves one step with these parameters.

    ``clamp(q / (3 z), PLD_MIN_DISCRETIZATION, PLD_VALUE_DISCRETIZATION)``: the coarse
    default unless the step's privacy loss (about ``q / z``) is small against it.
    """
    fine = sampling_rate / (_STEPS_PER_LOSS * noise_multiplier)
    return min(PLD_VALUE_DISCRETIZATION, max(PLD_MIN_DISCRETIZATION, fine))


def new_accountant(
    accountant: AccountantName = "pld", *, interval: float = PLD_VALUE_DISCRETIZATION
) -> Any:
    """A fresh ``dp_accounting`` accountant for add-or-remove-one neighbours.

    Parameters
    ----------
    accountant
        ``"pld"`` or ``"rdp"``.
    interval
        PLD discretisation interval (see :func:`pld_interval`); ignored for RDP.
    """
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    if accountant == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    raise ConfigurationError(f"accountant must be 'pld' or 'rdp', got {accountant!r}")


def gaussian_event(noise_multiplier: float) -> Any:
    """The ``dp_accounting`` event of one Gaussian mechanism with sensitivity 1."""
    return dp_accounting.GaussianDpEvent(noise_multiplier)


def dpsgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> Any:
    """The ``dp_accounting`` event of ``steps`` Poisson-subsampled Gaussian steps."""
    sampled = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(sampled, steps)


def epsilon_of_gaussian(
    noise_multiplier: float, delta: float, *, accountant: AccountantName = "pld"
) -> float:
    """ε at ``delta`` of one Gaussian mechanism with sensitivity 1 and std ``noise_multiplier``.

    Raises
    ------
    ConfigurationError
        ``noise_multiplier`` is not finite and > 0, or ``delta`` is not in (0, 1).
    """
    _check_noise_multiplier(noise_multiplier)
    _check_delta(delta)
    fresh = new_accountant(accountant, interval=pld_interval(noise_multiplier))
    return _epsilon(fresh, gaussian_event(noise_multiplier), delta)


def epsilon_of_dpsgd(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: AccountantName = "pld",
) -> float:
    """ε at ``delta`` of DP-SGD: ``steps`` Poisson-subsampled Gaussian steps.

    Parameters
    ----------
    noise_multiplier
        Noise std divided by the per-record clip bound.
    sampling_rate
        Probability ``q`` that a record joins a step's batch, in (0, 1].
    steps
        Number of noisy steps, >= 1.

    Raises
    ------
    ConfigurationError
        A parameter is outside its range; the message names it.
    """
    _check_noise_multiplier(noise_multiplier)
    _check_dpsgd(sampling_rate, steps)
    _check_delta(delta)
    event = dpsgd_event(noise_multiplier, sampling_rate, steps)
    fresh = new_accountant(accountant, interval=pld_interval(noise_multiplier, sampling_rate))
    return _epsilon(fresh, event, delta)


def gaussian_noise_multiplier(
    epsilon: float, delta: float, *, accountant: AccountantName = "pld"
) -> float:
    """Smallest std ``z`` for which one Gaussian mechanism of sensitivity 1 is (ε, δ)-DP.

    Guarantee: ``epsilon_of_gaussian(z, delta, accountant=accountant) <= epsilon``. Under
    PLD ``z`` agrees with the exact analytic Gaussian mechanism (Balle & Wang, ICML 2018)
    to about 0.1 %, on the conservative side.

    Raises
    ------
    ConfigurationError
        ``epsilon`` is not finite and > 0, or ``delta`` is not in (0, 1).
    """
    _check_epsilon(epsilon)
    _check_delta(delta)
    new_accountant(accountant)  # validates the name before any work

    def eps(z: float) -> float:
        return epsilon_of_gaussian(z, delta, accountant=accountant)

    # The classical bound of Dwork & Roth (valid for ε < 1) is close enough to start from.
    guess = math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    return _smallest_within(eps, epsilon, guess, _RELATIVE_TOLERANCE)


def dpsgd_noise_multiplier(
    epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    accountant: AccountantName = "pld",
) -> float:
    """Smallest noise multiplier for which DP-SGD with these parameters is (ε, δ)-DP.

    Guarantee: ``epsilon_of_dpsgd(z, sampling_rate, steps, delta, accountant=accountant)
    <= epsilon`` for the returned ``z``.

    Raises
    ------
    ConfigurationError
        A parameter is outside its range; the message names it.
    """
    _check_epsilon(epsilon)
    _check_delta(delta)
    _check_dpsgd(sampling_rate, steps)
    new_accountant(accountant)

    def eps(z: float) -> float:
        return epsilon_of_dpsgd(z, sampling_rate, steps, delta, accountant=accountant)

    # A rough start from the moments-accountant scaling (Abadi et al. 2016); the bracket
    # search corrects it. Below 0.5 the PLD grows expensive, so start no lower.
    guess = max(sampling_rate * math.sqrt(steps * math.log(1.0 / delta)) / epsilon, 0.5)
    if accountant == "pld":

        def eps_coarse(z: float) -> float:
            fresh = pld_privacy_accountant.PLDAccountant(
                value_discretization_interval=_COARSE_DISCRETIZATION
            )
            return _epsilon(fresh, dpsgd_event(z, sampling_rate, steps), delta)

        guess = _smallest_within(eps_coarse, epsilon, guess, _COARSE_RELATIVE_TOLERANCE)
    return _smallest_within(eps, epsilon, guess, _RELATIVE_TOLERANCE)


def _smallest_within(
    eps: Callable[[float], float], target: float, guess: float, rel_tol: float
) -> float:
    """The smallest evaluated ``z`` with ``eps(z) <= target`` near the crossing.

    ``eps`` is decreasing in ``z`` (up to discretisation noise). Geometric steps from
    ``guess`` (ratio 1.05, squared after every step) find a bracket; Brent's method
    narrows it to ``rel_tol``. Every value is remembered, and the answer is the smallest
    ``z`` that was actually evaluated and found within the target, so the guarantee does
    not rest on monotonicity or on the root finder.
    """
    seen: dict[float, float] = {}

    def gap(z: float) -> float:
        if z not in seen:
            seen[z] = eps(z)
        return seen[z] - target

    lo = hi = guess
    ratio = 1.05
    if gap(guess) <= 0:
        for _ in range(_MAX_BRACKET_STEPS):
            lo = hi / ratio
            if gap(lo) > 0:
                break
            hi, ratio = lo, ratio * ratio
        else:
            raise ConfigurationError(f"no noise multiplier gives ε above {target} to bracket")
    else:
        for _ in range(_MAX_BRACKET_STEPS):
            hi = lo * ratio
            if gap(hi) <= 0:
                break
            lo, ratio = hi, ratio * ratio
        else:
            raise ConfigurationError(f"no finite noise multiplier reaches ε = {target}")
    optimize.brentq(gap, lo, hi, xtol=rel_tol * lo, rtol=rel_tol)
    return min(z for z, value in seen.items() if value <= target)


def _epsilon(accountant: Any, event: Any, delta: float) -> float:
    return float(accountant.compose(event).get_epsilon(delta))


def _check_epsilon(epsilon: float) -> None:
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise ConfigurationError(f"epsilon must be finite and > 0, got {epsilon}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigurationError(f"delta must be in (0, 1), got {delta}")


def _check_noise_multiplier(noise_multiplier: float) -> None:
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise ConfigurationError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")


def _check_dpsgd(sampling_rate: float, steps: int) -> None:
    if not 0 < sampling_rate <= 1:
        raise ConfigurationError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigurationError(f"steps must be an integer >= 1, got {steps!r}")
