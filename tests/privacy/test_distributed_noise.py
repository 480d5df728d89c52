"""Distributed discrete Gaussian shares: sampler, calibration, sensitivity and modulus size."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import special, stats

from fedlens.errors import ConfigurationError
from privacy import (
    SecureRandom,
    SeededRandom,
    calibrate_shares,
    encoded_sensitivity,
    epsilon_of_discrete_gaussian,
    sample_discrete_gaussian,
    wraparound_bits,
)

DRAWS = 100_000
# A correct sampler fails a test at this level once in a million runs per seed.
ALPHA = 1e-6


def _pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Support and exact probabilities of N_Z(0, sigma²), truncated where mass < 1e-300."""
    half = int(40 * sigma) + 40
    k = np.arange(-half, half + 1)
    weights = np.exp(-(k.astype(np.float64) ** 2) / (2 * sigma * sigma))
    return k, weights / weights.sum()


class _UniformOnly:
    """A source that counts uniforms and refuses every other kind of draw."""

    def __init__(self, seed: int) -> None:
        self._inner = SeededRandom(seed)
        self.uniforms = 0

    def uniform(self, size: int) -> np.ndarray:
        self.uniforms += size
        return self._inner.uniform(size)

    def normal(self, size: int, std: float) -> np.ndarray:
        raise AssertionError("the sampler must not draw continuous Gaussians")

    def token_bytes(self, n: int) -> bytes:
        raise AssertionError("the sampler draws only uniforms")


# --- sampler -------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0, 2.5, 12.0, 150.0])
def test_sample_frequencies_match_the_exact_pmf(sigma: float) -> None:
    draws = sample_discrete_gaussian(DRAWS, sigma, SeededRandom(11))
    support, pmf = _pmf(sigma)
    expected = pmf * DRAWS
    # Bins: each integer whose expected count is >= 5, plus the two pooled tails.
    inner = expected >= 5
    lo, hi = int(support[inner][0]), int(support[inner][-1])
    counts = np.bincount(np.clip(draws, lo - 1, hi + 1) - (lo - 1), minlength=hi - lo + 3)
    want = np.concatenate(
        [[expected[support < lo].sum()], expected[inner], [expected[support > hi].sum()]]
    )
    keep = want > 0
    observed, want = counts[keep], want[keep]
    statistic = float(np.sum((observed - want) ** 2 / want))
    assert statistic < stats.chi2.isf(ALPHA, df=want.size - 1)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 7.0, 1000.0])
def test_sample_mean_and_variance_match_within_their_standard_errors(sigma: float) -> None:
    draws = sample_discrete_gaussian(DRAWS, sigma, SeededRandom(5)).astype(np.float64)
    support, pmf = _pmf(sigma)
    variance = float(np.sum(pmf * support.astype(np.float64) ** 2))
    fourth = float(np.sum(pmf * support.astype(np.float64) ** 4))
    z = stats.norm.isf(ALPHA / 2)  # two-sided, ≈ 4.9 standard errors
    assert abs(draws.mean()) <= z * math.sqrt(variance / DRAWS)
    assert abs(np.mean(draws**2) - variance) <= z * math.sqrt((fourth - variance**2) / DRAWS)
    # CKS20: the variance is below σ² (by less than float precision once σ is a few units).
    assert variance <= sigma**2 * (1 + 1e-12)


def test_zero_sigma_and_empty_requests() -> None:
    zeros = sample_discrete_gaussian(7, 0.0, SeededRandom(0))
    assert zeros.dtype == np.int64 and zeros.tolist() == [0] * 7
    empty = sample_discrete_gaussian(0, 3.0, SeededRandom(0))
    assert empty.dtype == np.int64 and empty.shape == (0,)


def test_all_randomness_comes_from_the_source_and_is_reproducible() -> None:
    source = _UniformOnly(3)
    first = sample_discrete_gaussian(5_000, 4.2, source)
    assert source.uniforms > 0
    again = sample_discrete_gaussian(5_000, 4.2, _UniformOnly(3))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, sample_discrete_gaussian(5_000, 4.2, _UniformOnly(4)))


def test_a_million_coordinates_is_fast_with_the_secure_source() -> None:
    start = time.perf_counter()
    draws = sample_discrete_gaussian(1_000_000, 30.0, SecureRandom())
    elapsed = time.perf_counter() - start
    assert draws.shape == (1_000_000,) and draws.dtype == np.int64
    assert elapsed < 5.0  # about 0.2 s on a laptop; generous for loaded CI machines


@pytest.mark.parametrize(
    ("size", "sigma", "message"),
    [
        (-1, 1.0, "size must be an integer >= 0"),
        (2.5, 1.0, "size must be an integer >= 0"),
        (True, 1.0, "size must be an integer >= 0"),
        (3, -0.1, "sigma must be finite and >= 0"),
        (3, math.nan, "sigma must be finite and >= 0"),
        (3, math.inf, "sigma must be finite and >= 0"),
        (3, 2.0**47, "sigma must be <= 2\\*\\*46"),
    ],
)
def test_sampler_rejects_bad_arguments(size: int, sigma: float, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        sample_discrete_gaussian(size, sigma, SeededRandom(0))


# --- calibration ---------------------------------------------------------------------


def _expected_epsilon(share: float, m: int, sensitivity: float, d: int) -> float:
    """KLS21 Theorem 1 as stated in the module, written out independently."""
    tau = 10 * sum(math.exp(-2 * math.pi**2 * share**2 * j / (j + 1)) for j in range(1, m))
    a = sensitivity / (math.sqrt(m) * share)
    return min(math.sqrt(a * a + 2 * tau * d), a + tau * math.sqrt(d))


@st.composite
def _settings(draw: st.DrawFn) -> dict[str, float | int]:
    threshold = draw(st.integers(1, 300))
    return {
        "noise_multiplier": draw(st.floats(0.2, 20.0)),
        "sensitivity": draw(st.floats(1.0, 1e5)),
        "dimension": draw(st.integers(1, 10**7)),
        "threshold": threshold,
        "colluding": draw(st.integers(0, threshold - 1)),
    }


@given(_settings())
@settings(max_examples=200, deadline=None)
def test_sum_is_never_more_private_than_one_gaussian_of_the_same_variance(
    kwargs: dict[str, float | int],
) -> None:
    try:
        cal = calibrate_shares(**kwargs)  # type: ignore[arg-type]
    except ConfigurationError:
        assume(False)
        raise
    z, delta = float(kwargs["noise_multiplier"]), float(kwargs["sensitivity"])
    m = int(kwargs["threshold"]) - int(kwargs["colluding"])
    assert cal.min_honest == m
    assert cal.share_sigma**2 * m >= (z * delta) ** 2  # honest shares carry the full noise
    assert cal.effective_noise_multiplier <= z
    assert cal.rho == pytest.approx(1 / (2 * cal.effective_noise_multiplier**2), rel=1e-12)
    expected = _expected_epsilon(cal.share_sigma, m, delta, int(kwargs["dimension"]))
    assert cal.effective_noise_multiplier == pytest.approx(min(z, 1 / expected), rel=1e-9)


@given(_settings())
@settings(max_examples=200, deadline=None)
def test_large_shares_lose_almost_nothing_against_central_noise(
    kwargs: dict[str, float | int],
) -> None:
    m = int(kwargs["threshold"]) - int(kwargs["colluding"])
    assume(float(kwargs["noise_multiplier"]) * float(kwargs["sensitivity"]) / math.sqrt(m) >= 3)
    cal = calibrate_shares(**kwargs)  # type: ignore[arg-type]
    z = float(kwargs["noise_multiplier"])
    assert 0 <= (z - cal.effective_noise_multiplier) / z <= 1e-9


@given(_settings())
@settings(max_examples=100, deadline=None)
def test_more_colluders_or_a_lower_threshold_need_larger_shares(
    kwargs: dict[str, float | int],
) -> None:
    threshold, colluding = int(kwargs["threshold"]), int(kwargs["colluding"])
    assume(threshold - colluding >= 2)
    base = dict(kwargs, noise_multiplier=max(float(kwargs["noise_multiplier"]), 1.0))
    try:
        cal = calibrate_shares(**base)  # type: ignore[arg-type]
    except ConfigurationError:
        assume(False)
        raise
    more_colluders = calibrate_shares(**dict(base, colluding=colluding + 1))  # type: ignore[arg-type]
    lower_threshold = calibrate_shares(**dict(base, threshold=threshold - 1))  # type: ignore[arg-type]
    assert more_colluders.share_sigma > cal.share_sigma
    assert lower_threshold.share_sigma > cal.share_sigma


def test_one_honest_share_is_exactly_the_central_discrete_gaussian() -> None:
    cal = calibrate_shares(
        noise_multiplier=1.3, sensitivity=0.2, dimension=10**6, threshold=4, colluding=3
    )
    assert cal.min_honest == 1
    assert cal.share_sigma == pytest.approx(0.26)  # below 1/2 is fine with one share
    assert cal.effective_noise_multiplier == pytest.approx(1.3, rel=1e-12)


def test_small_shares_pay_for_the_sum_and_the_ledger_charges_more() -> None:
    cal = calibrate_shares(
        noise_multiplier=1.0, sensitivity=1.2, dimension=3, threshold=3, colluding=1
    )
    share = 1.2 / math.sqrt(2)
    tau = 10 * math.exp(-(math.pi**2) * share**2)
    a = 1.2 / (math.sqrt(2) * share)
    epsilon = min(math.sqrt(a * a + 6 * tau), a + tau * math.sqrt(3))
    assert cal.effective_noise_multiplier == pytest.approx(1 / epsilon, rel=1e-12)
    assert cal.effective_noise_multiplier < 0.999
    charged = epsilon_of_discrete_gaussian(cal.effective_noise_multiplier, 1e-6)
    assert charged > epsilon_of_discrete_gaussian(1.0, 1e-6)


def _log_renyi_terms(p: np.ndarray, alpha: float) -> float:
    """D_α(Z || Z + 1) for a pmf p on consecutive integers, in log space."""
    a, b = p[1:], p[:-1]
    keep = (a > 0) & (b > 0)
    la, lb = np.log(a[keep]), np.log(b[keep])
    return float(special.logsumexp(la + (alpha - 1) * (la - lb))) / (alpha - 1)


@pytest.mark.parametrize(("z", "threshold"), [(1.0, 2), (0.9, 3), (1.1, 4), (2.0, 6), (0.75, 2)])
def test_renyi_divergence_of_the_exact_sum_stays_under_the_bound(z: float, threshold: int) -> None:
    cal = calibrate_shares(
        noise_multiplier=z, sensitivity=1.0, dimension=1, threshold=threshold, colluding=0
    )
    _, one = _pmf(cal.share_sigma)
    total = one
    for _ in range(threshold - 1):
        total = np.convolve(total, one)
    for alpha in (1.01, 1.5, 2.0, 4.0, 8.0, 32.0):
        assert _log_renyi_terms(total, alpha) <= alpha * cal.rho


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"threshold": 3, "colluding": 3}, "threshold \\(3\\) must exceed colluding \\(3\\)"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be finite and > 0"),
        ({"sensitivity": -1.0}, "sensitivity must be finite and > 0"),
        ({"sensitivity": math.nan}, "sensitivity must be finite and > 0"),
        ({"dimension": 0}, "dimension must be an integer >= 1"),
        ({"colluding": -1}, "colluding must be an integer >= 0"),
        ({"noise_multiplier": 0.5, "sensitivity": 1.0}, "share sigma .* below 1/2"),
    ],
)
def test_calibration_rejects_bad_settings(change: dict[str, float], message: str) -> None:
    kwargs: dict[str, float] = {
        "noise_multiplier": 1.0,
        "sensitivity": 10.0,
        "dimension": 5,
        "threshold": 5,
        "colluding": 1,
    }
    with pytest.raises(ConfigurationError, match=message):
        calibrate_shares(**(kwargs | change))  # type: ignore[arg-type]


# --- sensitivity ---------------------------------------------------------------------


def test_encoded_sensitivity_value_and_arguments() -> None:
    assert encoded_sensitivity(1.5, 100.0, 16) == 154.0
    with pytest.raises(ConfigurationError, match="clip_bound must be finite and > 0"):
        encoded_sensitivity(0.0, 100.0, 4)
    with pytest.raises(ConfigurationError, match="scale must be finite and > 0"):
        encoded_sensitivity(1.0, math.inf, 4)
    with pytest.raises(ConfigurationError, match="dimension must be an integer >= 1"):
        encoded_sensitivity(1.0, 1.0, 0)


@given(
    seed=st.integers(0, 2**32 - 1),
    dimension=st.integers(1, 64),
    clip=st.floats(0.01, 10.0),
    scale=st.floats(0.5, 1e4),
)
@settings(max_examples=100, deadline=None)
def test_coupled_stochastic_roundings_stay_within_the_sensitivity(
    seed: int, dimension: int, clip: float, scale: float
) -> None:
    generator = np.random.default_rng(seed)
    u = generator.normal(0, 50, dimension)
    step = generator.normal(0, 1, dimension)
    v = u + step / np.linalg.norm(step) * clip * generator.random()
    shared = generator.random(dimension)
    rounded_u = np.floor(u * scale + shared)
    rounded_v = np.floor(v * scale + shared)
    bound = encoded_sensitivity(clip, scale, dimension)
    assert np.linalg.norm(rounded_u - rounded_v) <= bound * (1 + 1e-12)


# --- modulus -------------------------------------------------------------------------


def _bound(bits: int, sites: int, max_abs: float, sigma: float, dim: int) -> float:
    margin = 2.0 ** (bits - 1) - sites * max_abs
    if margin <= 0:
        return 1.0
    if sigma == 0:
        return 0.0
    ratio = margin / sigma
    return min(1.0, 2 * dim * math.exp(-ratio * ratio / (2 * sites)))


@given(
    sites=st.integers(1, 10_000),
    max_abs=st.floats(0.0, 1e9),
    sigma=st.floats(0.0, 1e6),
    dim=st.integers(1, 10**7),
    log2_p=st.integers(-80, -1),
)
@settings(max_examples=200, deadline=None)
def test_wraparound_bits_is_the_smallest_meeting_the_bound_and_monotone(
    sites: int, max_abs: float, sigma: float, dim: int, log2_p: int
) -> None:
    p = 2.0**log2_p
    bits, bound = wraparound_bits(
        num_sites=sites, max_abs_encoded=max_abs, share_sigma=sigma,
        failure_probability=p, dimension=dim,
    )  # fmt: skip
    assert bound <= p
    assert bound == pytest.approx(_bound(bits, sites, max_abs, sigma, dim), rel=1e-9, abs=1e-300)
    if bits > 2:
        assert _bound(bits - 1, sites, max_abs, sigma, dim) > p
    more_sites, _ = wraparound_bits(
        num_sites=sites + 1, max_abs_encoded=max_abs, share_sigma=sigma,
        failure_probability=p, dimension=dim,
    )  # fmt: skip
    more_noise, _ = wraparound_bits(
        num_sites=sites, max_abs_encoded=max_abs, share_sigma=sigma * 2 + 1,
        failure_probability=p, dimension=dim,
    )  # fmt: skip
    assert more_sites >= bits and more_noise >= bits


def test_monte_carlo_wraparound_frequency_is_below_the_bound() -> None:
    sites, max_abs, sigma, dim = 3, 2.0, 4.0, 8
    bits, bound = wraparound_bits(
        num_sites=sites, max_abs_encoded=max_abs, share_sigma=sigma,
        failure_probability=0.5, dimension=dim,
    )  # fmt: skip
    assert bits == 6 and 0.01 < bound <= 0.5
    trials = 20_000
    rng = SeededRandom(9)
    noise = sum(
        sample_discrete_gaussian(trials * dim, sigma, rng).reshape(trials, dim)
        for _ in range(sites)
    )
    total = noise + int(sites * max_abs)  # worst case: every contribution at +max_abs
    half = 2 ** (bits - 1)
    wrapped = np.any((total < -half) | (total >= half), axis=1)
    frequency = float(wrapped.mean())
    # The bound must hold with room for sampling error (one-sided, ALPHA).
    slack = stats.norm.isf(ALPHA) * math.sqrt(bound * (1 - bound) / trials)
    assert frequency <= bound + slack
    assert frequency > 0  # the test is not vacuous at this small modulus


def test_wraparound_bits_rejects_bad_arguments() -> None:
    base: dict[str, float] = {
        "num_sites": 3, "max_abs_encoded": 10.0, "share_sigma": 1.0, "dimension": 4,
    }  # fmt: skip
    with pytest.raises(ConfigurationError, match="failure_probability must be in"):
        wraparound_bits(**(base | {"failure_probability": 0.0}))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="num_sites must be an integer >= 1"):
        wraparound_bits(**(base | {"num_sites": 0}))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="share_sigma must be finite and >= 0"):
        wraparound_bits(**(base | {"share_sigma": -1.0}))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="need more than 62 bits"):
        wraparound_bits(**(base | {"max_abs_encoded": 2.0**61}))  # type: ignore[arg-type]
