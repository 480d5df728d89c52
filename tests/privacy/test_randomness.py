"""Noise sources: ranges, moments, reproducibility of the seeded source only."""

from __future__ import annotations

import numpy as np
import pytest

from fedlens.errors import ConfigurationError
from privacy import NoiseSource, SecureRandom, SeededRandom

SOURCES = [SecureRandom(), SeededRandom(7)]


@pytest.mark.parametrize("rng", SOURCES, ids=repr)
def test_sources_satisfy_the_protocol(rng: NoiseSource) -> None:
    assert isinstance(rng, NoiseSource)


@pytest.mark.parametrize("rng", SOURCES, ids=repr)
def test_uniform_is_float64_in_unit_interval_with_the_right_mean(rng: NoiseSource) -> None:
    u = rng.uniform(200_000)
    assert u.dtype == np.float64 and u.shape == (200_000,)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1 / 12) < 0.002


@pytest.mark.parametrize("rng", SOURCES, ids=repr)
@pytest.mark.parametrize("size", [0, 1, 2, 3, 1001])
def test_normal_has_the_requested_size(rng: NoiseSource, size: int) -> None:
    x = rng.normal(size, 2.0)
    assert x.dtype == np.float64 and x.shape == (size,)


@pytest.mark.parametrize("rng", SOURCES, ids=repr)
def test_normal_moments_and_tails(rng: NoiseSource) -> None:
    std = 3.0
    x = rng.normal(400_001, std)
    assert abs(x.mean()) < 0.03
    assert abs(x.std() / std - 1) < 0.01
    # Both halves of each Box–Muller pair are used: no correlation between neighbours.
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 0.01
    # Gaussian tail mass beyond 2 std is 4.55 %.
    assert abs(np.mean(np.abs(x) > 2 * std) - 0.0455) < 0.002
    assert np.isfinite(x).all()


def test_zero_std_gives_zeros() -> None:
    assert not SecureRandom().normal(5, 0.0).any()


@pytest.mark.parametrize("rng", SOURCES, ids=repr)
def test_token_bytes(rng: NoiseSource) -> None:
    a, b = rng.token_bytes(32), rng.token_bytes(32)
    assert len(a) == 32 and a != b
    assert rng.token_bytes(0) == b""


def test_seeded_source_is_reproducible_and_secure_source_is_not() -> None:
    assert np.array_equal(SeededRandom(3).normal(10, 1.0), SeededRandom(3).normal(10, 1.0))
    assert not np.array_equal(SeededRandom(3).uniform(10), SeededRandom(4).uniform(10))
    assert not np.array_equal(SecureRandom().uniform(10), SecureRandom().uniform(10))


@pytest.mark.parametrize("rng", SOURCES, ids=repr)
def test_invalid_arguments_are_configuration_errors(rng: NoiseSource) -> None:
    with pytest.raises(ConfigurationError, match="size"):
        rng.uniform(-1)
    with pytest.raises(ConfigurationError, match="std"):
        rng.normal(3, -1.0)
    with pytest.raises(ConfigurationError, match="std"):
        rng.normal(3, float("nan"))
    with pytest.raises(ConfigurationError, match="size"):
        rng.token_bytes(-2)


def test_negative_seed_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="seed"):
        SeededRandom(-1)
