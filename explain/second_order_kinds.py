"""``hessian``, ``kfac`` and ``ekfac``: second-order factors summed across sites.

Each record contributes its packed Gauss-Newton term (``hessian``, the exact Hessian of
a logistic model) or its packed K-FAC input and output-gradient outer products
(``kfac``), clipped to L2 norm ``C`` (:mod:`explain.second_order`); the site's vector is
``[sum of terms, count * C]``. Adding or removing one record moves it by at most ``C``
in the terms and ``C`` in the count: L2 sensitivity ``sqrt(2) C``, as for every kind
(:func:`explain.registry.l2_sensitivity`), so Gaussian noise of std
``z * sqrt(2) * C`` makes each site's vector (epsilon, delta)-DP and the released means
DP by post-processing.

Parameters: ``model`` (the model's registered name) and ``feature_names`` fix the
coordinates; the coordinator adds ``model_fingerprint``, which the release keeps so that
influence requests can be refused when the model has changed since.

``ekfac`` needs released K-FAC factors (public arrays and parameters as for the
influence kinds, :mod:`explain.influence_setup`) and sums each record's squared gradient
in their eigenbasis (:func:`explain.second_order.ekfac_terms_sum`, George et al. 2018):
the eigenvalue correction of EK-FAC.

Released: the mean factor entries (``H[i,j]`` or ``<layer>/A[i,j]``,
``<layer>/G[i,j]``, in the packed scaling: off-diagonal entries times ``sqrt(2)``), each
with the noise std of a mean, ``noise_std / N~``; ``N~`` is the noised count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from torch import nn

from explain.influence_setup import InfluenceScorer
from explain.registry import (
    Contribution,
    ExplanationKind,
    PostProcessed,
    SiteContext,
    check_noised_sum,
    register_kind,
)
from explain.second_order import (
    ekfac_labels,
    ekfac_terms_sum,
    hessian_labels,
    hessian_terms_sum,
    kfac_labels,
    kfac_terms_sum,
)
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.models import build_model
from fedlens.types import ReleasedValue

__all__ = ["EKFAC", "HESSIAN", "KFAC", "released_factors"]


def _model_for(params: Mapping[str, str], dimension: int) -> nn.Module:
    name = params.get("model")
    if not name:
        raise ConfigurationError("second-order kinds need the model's name (params 'model')")
    return build_model(name, dimension)


def _feature_count(params: Mapping[str, str], encoded_names: Sequence[str]) -> int:
    if encoded_names:
        return len(encoded_names)
    try:
        return len(json.loads(params["feature_names"]))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"second-order kinds need feature_names: {exc}") from None


def _labels_of(
    labels_of: Callable[[nn.Module], tuple[str, ...]],
    params: Mapping[str, str],
    encoded_names: Sequence[str],
) -> tuple[str, ...]:
    try:
        return labels_of(_model_for(params, _feature_count(params, encoded_names)))
    except ExplanationError as exc:
        raise ConfigurationError(str(exc)) from None


def _make(
    name: str,
    labels_of: Callable[[nn.Module], tuple[str, ...]],
    terms: Callable[[nn.Module, np.ndarray, float], tuple[np.ndarray, int]],
) -> ExplanationKind:
    def coordinate_labels(
        encoded_names: Sequence[str], groups: Mapping[str, Sequence[int]], params: Mapping[str, str]
    ) -> tuple[str, ...]:
        del groups
        return _labels_of(labels_of, params, encoded_names)

    def contribute(
        model: nn.Module,
        features: np.ndarray,
        labels: np.ndarray,
        params: Mapping[str, str],
        clip_bound: float,
        /,
        sensitive: Mapping[str, np.ndarray] | None = None,
        context: SiteContext | None = None,
    ) -> Contribution:
        del labels, sensitive, context  # curvature depends on the inputs and the model only
        if not math.isfinite(clip_bound) or clip_bound <= 0:
            raise ConfigurationError(f"clip bound must be finite and > 0, got {clip_bound!r}")
        packed, count = terms(model, np.asarray(features, dtype=np.float64), clip_bound)
        return Contribution(
            vector=np.concatenate([packed, [count * clip_bound]]),
            count=count,
            labels=labels_of(model),
        )

    def postprocess(
        noised_sum: np.ndarray,
        noise_std: float,
        clip_bound: float,
        labels: tuple[str, ...],
        params: Mapping[str, str],
    ) -> PostProcessed:
        del params
        check_noised_sum(noised_sum, labels, clip_bound)
        noised_count = float(noised_sum[-1] / clip_bound)
        divisor = max(noised_count, 1.0)
        sd = noise_std / divisor
        values = tuple(
            ReleasedValue(name=label, value=float(v) / divisor, noise_std=sd)
            for label, v in zip(labels, noised_sum[:-1], strict=True)
        )
        return PostProcessed(noised_count=noised_count, values=values, grouped=())

    return register_kind(
        ExplanationKind(
            name=name,
            contribute=contribute,
            postprocess=postprocess,
            coordinate_labels=coordinate_labels,
        )
    )


HESSIAN = _make("hessian", hessian_labels, hessian_terms_sum)
KFAC = _make("kfac", kfac_labels, kfac_terms_sum)


def _ekfac_contribute(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    params: Mapping[str, str],
    clip_bound: float,
    /,
    sensitive: Mapping[str, np.ndarray] | None = None,
    context: SiteContext | None = None,
) -> Contribution:
    del labels, sensitive
    if not math.isfinite(clip_bound) or clip_bound <= 0:
        raise ConfigurationError(f"clip bound must be finite and > 0, got {clip_bound!r}")
    scorer = InfluenceScorer.from_request(model, {**params, "method": "kfac"}, context)
    assert scorer.second is not None  # the kfac method always carries its factors
    packed, count = ekfac_terms_sum(
        model, np.asarray(features, dtype=np.float64), scorer.second, clip_bound
    )
    return Contribution(
        vector=np.concatenate([packed, [count * clip_bound]]),
        count=count,
        labels=ekfac_labels(model),
    )


EKFAC = register_kind(
    ExplanationKind(
        name="ekfac",
        contribute=_ekfac_contribute,
        postprocess=KFAC.postprocess,
        coordinate_labels=lambda names, groups, params: _labels_of(ekfac_labels, params, names),
    )
)


def released_factors(values: Sequence[ReleasedValue], labels: Sequence[str]) -> np.ndarray:
    """The packed mean factors of a release, in ``labels`` order (the kind's coordinates).

    Raises
    ------
    ExplanationError
        The release lacks a coordinate or holds a non-finite value.
    """
    by_name = {v.name: v.value for v in values}
    missing = [label for label in labels if label not in by_name]
    if missing:
        raise ExplanationError(
            f"the second-order release lacks {len(missing)} coordinates (first: {missing[0]})"
        )
    out = np.array([by_name[label] for label in labels], dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ExplanationError("the second-order release holds non-finite values")
    return out
