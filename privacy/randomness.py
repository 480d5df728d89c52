"""Sources of randomness for noise, stochastic rounding and protocol nonces.

Everything in :mod:`privacy` that samples takes a :class:`NoiseSource` argument instead of
reaching for a global generator, so production code passes :class:`SecureRandom` and tests
pass :class:`SeededRandom`.

:class:`SecureRandom` draws every bit from the operating system's CSPRNG (``os.urandom``),
so its noise cannot be predicted or replayed by someone who learns a seed. Its Gaussian
samples are computed in floating point, which leaves one known gap between the analysis
and the implementation: Mironov (CCS 2012, "On significance of the least significant bits
for differential privacy") showed that floating-point samplers produce an uneven set of
representable outputs whose low-order bits can reveal the input. The analysis of the
Gaussian mechanism assumes exact real-valued noise; a discrete Gaussian mechanism on the
integer lattice (Canonne, Kamath, Steinke 2020), which fedlens adds with distributed noise,
closes that gap.
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Protocol, runtime_checkable

import numpy as np

from fedlens.errors import ConfigurationError

__all__ = ["NoiseSource", "SecureRandom", "SeededRandom"]

_MANTISSA_BITS = 53
_UNIT = 2.0**-_MANTISSA_BITS


@runtime_checkable
class NoiseSource(Protocol):
    """What the privacy code needs from a random number generator."""

    def normal(self, size: int, std: float) -> np.ndarray:
        """``(size,)`` float64 samples of a centred Gaussian with standard deviation ``std``."""
        ...

    def uniform(self, size: int) -> np.ndarray:
        """``(size,)`` float64 samples, uniform on ``[0, 1)``."""
        ...

    def token_bytes(self, n: int) -> bytes:
        """``n`` uniformly random bytes."""
        ...


class SecureRandom:
    """The production source: every bit comes from ``os.urandom``.

    Uniforms are ``k / 2**53`` for a uniform 53-bit integer ``k``, so every float64 of that
    grid in ``[0, 1)`` is equally likely. Gaussians use the Box–Muller transform on pairs of
    such uniforms (``u1`` taken from ``(0, 1]`` so that its logarithm is finite).

    Guarantee and caveats: the samples are unpredictable to anyone without access to the
    operating system's CSPRNG. They are a floating-point approximation of the Gaussian: the
    smallest ``u1`` is ``2**-53``, so no sample exceeds ``sqrt(2 * 53 * ln 2) ≈ 8.57``
    standard deviations (the Gaussian mass beyond is below ``2e-17`` and can be charged to
    δ), and the floating-point attack of Mironov (CCS 2012) applies, as the module
    docstring explains.
    """

    def __repr__(self) -> str:
        return "SecureRandom()"

    def uniform(self, size: int) -> np.ndarray:
        n = _check_size(size)
        words = np.frombuffer(os.urandom(8 * n), dtype="<u8")
        return (words >> np.uint64(64 - _MANTISSA_BITS)).astype(np.float64) * _UNIT

    def normal(self, size: int, std: float) -> np.ndarray:
        n = _check_size(size)
        _check_std(std)
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 - u lies in (0, 1]
        angle = 2.0 * math.pi * u[pairs:]
        samples = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        return np.asarray(samples[:n] * std, dtype=np.float64)

    def token_bytes(self, n: int) -> bytes:
        return secrets.token_bytes(_check_size(n))


class SeededRandom:
    """A reproducible source for tests and examples only; never for released noise.

    It wraps :func:`numpy.random.default_rng` (PCG64), whose whole state follows from
    ``seed``: anyone who knows or guesses the seed can remove the noise.

    Parameters
    ----------
    seed
        Any non-negative integer.
    """

    def __init__(self, seed: int) -> None:
        if seed < 0:
            raise ConfigurationError(f"seed must be >= 0, got {seed}")
        self._seed = seed
        self._rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"SeededRandom({self._seed})"

    def uniform(self, size: int) -> np.ndarray:
        return self._rng.random(_check_size(size), dtype=np.float64)

    def normal(self, size: int, std: float) -> np.ndarray:
        n = _check_size(size)
        _check_std(std)
        return np.asarray(self._rng.normal(0.0, std, n), dtype=np.float64)

    def token_bytes(self, n: int) -> bytes:
        return self._rng.bytes(_check_size(n))


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
        raise ConfigurationError(f"size must be an integer >= 0, got {size!r}")
    return int(size)


def _check_std(std: float) -> None:
    if not math.isfinite(std) or std < 0:
        raise ConfigurationError(f"std must be finite and >= 0, got {std}")
