"""Accounting and calibration of the discrete Gaussian mechanism.

Noise that is added to fixed-point integers (for example by sites before secure
aggregation) must itself be integer-valued. The **discrete Gaussian**
``N_Z(0, σ²)`` (Canonne, Kamath, Steinke, NeurIPS 2020) puts mass proportional to
``exp(-k² / (2σ²))`` on every integer ``k``. Adding it independently to every coordinate
of an integer-valued query with L2 sensitivity ``Δ`` satisfies ``ρ``-zero-concentrated
DP (Bun & Steinke 2016) with ``ρ = Δ² / (2σ²)`` (CKS 2020, Theorem 14), the same ρ as the
continuous Gaussian mechanism, but its privacy loss distribution is not the Gaussian's.

``dp_accounting``'s PLD accountant has no discrete Gaussian, so these events are accounted
in Rényi DP: zCDP with parameter ρ is RDP with ``ε(α) = ρα`` at every order α, which
``dp_accounting``'s RDP accountant composes exactly (``ZCDpEvent``) and converts to
(ε, δ) with the conversion of Canonne, Kamath, Steinke 2020. The noise multiplier here is
``z = σ / Δ``, so ``ρ = 1 / (2 z²)`` per release.

Not covered: the *sum* of several sites' discrete Gaussians is not itself a discrete
Gaussian; its zCDP bound (Kairouz, Liu, Steinke, ICML 2021) adds a term that depends on
the number of sites and the dimension. Callers releasing such a sum must account that
bound, not this one.
"""

from __future__ import annotations

import math
from typing import Any

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant

from fedlens.errors import ConfigurationError

__all__ = [
    "discrete_gaussian_event",
    "discrete_gaussian_noise_multiplier",
    "epsilon_of_discrete_gaussian",
]


def discrete_gaussian_event(noise_multiplier: float, count: int = 1) -> Any:
    """The ``dp_accounting`` event of ``count`` discrete Gaussian releases, ``z = σ/Δ``."""
    _check(noise_multiplier, count)
    rho = 1.0 / (2.0 * noise_multiplier**2)
    return dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(rho=rho, xi=0.0), count)


def epsilon_of_discrete_gaussian(noise_multiplier: float, delta: float, count: int = 1) -> float:
    """ε at ``delta`` of ``count`` discrete Gaussian releases with ``z = σ/Δ`` (RDP accounting).

    Raises
    ------
    ConfigurationError
        A parameter is outside its range; the message names it.
    """
    if not 0 < delta < 1:
        raise ConfigurationError(f"delta must be in (0, 1), got {delta}")
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(discrete_gaussian_event(noise_multiplier, count))
    return float(accountant.get_epsilon(delta))


def discrete_gaussian_noise_multiplier(epsilon: float, delta: float, count: int = 1) -> float:
    """Smallest ``z = σ/Δ`` for which ``count`` discrete Gaussian releases are (ε, δ)-DP.

    Guarantee: ``epsilon_of_discrete_gaussian(z, delta, count) <= epsilon`` for the
    returned ``z`` (checked, not assumed). Bisection on ``log z`` to a relative 1e-4.

    Raises
    ------
    ConfigurationError
        ``epsilon`` is not finite and > 0, ``delta`` not in (0, 1) or ``count`` < 1.
    """
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise ConfigurationError(f"epsilon must be finite and > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ConfigurationError(f"delta must be in (0, 1), got {delta}")
    _check(1.0, count)

    def fits(z: float) -> bool:
        return epsilon_of_discrete_gaussian(z, delta, count) <= epsilon

    lo, hi = 1e-3, 1.0
    while not fits(hi):
        lo, hi = hi, hi * 2.0
        if hi > 1e9:
            raise ConfigurationError(f"no finite noise multiplier reaches ε = {epsilon}")
    while hi / lo > 1.0 + 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _check(noise_multiplier: float, count: int) -> None:
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise ConfigurationError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigurationError(f"count must be an integer >= 1, got {count!r}")
