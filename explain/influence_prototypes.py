"""``influence_prototypes``: what the most influential training records look like, on average.

An example-based explanation ("it is X because it resembles these cases") in which no
real record appears: each site takes its ``k`` strongest proponents of a query's
prediction (records that pushed its logit up most) and its ``k`` strongest opponents,
sums each set's encoded features, and the federation releases the two DP averages.

Sensitivity. Records' encoded features lie in ``[0, 1]`` per column, one hot column per
categorical feature, so ``||x|| <= R = sqrt(F)`` for ``F`` features; every row is clipped
to ``R`` anyway. A record's score depends only on itself and the public model and
factors, so adding or removing a record changes at most one of the two sets, by one
swap: that set's sum moves by at most ``2 R``. Scaling features by
``s = C / (sqrt(2) R)`` makes the L2 sensitivity ``sqrt(2) C``
(:func:`explain.registry.l2_sensitivity`). The sets stay disjoint as long as a
neighbouring dataset still has ``2 k`` records, so a site needs ``2 k + 1`` and refuses
with fewer. The count coordinate holds ``k * C``, fixed by the request, not the data.

Released: ``proponents/<column>`` and ``opponents/<column>``, the average encoded value
of each column (category columns: the share of that category), with noise std
``noise_std / (s * K~)``, ``K~`` the noised number of records averaged per set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from explain.influence_setup import InfluenceScorer, parse_query
from explain.per_record import as_records
from explain.registry import (
    Contribution,
    ExplanationKind,
    PostProcessed,
    SiteContext,
    check_noised_sum,
    register_kind,
)
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.types import ReleasedValue
from privacy import clip_rows

__all__ = ["INFLUENCE_PROTOTYPES"]

DEFAULT_K = 10


def _k(params: Mapping[str, str]) -> int:
    raw = params.get("k", str(DEFAULT_K))
    try:
        k = int(raw)
    except ValueError:
        raise ConfigurationError(f"k must be an integer, got {raw!r}") from None
    if k < 1:
        raise ConfigurationError(f"k must be >= 1, got {k}")
    return k


def _layout(params: Mapping[str, str]) -> tuple[list[str], float]:
    try:
        names = list(json.loads(params["feature_names"]))
        features = len(json.loads(params["groups"]))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"prototypes need feature_names and groups: {exc}") from None
    return names, math.sqrt(max(features, 1))


def _labels(
    encoded_names: Sequence[str], groups: Mapping[str, Sequence[int]], params: Mapping[str, str]
) -> tuple[str, ...]:
    _k(params)
    parse_query(params, len(encoded_names))
    return tuple(f"{side}/{name}" for side in ("proponents", "opponents") for name in encoded_names)


def _contribute(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    params: Mapping[str, str],
    clip_bound: float,
    /,
    sensitive: Mapping[str, np.ndarray] | None = None,
    context: SiteContext | None = None,
) -> Contribution:
    del sensitive
    x = as_records(features, labels)
    names, radius = _layout(params)
    if len(names) != x.shape[1]:
        raise ExplanationError(
            f"the layout names {len(names)} columns, the records have {x.shape[1]}"
        )
    k = _k(params)
    if x.shape[0] < 2 * k + 1:
        raise ExplanationError(
            f"k = {k} needs at least {2 * k + 1} records at each site; this site has fewer"
        )
    query = parse_query(params, x.shape[1])
    if query.shape[0] != 1:
        raise ConfigurationError(f"prototypes explain one query input, got {query.shape[0]}")
    scores = InfluenceScorer.from_request(model, params, context).prediction(x, labels, query)[:, 0]
    if not np.all(np.isfinite(scores)):
        raise ExplanationError("influence scores are not finite; the model or factors diverge")
    order = np.argsort(-scores, kind="stable")
    scale = clip_bound / (math.sqrt(2.0) * radius)
    rows = clip_rows(x, radius) * scale
    proponents = rows[order[:k]].sum(axis=0)
    opponents = rows[order[-k:]].sum(axis=0)
    return Contribution(
        vector=np.concatenate([proponents, opponents, [k * clip_bound]]),
        count=k,
        labels=tuple(f"{side}/{n}" for side in ("proponents", "opponents") for n in names),
    )


def _postprocess(
    noised_sum: np.ndarray,
    noise_std: float,
    clip_bound: float,
    labels: tuple[str, ...],
    params: Mapping[str, str],
) -> PostProcessed:
    check_noised_sum(noised_sum, labels, clip_bound)
    if len(labels) % 2:
        raise ConfigurationError(f"expected an even number of labels, got {len(labels)}")
    _, radius = _layout(params)
    scale = clip_bound / (math.sqrt(2.0) * radius)
    averaged = float(noised_sum[-1] / clip_bound)
    divisor = max(averaged, 1.0)
    sd = noise_std / (scale * divisor)
    values = tuple(
        ReleasedValue(label, float(np.clip(v / (scale * divisor), 0.0, 1.0)), sd)
        for label, v in zip(labels, noised_sum[:-1], strict=True)
    )
    return PostProcessed(noised_count=averaged, values=values, grouped=())


INFLUENCE_PROTOTYPES = register_kind(
    ExplanationKind(
        name="influence_prototypes",
        contribute=_contribute,
        postprocess=_postprocess,
        coordinate_labels=_labels,
    )
)
