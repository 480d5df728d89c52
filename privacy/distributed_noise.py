"""Distributed discrete Gaussian noise for sums released through secure aggregation.

With ``distributed`` noise placement (see the privacy model in DESIGN.md) no site adds the
full noise: each site adds an integer *share* to its fixed-point-encoded contribution, and
the securely aggregated sum carries the target noise. This module samples the shares,
calibrates their size and accounts the sum, and sizes the modulus so the sum does not wrap.

Threat model and guarantee. The aggregator learns only the sum over the sites that finish
the round, which is at least ``threshold``; up to ``colluding`` of those sites may share
their own noise with it and so subtract it. Sites that drop out contribute nothing. Hence
the released sum always contains the shares of at least ``min_honest = threshold -
colluding`` honest sites. :func:`calibrate_shares` gives each share the parameter
``σ_share = σ_total / sqrt(min_honest)``, so those honest shares alone have parameter
``σ_total² = (z Δ)²`` in total, and accounts the sum with the bound of Kairouz, Liu and
Steinke (ICML 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", arXiv:2102.06387) for sums of ``n`` independent discrete
Gaussians. Shares beyond ``min_honest`` (more honest survivors, or colluders' shares) are
independent extra noise, i.e. post-processing, and can only help.

The sum of discrete Gaussians is not a discrete Gaussian, so the sum is accounted as a
discrete Gaussian release with the smaller *effective* noise multiplier
:attr:`ShareCalibration.effective_noise_multiplier`; the site records that value in its
ledger as a ``"discrete_gaussian"`` event (:mod:`privacy.discrete`).

Assumptions: the shares are sampled independently with :class:`~privacy.randomness.
SecureRandom`; ``Δ`` bounds the L2 norm of the change of the *integer* sum when one
record is added or removed (:func:`encoded_sensitivity`); the modulus is large enough
that the sum does not wrap around (:func:`wraparound_bits`; a wrap would only make the
decoded value wrong, not less private, since reduction modulo ``2**bits`` is
post-processing).

References: Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy",
NeurIPS 2020 (CKS20); Kairouz, Liu, Steinke, ICML 2021 (KLS21).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlens.errors import ConfigurationError
from privacy.fixedpoint import MAX_BITS
from privacy.randomness import NoiseSource

__all__ = [
    "ShareCalibration",
    "calibrate_shares",
    "encoded_sensitivity",
    "sample_discrete_gaussian",
    "wraparound_bits",
]

_MAX_SIGMA = 2.0**46
"""Largest accepted σ: every candidate (at most about ``36.7 (σ + 1)``) stays an exact
float64 integer below ``2**53``."""
_MAX_BATCH = 1 << 20
"""Most candidates drawn per pass, which bounds the sampler's temporary memory."""


def sample_discrete_gaussian(size: int, sigma: float, rng: NoiseSource) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian ``N_Z(0, sigma²)``.

    ``N_Z(0, σ²)`` puts mass proportional to ``exp(-k² / (2σ²))`` on every integer ``k``;
    its variance is slightly below ``σ²`` (CKS20). The sampler is CKS20's Algorithm 3,
    vectorised: with ``t = floor(σ) + 1``, draw candidates ``Y`` from the discrete Laplace
    distribution (mass proportional to ``exp(-|y| / t)``) as the difference of two
    geometric variables with ratio ``exp(-1 / t)``, accept each with probability
    ``exp(-(|Y| - σ²/t)² / (2σ²))``, and draw a fresh batch for the coordinates still
    missing. Accepted candidates are exactly ``N_Z(0, σ²)`` in exact arithmetic (CKS20,
    analysis of Algorithm 3); about half of the candidates are accepted for ``σ`` near 1
    and three in four for large ``σ``.

    Floating point in place of exact arithmetic. CKS20 sample every Bernoulli with exact
    rational arithmetic. Here the geometric variables are ``floor(-t log(1 - U))`` and the
    acceptance test is ``U < exp(-x)``, for float64 uniforms ``U`` on the grid
    ``k / 2**53`` supplied by ``rng``. Each such step realises its intended probability
    only up to about ``2**-52`` (the uniform's grid plus the rounding of ``log`` and
    ``exp``), and candidates beyond about ``36.7 t`` cannot occur (mass below
    ``exp(-600)`` for the target). The output distribution is therefore not exactly
    ``N_Z(0, σ²)``: each coordinate's probabilities are off by amounts of the order of
    ``2**-50``, which is tiny relative to the mass of every value within several ``σ``
    but not relative to values deep in the tail. The zCDP accounting of this module
    assumes exact samples and does not charge this gap to δ. Unlike a floating-point
    Gaussian (Mironov, CCS 2012) the *outputs* are integers, so no low-order bits of the
    released value depend on the input.

    Parameters
    ----------
    size
        Number of draws, an integer >= 0.
    sigma
        Scale parameter ``σ``, finite, ``0 <= σ <= 2**46``; ``σ = 0`` gives zeros.
    rng
        Source of every random bit (:meth:`~privacy.randomness.NoiseSource.uniform`);
        :class:`~privacy.randomness.SecureRandom` for released noise.

    Returns
    -------
    numpy.ndarray
        ``(size,)`` int64.

    Raises
    ------
    ConfigurationError
        ``size`` is not an integer >= 0 or ``sigma`` is outside its range.
    """
    n = _integer(size, "size", minimum=0)
    s = _real(sigma, "sigma", positive=False)
    if s > _MAX_SIGMA:
        raise ConfigurationError(f"sigma must be <= 2**46, got {sigma}")
    out = np.zeros(n, dtype=np.int64)
    if n == 0 or s == 0.0:
        return out
    t = math.floor(s) + 1
    variance = s * s
    centre = variance / t
    filled = 0
    while filled < n:
        missing = n - filled
        batch = min(missing + missing // 2 + 64, _MAX_BATCH)
        u = rng.uniform(3 * batch)
        # 1 - U lies in (0, 1], so both logarithms are finite and <= 0.
        first = np.floor(-t * np.log1p(-u[:batch]))
        second = np.floor(-t * np.log1p(-u[batch : 2 * batch]))
        candidates = first - second
        bias = (np.abs(candidates) - centre) ** 2 / (2.0 * variance)
        accepted = candidates[u[2 * batch :] < np.exp(-bias)][:missing]
        out[filled : filled + accepted.size] = accepted.astype(np.int64)
        filled += accepted.size
    return out


@dataclass(frozen=True)
class ShareCalibration:
    """Per-site noise shares and the privacy of their sum.

    Attributes
    ----------
    share_sigma
        Each site's noise parameter ``σ_share`` in encoded integer units: a site adds
        ``N_Z(0, σ_share²)`` to every coordinate (:func:`sample_discrete_gaussian`).
    min_honest
        ``threshold - colluding``: the number of sites whose shares the released sum is
        guaranteed to contain.
    effective_noise_multiplier
        ``z_eff = 1 / ε``: the sum is as private as one discrete Gaussian release with
        noise multiplier ``z_eff`` (``ρ = 1 / (2 z_eff²)``). Record it in the site's
        ledger as a ``"discrete_gaussian"`` event. Never above the requested ``z``.
    sensitivity
        L2 sensitivity ``Δ`` of the integer sum, in encoded units.
    rho
        The zCDP parameter of one release of the sum, ``1 / (2 z_eff²) = ε² / 2``.
    """

    share_sigma: float
    min_honest: int
    effective_noise_multiplier: float
    sensitivity: float
    rho: float


def calibrate_shares(
    *,
    noise_multiplier: float,
    sensitivity: float,
    dimension: int,
    threshold: int,
    colluding: int,
) -> ShareCalibration:
    """Size every site's noise share so the released sum carries ``z Δ`` of noise.

    With ``m = threshold - colluding`` and ``σ_total = z Δ`` (``z = noise_multiplier``,
    ``Δ = sensitivity``), each share gets ``σ_share = σ_total / sqrt(m)`` (rounded up to
    the next float if needed so that ``m σ_share² >= σ_total²``).

    Guarantee (KLS21, Theorem 1; its Rényi form is their Proposition 14). For ``m``
    independent ``N_Z(0, s²)`` vectors in ``Z^d`` with ``s >= 1/2`` and any integer shift
    ``Δ`` of L2 norm at most ``Δ₂`` and L1 norm at most ``Δ₁``, the Rényi divergence of
    order α between the sum and the shifted sum is at most the minimum of
    ``α a²/2 + τ d``, ``α/2 (a² + 2 a₁ τ + τ² d)`` and ``α/2 (a + τ sqrt(d))²``, with
    ``a = Δ₂ / (sqrt(m) s)``, ``a₁ = Δ₁ / (sqrt(m) s)`` and
    ``τ = 10 Σ_{j=1}^{m-1} exp(-2π² s² j / (j + 1))``. Since α >= 1, the sum satisfies
    ``ρ``-zCDP with ``ρ = ε² / 2`` and::

        ε = min( sqrt(a² + 2 τ d),  a + τ sqrt(d) ),

    where ``d = dimension`` and the L1 term is dropped because, knowing only ``Δ₂``,
    ``Δ₁ <= sqrt(d) Δ₂`` makes it equal to the third. Here ``ε >= 1/z`` and
    ``τ → 0`` quickly as ``s`` grows (``τ < 1e-16 m`` for ``s >= 2``), so ``z_eff``
    approaches ``z``. With ``m = 1``, ``τ = 0`` and ``ε = Δ / s = 1/z``, the single
    discrete Gaussian of CKS20, for any ``s > 0``.

    Note on the constant: the ``2 τ d`` under the root is what Proposition 14's first
    term gives for every α >= 1; a smaller constant there would not follow from it for
    α < 4. If the paper's Theorem 1 states a smaller constant, the ε here is larger,
    i.e. conservative.

    Parameters
    ----------
    noise_multiplier
        Target ``z``: the noise on the sum should be that of a discrete Gaussian with
        ``σ = z Δ``. Finite and > 0.
    sensitivity
        ``Δ``, the L2 sensitivity of the integer sum in encoded units (see
        :func:`encoded_sensitivity`). Finite and > 0.
    dimension
        Number of coordinates ``d`` each site contributes, >= 1.
    threshold
        Secure aggregation's threshold: fewer surviving sites reveal nothing.
    colluding
        Most sites that may collude with the aggregator, ``0 <= colluding < threshold``.

    Returns
    -------
    ShareCalibration

    Raises
    ------
    ConfigurationError
        A parameter is out of range, ``threshold <= colluding``, or ``σ_share < 1/2``
        with ``m >= 2`` (where KLS21's bound does not apply; raise the encoding scale).
    """
    z = _real(noise_multiplier, "noise_multiplier", positive=True)
    delta = _real(sensitivity, "sensitivity", positive=True)
    d = _integer(dimension, "dimension", minimum=1)
    k = _integer(threshold, "threshold", minimum=1)
    c = _integer(colluding, "colluding", minimum=0)
    if k <= c:
        raise ConfigurationError(
            f"threshold ({k}) must exceed colluding ({c}): otherwise no honest share is "
            "guaranteed to be in the sum"
        )
    m = k - c
    total = z * delta
    if not math.isfinite(total):
        raise ConfigurationError(f"noise_multiplier * sensitivity overflows: {z} * {delta}")
    share = total / math.sqrt(m)
    # Rounded up until m shares carry the whole variance however it is evaluated
    # (x ** 2 and x * x may round differently).
    while share * share * m < total * total or share**2 * m < total**2:
        share = math.nextafter(share, math.inf)
    if m >= 2 and share < 0.5:
        raise ConfigurationError(
            f"share sigma {share:.4g} is below 1/2, where the bound for sums of discrete "
            "Gaussians (Kairouz, Liu, Steinke 2021) does not hold; use a finer encoding scale"
        )
    a = delta / (math.sqrt(m) * share)
    tau = _tau(share, m)
    epsilon = min(math.sqrt(a * a + 2.0 * tau * d), a + tau * math.sqrt(d))
    # ε >= 1/z in exact arithmetic; the min keeps rounding from reporting z_eff > z.
    z_eff = min(z, 1.0 / epsilon)
    return ShareCalibration(
        share_sigma=share,
        min_honest=m,
        effective_noise_multiplier=z_eff,
        sensitivity=delta,
        rho=1.0 / (2.0 * z_eff * z_eff),
    )


def encoded_sensitivity(clip_bound: float, scale: float, dimension: int) -> float:
    """L2 sensitivity of a site's stochastically rounded sum: ``clip_bound·scale + √d``.

    Setting: a site sums its records' vectors, each of L2 norm at most ``clip_bound``,
    multiplies by ``scale`` and rounds every coordinate stochastically
    (:class:`~privacy.fixedpoint.FixedPointCodec`); neighbours add or remove one record,
    so before rounding the two sums ``u``, ``v`` differ by at most ``c = clip_bound·scale``
    in L2 norm.

    Why ``c + √d`` is valid although each rounding moves a coordinate by up to 1. Two
    *independent* roundings of ``u`` and ``v`` can differ by almost ``|u_i - v_i| + 2``
    per coordinate (e.g. ``-0.1`` and ``0.1`` rounding to ``-1`` and ``1``), which would
    give ``c + 2√d``. But privacy only needs *some* coupling of the two rounding
    distributions: stochastic rounding has the law of ``floor(x + U)`` with ``U``
    uniform on [0, 1), and with one ``U`` per coordinate for both,
    ``|floor(u_i + U) - floor(v_i + U)| <= ceil(|u_i - v_i|) < |u_i - v_i| + 1``, so every
    coupled pair of integer vectors is within ``c + √d`` in L2 norm (Minkowski). Each
    released distribution is the mixture, over that coupling, of the noise mechanism
    applied to a pair at that distance; ``exp((α-1) D_α)`` is jointly convex, so the
    Rényi (hence zCDP) bound for sensitivity ``c + √d`` holds for the mixtures too. This
    is the unconditional bound of KLS21 (their Theorem 1 with rounding, second case),
    which also give a tighter one for *conditional* randomized rounding that redraws
    roundings of large norm; that variant is not implemented here.

    Float64 rounding of ``x·scale`` (relative ``2**-53``) is not included.

    Raises
    ------
    ConfigurationError
        ``clip_bound`` or ``scale`` is not finite and > 0, or ``dimension`` < 1.
    """
    c = _real(clip_bound, "clip_bound", positive=True)
    s = _real(scale, "scale", positive=True)
    d = _integer(dimension, "dimension", minimum=1)
    value = c * s + math.sqrt(d)
    if not math.isfinite(value):
        raise ConfigurationError(f"clip_bound * scale overflows: {c} * {s}")
    return value


def wraparound_bits(
    *,
    num_sites: int,
    max_abs_encoded: float,
    share_sigma: float,
    failure_probability: float = 2**-40,
    dimension: int,
) -> tuple[int, float]:
    """Smallest modulus exponent whose aggregated sum stays in range but with tiny chance.

    Every coordinate of the sum is ``X + N`` with ``|X| <= n·B`` (``n = num_sites``
    contributions of magnitude at most ``B = max_abs_encoded``) and ``N`` the sum of
    ``n`` independent ``N_Z(0, s²)`` shares (``s = share_sigma``). The discrete Gaussian
    is ``s``-subgaussian, ``E[exp(λ Y)] <= exp(λ² s² / 2)`` for every real λ (CKS20), so
    ``N`` is ``sqrt(n)·s``-subgaussian and, by Chernoff, ``P[|N| >= λ] <= 2 exp(-λ² / (2 n
    s²))``. A coordinate leaves ``[-2**(k-1), 2**(k-1))`` only if ``|N| >= 2**(k-1) - nB``;
    a union bound over the ``d = dimension`` coordinates gives::

        bound(k) = min(1, 2 d exp(-(2**(k-1) - n B)² / (2 n s²)))   if 2**(k-1) > n B,

    and 1 otherwise (0 when ``s = 0`` and ``2**(k-1) > n B``). The returned ``k`` is the
    smallest in ``[2, 62]`` with ``bound(k) <= failure_probability``.

    Returns
    -------
    tuple[int, float]
        ``(k, bound(k))``. The bound may underflow to 0.0 when it is far below the target.

    Raises
    ------
    ConfigurationError
        An argument is out of range, or no ``k <= 62`` reaches ``failure_probability``.
    """
    n = _integer(num_sites, "num_sites", minimum=1)
    b = _real(max_abs_encoded, "max_abs_encoded", positive=False)
    s = _real(share_sigma, "share_sigma", positive=False)
    d = _integer(dimension, "dimension", minimum=1)
    p = failure_probability
    if not 0.0 < p < 1.0:
        raise ConfigurationError(f"failure_probability must be in (0, 1), got {p}")
    for bits in range(2, MAX_BITS + 1):
        bound = _wraparound_bound(bits, n, b, s, d)
        if bound <= p:
            return bits, bound
    raise ConfigurationError(
        f"{n} sites with |encoded| <= {b:.4g} and share sigma {s:.4g} in {d} coordinates "
        f"need more than {MAX_BITS} bits for a wrap-around probability of {p:.3g}; "
        "coarsen the encoding scale"
    )


def _wraparound_bound(bits: int, num_sites: int, max_abs: float, sigma: float, dim: int) -> float:
    margin = 2.0 ** (bits - 1) - num_sites * max_abs
    if margin <= 0.0:
        return 1.0
    if sigma == 0.0:
        return 0.0
    ratio = margin / sigma  # not margin² / σ²: σ² underflows for subnormal σ
    exponent = ratio * ratio / (2.0 * num_sites)
    return min(1.0, math.exp(math.log(2.0 * dim) - exponent))


def _tau(share_sigma: float, shares: int) -> float:
    """KLS21's ``τ = 10 Σ_{j=1}^{shares-1} exp(-2π² s² j / (j + 1))``."""
    if shares < 2:
        return 0.0
    j = np.arange(1, shares, dtype=np.float64)
    terms = np.exp(-2.0 * math.pi**2 * share_sigma**2 * j / (j + 1.0))
    return 10.0 * math.fsum(terms.tolist())


def _real(value: float, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigurationError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        relation = "> 0" if positive else ">= 0"
        raise ConfigurationError(f"{name} must be finite and {relation}, got {value}")
    return x


def _integer(value: int, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
