"""Fixed-point encoding of real vectors into the ring of integers modulo ``2**bits``.

Secure aggregation adds vectors modulo ``2**bits``; this codec maps reals to that ring and
back. A value ``x`` becomes ``round(x * scale)`` with *stochastic* rounding (up with
probability equal to the fractional part), which is unbiased, so the decoded sum of many
encodings has no systematic error; negative integers are stored in two's complement.

Guarantees, for a codec with ``bits`` and ``scale``:

* ``|decode(encode(x)) - x| < 1 / scale`` for every accepted ``x`` (float64 rounding of
  ``x * scale`` and of the decoded value adds at most about ``|x| * 2**-52`` to that);
* ``E[decode(encode(x))] = x`` (up to float64 rounding of ``x * scale``);
* the decoded modular sum of ``n`` encodings equals the sum of the integers, hence is
  within ``n / scale`` of the real sum, as long as that integer sum lies in
  ``[-2**(bits-1), 2**(bits-1))``; :meth:`FixedPointCodec.choose` picks ``bits`` so that
  it always does.

Storage is ``uint64``; since ``2**bits`` divides ``2**64``, numpy's wrap-around of uint64
arithmetic followed by masking with ``2**bits - 1`` is exact arithmetic modulo ``2**bits``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fedlens.errors import ConfigurationError, IntegrityError
from privacy.randomness import NoiseSource

__all__ = ["MAX_BITS", "FixedPointCodec"]

MAX_BITS = 62
"""Largest modulus exponent: encoded integers and their negatives fit in int64."""


@dataclass(frozen=True)
class FixedPointCodec:
    """Encode reals as integers modulo ``2**bits`` with ``1 / scale`` resolution.

    Attributes
    ----------
    bits
        Modulus exponent, ``1 < bits <= 62``.
    scale
        Values are multiplied by ``scale`` before rounding; finite and > 0.
    """

    bits: int
    scale: float

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigurationError(f"bits must be an integer in [2, 62], got {self.bits!r}")
        if not 1 < self.bits <= MAX_BITS:
            raise ConfigurationError(f"bits must be in [2, {MAX_BITS}], got {self.bits}")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ConfigurationError(f"scale must be finite and > 0, got {self.scale}")

    @property
    def modulus(self) -> int:
        """``2**bits``."""
        return 1 << self.bits

    @property
    def max_abs(self) -> float:
        """Largest magnitude :meth:`encode` accepts, about ``(2**(bits-1) - 1) / scale``."""
        limit = self._limit
        value = limit / self.scale
        while value * self.scale > limit:
            value = math.nextafter(value, 0.0)
        return value

    def site_limit(self, num_sites: int) -> float:
        """Largest magnitude one of ``num_sites`` sites may encode so that their sum, each
        rounded up by at most one step, stays within ``2**(bits-2)`` and cannot wrap."""
        return float((2 ** (self.bits - 2) / num_sites - 1) / self.scale)

    def encode(self, values: np.ndarray, rng: NoiseSource) -> np.ndarray:
        """Stochastically round ``values * scale`` and reduce modulo ``2**bits``.

        Parameters
        ----------
        values
            ``(m,)`` real array (any shape is accepted and kept).
        rng
            Source of the rounding uniforms; :class:`~privacy.randomness.SecureRandom`
            for released values.

        Returns
        -------
        numpy.ndarray
            uint64 of the same shape, every entry in ``[0, 2**bits)``.

        Raises
        ------
        IntegrityError
            An entry is NaN or infinite, or its magnitude exceeds :attr:`max_abs`; the
            message names its (flat) index.
        """
        x = np.asarray(values, dtype=np.float64)
        flat = x.reshape(-1)
        bad = ~np.isfinite(flat)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise IntegrityError(f"value at index {index} is {flat[index]}; it cannot be encoded")
        scaled = flat * self.scale
        over = np.abs(scaled) > self._limit
        if over.any():
            index = int(np.flatnonzero(over)[0])
            raise IntegrityError(
                f"value at index {index} is {flat[index]}, outside the representable range "
                f"±{self.max_abs:.6g} of a {self.bits}-bit codec with scale {self.scale}"
            )
        low = np.floor(scaled)
        up = rng.uniform(flat.size) < (scaled - low)
        integers = low.astype(np.int64) + up.astype(np.int64)
        encoded = integers.view(np.uint64) & self._mask
        return encoded.reshape(x.shape)

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """Map ring elements back to reals; ``v >= 2**(bits-1)`` stands for ``v - 2**bits``.

        Parameters
        ----------
        encoded
            Integer array, every entry in ``[0, 2**bits)``.

        Returns
        -------
        numpy.ndarray
            float64 of the same shape.

        Raises
        ------
        IntegrityError
            The array is not integer or an entry lies outside the ring.
        """
        v = self._check(encoded, "encoded")
        signed = v.astype(np.int64) - (v >= np.uint64(1 << (self.bits - 1))).astype(
            np.int64
        ) * np.int64(self.modulus)
        return signed.astype(np.float64) / self.scale

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``(a + b) mod 2**bits`` of two encodings of the same shape."""
        x, y = self._check(a, "a"), self._check(b, "b")
        if x.shape != y.shape:
            raise IntegrityError(f"cannot add encodings of shapes {x.shape} and {y.shape}")
        return np.asarray((x + y) & self._mask, dtype=np.uint64)

    def sum(self, encodings: Iterable[np.ndarray]) -> np.ndarray:
        """Sum modulo ``2**bits`` of encodings of one shape (a ``(k, m)`` array also works).

        Raises
        ------
        IntegrityError
            No encodings, differing shapes, or entries outside the ring.
        """
        total: np.ndarray | None = None
        for index, item in enumerate(encodings):
            v = self._check(item, f"encoding {index}")
            if total is None:
                total = v.copy()
            elif v.shape != total.shape:
                raise IntegrityError(
                    f"encoding {index} has shape {v.shape}, expected {total.shape}"
                )
            else:
                total += v  # wraps modulo 2**64, a multiple of 2**bits
                total &= self._mask
        if total is None:
            raise IntegrityError("sum of no encodings")
        return total

    @staticmethod
    def choose(num_sites: int, max_abs: float, precision: float) -> FixedPointCodec:
        """The smallest codec whose sum over ``num_sites`` values never wraps around.

        ``scale = 1 / precision`` and ``bits`` is the smallest with
        ``num_sites * (max_abs * scale + 1) <= 2**(bits - 2)``; the ``+ 1`` covers
        stochastic rounding up.

        Guarantee: if every site encodes a value with ``|v| <= max_abs``, each encoded
        integer has magnitude at most ``max_abs * scale + 1``, so the integer sum has
        magnitude at most ``2**(bits - 2)``, half of the ``2**(bits - 1)`` at which the
        modular sum would wrap: the decoded sum is exact up to rounding, within
        ``num_sites * precision`` of the real sum.

        Raises
        ------
        ConfigurationError
            An argument is out of range, or more than 62 bits would be needed.
        """
        if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
            raise ConfigurationError(f"num_sites must be an integer >= 1, got {num_sites!r}")
        if not math.isfinite(max_abs) or max_abs < 0:
            raise ConfigurationError(f"max_abs must be finite and >= 0, got {max_abs}")
        if not math.isfinite(precision) or precision <= 0:
            raise ConfigurationError(f"precision must be finite and > 0, got {precision}")
        scale = 1.0 / precision
        if not math.isfinite(scale):
            raise ConfigurationError(f"precision {precision} is too small")
        needed = num_sites * (max_abs * scale + 1.0)
        bits = 2
        while bits <= MAX_BITS and needed > 2.0 ** (bits - 2):
            bits += 1
        if bits > MAX_BITS:
            raise ConfigurationError(
                f"{num_sites} sites with |value| <= {max_abs} at precision {precision} need "
                f"more than {MAX_BITS} bits; coarsen the precision or the clip bound"
            )
        return FixedPointCodec(bits=bits, scale=scale)

    @property
    def _limit(self) -> float:
        """Largest float ``|x * scale|`` whose rounding stays below ``2**(bits-1)``."""
        half = 1 << (self.bits - 1)
        # Above 2**53, float(half - 1) rounds up to half, which would wrap to -half.
        return min(float(half - 1), math.nextafter(float(half), 0.0))

    @property
    def _mask(self) -> np.uint64:
        return np.uint64(self.modulus - 1)

    def _check(self, encoded: np.ndarray, name: str) -> np.ndarray:
        array = np.asarray(encoded)
        if array.dtype.kind not in "ui":
            raise IntegrityError(f"{name} must be an integer array, got dtype {array.dtype}")
        if array.dtype.kind == "i" and array.size and int(array.min()) < 0:
            raise IntegrityError(f"{name} has a negative entry; ring elements are >= 0")
        v = array.astype(np.uint64)
        if v.size and int(v.max()) >= self.modulus:
            index = int(np.argmax(v.reshape(-1) >= np.uint64(self.modulus)))
            raise IntegrityError(f"{name} entry at index {index} is outside [0, 2**{self.bits})")
        return v
