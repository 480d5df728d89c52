"""Second-order sums federated through a real secure-aggregation round, with or without DP.

Each site packs its summed second-order terms (``explain.second_order.hessian_terms_sum``
or ``kfac_terms_sum``) and appends a count coordinate, ``count * C`` for clip bound ``C``
(``count`` when unclipped). With DP, each site adds Gaussian noise of standard deviation
``gaussian_noise_multiplier(ε, δ) * l2_sensitivity(C)`` to every coordinate: adding or
removing one record changes the vector by its clipped term (norm at most ``C``) and the
count coordinate by ``C``, so by at most ``sqrt(2) C`` in L2, and each site's noised
vector is (ε, δ)-DP on its own (local noise, as ``client.explanation`` adds it by
default). The receiver divides the noised count coordinate by ``C``.

Every site then clamps and fixed-point encodes its vector and the whole round of
:func:`privacy.secagg_local.run_round` runs in this process (keys, Shamir shares,
pairwise and self masks, unmasking); the decoded sum is what an aggregator would
release. Noised rounds use the deployment's codec (``PRECISION`` steps, range
``MAX_RECORDS_PER_SITE * C``). A noiseless round is the check that federation changes no
value: it uses steps of ``1e-12`` over the range the vectors need, so that the decoded sum
equals the float64 sum to about ``sites * 1e-12``. Noise and rounding come from seeded
generators (:class:`privacy.SeededRandom`) so that the benchmark is reproducible; that
changes no distribution.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explain import l2_sensitivity
from fedlens.errors import ConfigurationError
from privacy import FixedPointCodec, SeededRandom, gaussian_noise_multiplier
from privacy.secagg_local import run_round
from privacy.secagg_params import SecAggParams
from server.round_specs import MAX_RECORDS_PER_SITE, PRECISION

__all__ = ["EXACT_PRECISION", "FederatedSum", "dp_noise_std", "federate"]

#: Fixed-point step of noiseless rounds.
EXACT_PRECISION = 1e-12


@dataclass(frozen=True)
class FederatedSum:
    """The decoded result of one round.

    Attributes
    ----------
    total
        ``(m,)`` the summed packed terms (noised if ``noise_std > 0``).
    count
        The summed record count, noised like the rest.
    noise_std
        Each site's noise standard deviation per coordinate; the sum carries
        ``sqrt(sites) * noise_std``.
    fixed_point_max_error
        Largest distance of the decoded sum from the float64 sum of the sites' (noised)
        vectors: what encoding and secure aggregation changed.
    bits
        Modulus exponent of the round.
    seconds
        Wall-clock seconds of the noise, encoding and the whole round, all sites.
    """

    total: np.ndarray
    count: float
    noise_std: float
    fixed_point_max_error: float
    bits: int
    seconds: float


def dp_noise_std(epsilon: float, delta: float, clip_bound: float) -> float:
    """Per-site noise std of an (ε, δ)-DP release of clipped terms plus a count."""
    return gaussian_noise_multiplier(epsilon, delta) * l2_sensitivity(clip_bound)


def federate(
    terms: Sequence[tuple[np.ndarray, int]],
    *,
    clip_bound: float = math.inf,
    noise_std: float = 0.0,
    seed: int = 0,
    round_id: str = "influence",
) -> FederatedSum:
    """Sum the sites' packed terms and counts through one secure-aggregation round.

    Parameters
    ----------
    terms
        One ``(packed (m,), count)`` per site, as the ``*_terms_sum`` functions return
        them; with ``noise_std > 0`` each record's term must have been clipped to
        ``clip_bound``.
    clip_bound
        ``C``; the count coordinate is ``count * C`` (``count`` when infinite).
    noise_std
        Per-site Gaussian noise std per coordinate, 0 for none.
    seed
        Seeds the noise and the stochastic rounding of every site.
    round_id
        Secure-aggregation round id.

    Raises
    ------
    ConfigurationError
        Fewer than two sites, noise without a finite clip bound, or a negative std.
    """
    if len(terms) < 2:
        raise ConfigurationError(f"a round needs at least two sites, got {len(terms)}")
    if noise_std < 0 or (noise_std > 0 and not math.isfinite(clip_bound)):
        raise ConfigurationError("noise needs a finite clip bound and a std >= 0")
    unit = clip_bound if math.isfinite(clip_bound) else 1.0
    vectors = [
        np.append(np.asarray(packed, dtype=np.float64), count * unit) for packed, count in terms
    ]
    began = time.perf_counter()
    if noise_std > 0:
        codec = FixedPointCodec.choose(
            num_sites=len(vectors), max_abs=MAX_RECORDS_PER_SITE * clip_bound, precision=PRECISION
        )
    else:
        widest = max(float(np.max(np.abs(v))) for v in vectors)
        codec = FixedPointCodec.choose(
            num_sites=len(vectors), max_abs=widest, precision=EXACT_PRECISION
        )
    ids = tuple(f"site-{i}" for i in range(len(vectors)))
    limit = codec.site_limit(len(ids))
    encoded, noised = {}, []
    for index, (site, vector) in enumerate(zip(ids, vectors, strict=True)):
        rng = SeededRandom(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
        value = vector + rng.normal(vector.size, noise_std) if noise_std > 0 else vector
        encoded[site] = codec.encode(np.clip(value, -limit, limit), rng)
        noised.append(value)
    params = SecAggParams(round_id, ids, len(ids), vectors[0].size, codec.bits)
    server, _ = run_round(params, encoded)
    total = codec.decode(server.result())
    seconds = time.perf_counter() - began
    error = float(np.max(np.abs(total - np.sum(noised, axis=0))))
    return FederatedSum(
        total=total[:-1],
        count=float(total[-1] / unit),
        noise_std=noise_std,
        fixed_point_max_error=error,
        bits=codec.bits,
        seconds=seconds,
    )
