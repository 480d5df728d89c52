"""What defines one benchmark round: its sites, their vectors, who drops out, and its spec.

Every site holds a float32 vector of shape ``(dim,)``, uniform on ``[-1, 1)`` and drawn from
the seed and the site's index. ``round(dropout * sites)`` sites, also chosen by the seed,
drop out after the sharing phase. The threshold is the default, ``floor(2n/3) + 1``; the
fixed-point codec is chosen for ``sites`` vectors of that range at a step of ``1e-6``.
"""

from __future__ import annotations

import numpy as np

from fedlens.errors import ConfigurationError
from fedlens.types import RoundSpec
from privacy import FixedPointCodec, recommended_degree
from privacy.secagg_params import SecAggParams, default_threshold

__all__ = [
    "FEDLENS_MODES",
    "KIND",
    "MODES",
    "codec_for",
    "degree_for",
    "dropped_indices",
    "protocol_params",
    "round_spec",
    "site_ids",
    "site_vector",
]

MODES = ("plain", "complete", "secaggplus")
FEDLENS_MODES = ("complete", "secaggplus")
KIND = "benchmark_sum"
MAX_ABS = 1.0  # site vectors are uniform on [-1, 1)
PRECISION = 1e-6  # fixed-point step


def site_ids(sites: int) -> tuple[str, ...]:
    return tuple(f"site-{i:04d}" for i in range(sites))


def site_vector(seed: int, index: int, dim: int) -> np.ndarray:
    """Site ``index``'s ``(dim,)`` float32 vector, uniform on ``[-1, 1)``."""
    rng = np.random.default_rng([seed, index])
    return rng.uniform(-MAX_ABS, MAX_ABS, dim).astype(np.float32)


def dropped_indices(sites: int, dropout: float, seed: int) -> frozenset[int]:
    """The ``round(dropout * sites)`` sites that drop out, drawn from the seed."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigurationError(f"dropout must be in [0, 1), got {dropout}")
    count = round(dropout * sites)
    survivors = sites - count
    if survivors < default_threshold(sites):
        raise ConfigurationError(
            f"{count} of {sites} sites dropping leaves {survivors}, below the threshold "
            f"{default_threshold(sites)}; use a dropout of at most about 1/3"
        )
    rng = np.random.default_rng([seed, 1])
    return frozenset(int(i) for i in rng.choice(sites, size=count, replace=False))


def codec_for(sites: int) -> FixedPointCodec:
    return FixedPointCodec.choose(num_sites=sites, max_abs=MAX_ABS, precision=PRECISION)


def degree_for(mode: str, sites: int) -> int:
    return recommended_degree(sites) if mode == "secaggplus" else 0


def round_spec(mode: str, sites: int, dim: int, round_id: str, timeout_s: float) -> RoundSpec:
    codec = codec_for(sites)
    return RoundSpec(
        round_id=round_id,
        kind=KIND,
        site_ids=site_ids(sites),
        length=dim,
        bits=codec.bits,
        scale=codec.scale,
        clip_bound=1.0,
        labels=(),
        phase_timeout_s=timeout_s,
        params={"benchmark_round": round_id},
        degree=degree_for(mode, sites),
    )


def protocol_params(spec: RoundSpec) -> SecAggParams:
    """What the sites and the aggregator derive from the spec (default threshold)."""
    return SecAggParams(
        round_id=spec.round_id,
        site_ids=spec.site_ids,
        threshold=spec.effective_threshold,
        length=spec.length,
        bits=spec.bits,
        degree=spec.degree,
    )
