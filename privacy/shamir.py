"""Shamir secret sharing over the prime field of ``p = 2**521 - 1`` (Shamir, CACM 1979).

Secure aggregation (Bonawitz et al., CCS 2017, §4) has every site share two secrets with
its neighbours: the seed of its self mask and its pairwise-mask private key. If the site
drops out, the aggregator gathers shares of its key to remove its pairwise masks; if it
survives, shares of its self-mask seed. This module is the sharing itself.

A secret of at most 64 bytes is read as a big-endian integer ``s < 2**512 < p`` and
becomes the constant term of a polynomial ``f(X) = s + a_1 X + … + a_{t-1} X^{t-1}`` whose
other coefficients are uniform in ``[0, p)``; the share of the party at ``x`` is
``(x, f(x))``.

Guarantees, for threshold ``t``:

* any ``t`` shares with distinct ``x`` determine ``f`` and hence the secret;
* any ``t - 1`` shares are uniformly distributed and independent of the secret (perfect
  secrecy): for every candidate secret there is exactly one polynomial of degree
  ``t - 1`` through them, reached from the actual coefficients by a bijection;
* given more than ``t`` shares, :func:`combine_shares` checks that they all lie on one
  polynomial of degree ``t - 1``, so a single corrupted share among them is detected rather
  than silently changing the secret. With exactly ``t`` shares nothing can be checked.

Assumptions: the coefficients come from a CSPRNG (``secrets.token_bytes`` by default); the
``x`` coordinates are public and distinct. Shares carry no authentication: a party that
tampers with its share and is among the first ``t`` used changes the result unless extra
shares are available to expose it. Nothing secret is cached between calls; a ``y`` value
is below ``2**521`` and travels as 66 big-endian bytes.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fedlens.errors import ConfigurationError, IntegrityError

__all__ = [
    "FIELD_PRIME",
    "MAX_SECRET_BYTES",
    "MAX_X",
    "SHARE_BYTES",
    "Share",
    "combine_shares",
    "split_secret",
]

FIELD_PRIME = 2**521 - 1
"""The Mersenne prime ``2**521 - 1``; every share value lies in ``[0, FIELD_PRIME)``."""

SHARE_BYTES = 66
"""Bytes of one big-endian ``y`` value (521 bits round up to 66 bytes)."""

MAX_SECRET_BYTES = 64
"""Longest secret accepted; ``2**512 < FIELD_PRIME``, so every such secret is a field element."""

MAX_X = 0xFFFF
"""Largest ``x`` coordinate; it is encoded in two bytes."""

_X_BYTES = 2
_ENCODED_BYTES = _X_BYTES + SHARE_BYTES
_FIELD_BITS = 521


@dataclass(frozen=True)
class Share:
    """One party's share ``(x, f(x))``. ``y`` is secret and kept out of ``repr``.

    Attributes
    ----------
    x
        The party's public evaluation point, in ``[1, 65535]``.
    y
        The polynomial's value at ``x``, in ``[0, FIELD_PRIME)``.

    Raises
    ------
    IntegrityError
        On construction, if ``x`` or ``y`` is not an integer in its range.
    """

    x: int
    y: int = field(repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.x, bool) or not isinstance(self.x, int) or not 1 <= self.x <= MAX_X:
            raise IntegrityError(f"share x must be an integer in [1, {MAX_X}], got {self.x!r}")
        if isinstance(self.y, bool) or not isinstance(self.y, int) or not 0 <= self.y < FIELD_PRIME:
            raise IntegrityError(f"share y (x={self.x}) must be an integer in [0, 2**521 - 1)")

    def to_bytes(self) -> bytes:
        """68 bytes: ``x`` as 2 big-endian bytes, then ``y`` as 66 big-endian bytes."""
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Decode the 68-byte form written by :meth:`to_bytes`.

        Raises
        ------
        IntegrityError
            ``data`` is not 68 bytes, ``x`` is 0, or ``y`` is not below ``FIELD_PRIME``.
        """
        if not isinstance(data, bytes | bytearray) or len(data) != _ENCODED_BYTES:
            size = len(data) if isinstance(data, bytes | bytearray) else "not bytes"
            raise IntegrityError(f"an encoded share must be {_ENCODED_BYTES} bytes, got {size}")
        x = int.from_bytes(data[:_X_BYTES], "big")
        y = int.from_bytes(data[_X_BYTES:], "big")
        return cls(x=x, y=y)


def split_secret(
    secret: bytes,
    threshold: int,
    xs: Sequence[int],
    *,
    token_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> list[Share]:
    """Share ``secret`` so that any ``threshold`` of the returned shares recover it.

    The coefficients ``a_1, …, a_{t-1}`` are drawn in that order, each by rejection
    sampling: call ``token_bytes(66)``, read the bytes big-endian, keep the low 521 bits,
    and draw again if the value is ``FIELD_PRIME`` (probability ``2**-521``). The result is
    uniform in ``[0, FIELD_PRIME)`` whenever ``token_bytes`` is uniform.

    Parameters
    ----------
    secret
        At most 64 bytes, read as a big-endian integer (leading zero bytes are not kept;
        :func:`combine_shares` restores the length it is given).
    threshold
        ``t``, the number of shares needed; ``1 <= t <= len(xs)``. The polynomial has degree
        ``t - 1``; ``t = 1`` gives every party the secret itself.
    xs
        Distinct evaluation points in ``[1, 65535]``, one per party.
    token_bytes
        Source of random bytes; the default is the operating system's CSPRNG. Tests pass a
        seeded source to obtain reproducible shares.

    Returns
    -------
    list[Share]
        One share per entry of ``xs``, in the same order.

    Raises
    ------
    ConfigurationError
        The secret is too long, ``threshold`` is out of range, an ``x`` is out of range or
        repeated, or ``token_bytes`` returns the wrong number of bytes.
    """
    if not isinstance(secret, bytes | bytearray):
        raise ConfigurationError(f"secret must be bytes, got {type(secret).__name__}")
    if len(secret) > MAX_SECRET_BYTES:
        raise ConfigurationError(
            f"secret must be at most {MAX_SECRET_BYTES} bytes, got {len(secret)}"
        )
    points = _check_xs(xs)
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ConfigurationError(f"threshold must be an integer, got {threshold!r}")
    if not 1 <= threshold <= len(points):
        raise ConfigurationError(
            f"threshold must be in [1, {len(points)}] (the number of xs), got {threshold}"
        )
    constant = int.from_bytes(secret, "big")
    coefficients = [_random_element(token_bytes) for _ in range(threshold - 1)]
    shares = []
    for x in points:
        value = 0
        for coefficient in reversed(coefficients):  # Horner, highest degree first
            value = (value + coefficient) * x % FIELD_PRIME
        shares.append(Share(x=x, y=(value + constant) % FIELD_PRIME))
    return shares


def combine_shares(shares: Sequence[Share], threshold: int, secret_len: int) -> bytes:
    """Recover the secret by Lagrange interpolation at 0, checking any extra shares.

    The polynomial is interpolated through the first ``threshold`` shares; each further
    share must lie on it. Cost: ``O(t**2)`` small-integer products and one modular inverse
    for the Lagrange weights, then ``O(t)`` field multiplications per evaluation (at 0 and
    at each extra share).

    Parameters
    ----------
    shares
        At least ``threshold`` shares with distinct ``x``, in any order.
    threshold
        ``t`` used when splitting, ``>= 1``.
    secret_len
        Length in bytes of the secret, in ``[0, 64]``.

    Returns
    -------
    bytes
        The secret as ``secret_len`` big-endian bytes.

    Raises
    ------
    IntegrityError
        Fewer than ``threshold`` shares, two shares with the same ``x``, more than
        ``threshold`` shares that do not lie on one polynomial of degree ``threshold - 1``
        (a corrupted share), or an interpolated value that does not fit in ``secret_len``
        bytes (a wrong threshold or corrupted shares).
    ConfigurationError
        ``threshold`` or ``secret_len`` is out of range.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigurationError(f"threshold must be an integer >= 1, got {threshold!r}")
    if (
        isinstance(secret_len, bool)
        or not isinstance(secret_len, int)
        or not 0 <= secret_len <= MAX_SECRET_BYTES
    ):
        raise ConfigurationError(
            f"secret_len must be an integer in [0, {MAX_SECRET_BYTES}], got {secret_len!r}"
        )
    for share in shares:
        if not isinstance(share, Share):
            raise IntegrityError(f"expected Share objects, got {type(share).__name__}")
    if len(shares) < threshold:
        raise IntegrityError(f"{len(shares)} shares given, at least {threshold} are needed")
    seen: set[int] = set()
    for share in shares:
        if share.x in seen:
            raise IntegrityError(f"two shares have x = {share.x}")
        seen.add(share.x)

    basis = [share.x for share in shares[:threshold]]
    values = [share.y for share in shares[:threshold]]
    weights = _barycentric_weights(tuple(basis))
    for extra in shares[threshold:]:
        expected = _evaluate(basis, values, weights, extra.x)
        # Compare in constant time: both sides are secret-derived field elements.
        if not hmac.compare_digest(
            expected.to_bytes(SHARE_BYTES, "big"), extra.y.to_bytes(SHARE_BYTES, "big")
        ):
            raise IntegrityError(
                f"the shares are inconsistent: the share at x = {extra.x} does not lie on the "
                f"polynomial through the first {threshold}"
            )
    secret = _evaluate(basis, values, weights, 0)
    if secret >> (8 * secret_len):
        raise IntegrityError(
            f"the interpolated value does not fit in {secret_len} bytes: wrong threshold "
            "or corrupted shares"
        )
    return secret.to_bytes(secret_len, "big")


def _check_xs(xs: Sequence[int]) -> list[int]:
    points = list(xs)
    seen: set[int] = set()
    for x in points:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= MAX_X:
            raise ConfigurationError(f"every x must be an integer in [1, {MAX_X}], got {x!r}")
        if x in seen:
            raise ConfigurationError(f"xs must be distinct; {x} appears twice")
        seen.add(x)
    return points


def _random_element(token_bytes: Callable[[int], bytes]) -> int:
    """A uniform element of ``[0, FIELD_PRIME)`` by masking to 521 bits and rejecting ``p``."""
    while True:
        raw = token_bytes(SHARE_BYTES)
        if not isinstance(raw, bytes | bytearray) or len(raw) != SHARE_BYTES:
            size = len(raw) if isinstance(raw, bytes | bytearray) else "not bytes"
            raise ConfigurationError(
                f"token_bytes({SHARE_BYTES}) must return {SHARE_BYTES} bytes, got {size}"
            )
        candidate = int.from_bytes(raw, "big") & FIELD_PRIME  # p = 2**521 - 1 is the bit mask
        if candidate < FIELD_PRIME:
            return candidate


@functools.lru_cache(maxsize=64)
def _barycentric_weights(xs: tuple[int, ...]) -> list[int]:
    """``w_i = 1 / prod_{j != i} (x_i - x_j)`` modulo ``p``, with one modular inverse.

    They depend only on the public x-coordinates, so they are cached: an aggregator that
    rebuilds many secrets from the same sites' shares computes them once. Callers must
    not modify the returned list.

    The differences are below ``2**16`` in magnitude, so each product is formed from small
    integers before a single reduction; the ``t`` inverses share one ``pow(·, -1, p)``
    (Montgomery's batch inversion).
    """
    denominators = []
    for i, xi in enumerate(xs):
        product = 1
        for j, xj in enumerate(xs):
            if i != j:
                product *= xi - xj
        denominators.append(product % FIELD_PRIME)
    return _batch_inverse(denominators)


def _batch_inverse(values: Sequence[int]) -> list[int]:
    """Inverses modulo ``p`` of nonzero field elements, using one modular exponentiation."""
    prefix = [1] * (len(values) + 1)
    for i, value in enumerate(values):
        prefix[i + 1] = prefix[i] * value % FIELD_PRIME
    running = pow(prefix[-1], -1, FIELD_PRIME)
    inverses = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        inverses[i] = running * prefix[i] % FIELD_PRIME
        running = running * values[i] % FIELD_PRIME
    return inverses


def _evaluate(xs: Sequence[int], ys: Sequence[int], weights: Sequence[int], point: int) -> int:
    """The interpolating polynomial through ``(xs, ys)`` at ``point``.

    ``f(point) = sum_i y_i w_i prod_{j != i} (point - x_j)``; the products leaving out one
    factor come from prefix and suffix products, so no inverse is needed here.
    """
    n = len(xs)
    factors = [(point - x) % FIELD_PRIME for x in xs]
    suffix = [1] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] * factors[i] % FIELD_PRIME
    total, prefix = 0, 1
    for i in range(n):
        total += ys[i] * weights[i] % FIELD_PRIME * (prefix * suffix[i + 1] % FIELD_PRIME)
        prefix = prefix * factors[i] % FIELD_PRIME
    return total % FIELD_PRIME
