"""The thin client: one call that contributes a vector to a secure-aggregation round.

For a site that is not a full fedlens site (a mobile or embedded prototype, another
language's bridge): it needs only numpy, grpcio, protobuf and cryptography; no torch, no
Flower, no dp_accounting, no database. It does no privacy accounting: the caller knows
what its noise costs and passes that cost, which the aggregator publishes with the
release.

Example
-------
>>> status = contribute_vector(  # doctest: +SKIP
...     "coordinator:50151", spec, "site-3", vector, identity,
...     clip_norm=1.0, noise_std=3.2, cost=PrivacyCost("site-3", 0.5, 1e-6, 1.5),
... )
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.secagg_client import AggregationClient, SiteInput, run_secure_round
from fedlens.errors import ConfigurationError
from fedlens.types import PrivacyCost, RoundSpec, RoundStatus
from privacy.clipping import clip_rows
from privacy.fixedpoint import FixedPointCodec
from privacy.randomness import NoiseSource, SecureRandom
from privacy.secagg_params import SecAggParams
from privacy.secagg_site import SiteSession

__all__ = ["contribute_vector", "round_params"]


def round_params(spec: RoundSpec) -> SecAggParams:
    """The secure-aggregation parameters of a round, as the aggregator derives them."""
    return SecAggParams.for_round(spec)


def contribute_vector(
    address: str,
    spec: RoundSpec,
    site_id: str,
    vector: np.ndarray,
    identity: Ed25519PrivateKey,
    *,
    clip_norm: float,
    noise_std: float,
    cost: PrivacyCost,
    rng: NoiseSource | None = None,
    timeout_s: float | None = None,
    retry_s: float = 30.0,
    tls_ca: Path | None = None,
) -> RoundStatus:
    """Clip, noise, encode, mask and submit ``vector``; returns the round's final status.

    The vector is scaled down to L2 norm at most ``clip_norm`` and Gaussian noise of
    standard deviation ``noise_std`` is added to every coordinate (local noise; the
    aggregator adds none). So the vector that leaves the site is ``(ε, δ)``-DP on its
    own when ``noise_std >= z * clip_norm``, ``z`` being the Gaussian mechanism's noise
    multiplier for ``(ε, δ)`` (:func:`privacy.gaussian_noise_multiplier`, which needs
    dp_accounting: compute it where that is installed). The noised vector is clamped so
    that the sum of all sites cannot wrap around, encoded with the round's fixed-point
    codec and masked (Bonawitz et al. 2017): the aggregator sees only the sum of the
    surviving sites' vectors.

    Parameters
    ----------
    spec
        The round, as the coordinator opened it; its noise must be ``"local"``.
    vector
        ``(spec.length,)`` real values.
    identity
        The site's Ed25519 identity key, enrolled at the coordinator (or enrolled on
        first use).
    cost
        What this contribution costs the site; published with the release.
    rng
        Source of the noise and of the stochastic rounding; :class:`SecureRandom` unless
        a test passes a seeded one.
    timeout_s
        Longest wait for one phase; the round's ``phase_timeout_s`` by default.
    retry_s
        How long each call is retried while the aggregator is unavailable.

    Raises
    ------
    ConfigurationError
        The vector's shape, ``clip_norm`` or ``noise_std`` is invalid, or the round uses
        distributed noise.
    ProtocolError
        The round failed (see :func:`client.secagg_client.run_secure_round`).
    """
    if cost.site_id != site_id:
        raise ConfigurationError(f"cost names site {cost.site_id!r}, not {site_id!r}")
    if spec.noise != "local":
        raise ConfigurationError(f"the thin client adds local noise only, not {spec.noise!r}")
    values = np.asarray(vector, dtype=np.float64)
    if values.shape != (spec.length,):
        raise ConfigurationError(f"vector has shape {values.shape}, expected ({spec.length},)")
    if not math.isfinite(noise_std) or noise_std < 0:
        raise ConfigurationError(f"noise_std must be finite and >= 0, got {noise_std}")
    clipped = clip_rows(values[None, :], clip_norm)[0]
    source = SecureRandom() if rng is None else rng
    codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)
    session = SiteSession(round_params(spec), site_id, identity)

    def make_input() -> SiteInput:
        # Drawn only once every neighbour has shared keys, right before masking.
        noised = clipped + source.normal(spec.length, noise_std)
        # Clamping a DP value is post-processing; it rules out wrap-around in the sum.
        limit = codec.site_limit(len(spec.site_ids))
        encoded = codec.encode(np.clip(noised, -limit, limit), source)
        return SiteInput(encoded, cost, noise_std)

    with AggregationClient(address, retry_s=retry_s, tls_ca=tls_ca) as client:
        return run_secure_round(
            client,
            session,
            make_input,
            timeout_s=spec.phase_timeout_s if timeout_s is None else timeout_s,
        )
