"""The round a coordinator opens for an explanation kind: its parameters and encoding.

The spec fixes what every site computes (the kind's parameters, from the run
configuration and the public encoding) and how the sum is encoded (the fixed-point
modulus and scale, wide enough for the largest sum and, with distributed noise, for the
noise shares).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from explain import GLOBAL_ATTRIBUTION, get_kind, l2_sensitivity
from explain.global_attribution import attribution_params
from fedlens.datasets import Preprocessor
from fedlens.errors import ConfigurationError
from fedlens.runconfig import RunConfig
from fedlens.types import RoundSpec, default_threshold
from privacy import (
    FixedPointCodec,
    calibrate_shares,
    discrete_gaussian_noise_multiplier,
    encoded_sensitivity,
    wraparound_bits,
)

__all__ = ["MAX_RECORDS_PER_SITE", "PRECISION", "distributed_bits", "explanation_round_spec"]

# Largest number of records one site may sum in a round; bounds the fixed-point range.
MAX_RECORDS_PER_SITE = 1_000_000
# Released means are resolved to this step before noise; far below the noise itself.
PRECISION = 1e-5


def distributed_bits(run: RunConfig, codec: FixedPointCodec, num_sites: int, length: int) -> int:
    """Modulus exponent for distributed noise: the values' headroom and the noise shares'.

    Each site's encoded sum is at most ``MAX_RECORDS_PER_SITE * clip * scale + 1`` per
    coordinate and carries a discrete Gaussian share; :func:`wraparound_bits` bounds the
    chance that any coordinate of the sum wraps around by ``2**-40``.
    """
    n = num_sites
    threshold = run.secagg_threshold or default_threshold(n)
    calibration = calibrate_shares(
        noise_multiplier=discrete_gaussian_noise_multiplier(run.explain_epsilon, run.explain_delta),
        sensitivity=encoded_sensitivity(l2_sensitivity(run.attribution_clip), codec.scale, length),
        dimension=length,
        threshold=threshold,
        colluding=run.secagg_colluding,
    )
    bits, _ = wraparound_bits(
        num_sites=n,
        max_abs_encoded=MAX_RECORDS_PER_SITE * run.attribution_clip * codec.scale + 1,
        share_sigma=calibration.share_sigma,
        dimension=length,
    )
    return max(codec.bits, bits)


def explanation_round_spec(
    run: RunConfig,
    pre: Preprocessor,
    site_ids: Sequence[str],
    *,
    round_id: str,
    extra_params: Mapping[str, str] | None = None,
) -> RoundSpec:
    """The round the coordinator opens for ``run.explain_kind`` over ``site_ids``.

    The kind names the coordinates of its sum from the public encoding
    (``coordinate_labels``), so ``labels`` and ``length = len(labels) + 1`` fit every
    kind, whatever its number of coordinates per encoded column. ``extra_params`` (the
    influence kinds' query, grouping and factors' provenance) are added to the round's.

    Raises
    ------
    ConfigurationError
        ``run.explain_kind`` names no registered kind.
    """
    # Every kind clips each record's term to L2 norm clip, so each coordinate of a
    # site's sum is at most records * clip; noise adds far less than the headroom of
    # FixedPointCodec.choose.
    codec = FixedPointCodec.choose(
        num_sites=len(site_ids),
        max_abs=MAX_RECORDS_PER_SITE * run.attribution_clip,
        precision=PRECISION,
    )
    params = {
        "feature_names": json.dumps(list(pre.encoded_names)),
        "groups": json.dumps({k: list(v) for k, v in pre.groups.items()}),
        "n_steps": str(run.ig_steps),
        "dataset": run.dataset,
        "model": run.model,
        "noise": run.secagg_noise,
        "training_rounds": str(run.rounds),
        # The coordinator checks every site's mirrored ledger against this release.
        "epsilon": repr(run.explain_epsilon),
        "delta": repr(run.explain_delta),
        # Public category lists of the sensitive features (the fairness kind's groups).
        "sensitive": json.dumps(
            {
                spec.name: list(spec.categories or ())
                for spec in pre.schema.features
                if spec.sensitive
            }
        ),
    }
    if run.explain_kind == GLOBAL_ATTRIBUTION.name:
        try:
            cohort = json.loads(run.explain_cohort) if run.explain_cohort else None
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"explain-cohort is not valid JSON: {exc}") from None
        if cohort is not None and not isinstance(cohort, dict):
            raise ConfigurationError(f"explain-cohort must be a JSON object, got {cohort!r}")
        params |= {
            k: v
            for k, v in attribution_params(
                pre,
                method=run.explain_method,
                target=run.explain_target,
                cohort=cohort,
                min_cohort_size=str(run.min_cohort_size),
            ).items()
            if k not in params
        }
    params |= dict(extra_params or {})
    labels = get_kind(run.explain_kind).coordinate_labels(pre.encoded_names, pre.groups, params)
    bits = codec.bits
    if run.secagg_noise == "distributed":
        bits = distributed_bits(run, codec, len(site_ids), len(labels) + 1)
    return RoundSpec(
        round_id=round_id,
        kind=run.explain_kind,
        site_ids=tuple(site_ids),
        length=len(labels) + 1,
        bits=bits,
        scale=codec.scale,
        clip_bound=run.attribution_clip,
        labels=labels,
        phase_timeout_s=run.phase_timeout_s,
        params=params,
        threshold=run.secagg_threshold,
        degree=run.secagg_degree,
        noise=run.secagg_noise,
        colluding=run.secagg_colluding,
    )
