"""``group_influence`` and ``site_contribution``: influence summed by group of records.

``group_influence`` answers, for one query input, how much each group of training
records (by label, by a feature's categories or quartiles — sensitive attributes
included —, or by site where the site's policy allows) pushed the query's prediction up
or down. ``site_contribution`` sums each site's records' influence on a validation loss:
data valuation from sums alone, without any site's model update.

Both use one layout. With ``G`` groups, scores ``u`` in units of ``1 / N``
(:class:`explain.influence_setup.InfluenceScorer`), the clip ``B`` (``influence_clip``)
and ``c = C / sqrt(2)``, a record in group ``g`` contributes

    t = c * clip(u, -B, B) / B  at coordinate g,    c  at coordinate G + g,

so ``||t|| <= C``; the site's vector is ``[sum of t, count * C]``, of L2 sensitivity
``sqrt(2) C`` (:func:`explain.registry.l2_sensitivity`). Influence is linear in the
records, so a group's influence is the sum of its records' scores, and the sum over
sites is the federation's.

Released per group ``g``: ``g/influence`` — the group's total push on the query's logit,
``sum u / N`` (the logit would fall by about this much without the group; for
``site_contribution``, ``g/value``: how much the validation loss would rise without the
site) — and ``g/count``, each with its noise std; and in ``grouped`` the mean score per
record ``g/mean`` (in units of ``1 / N``).

A breakdown by site puts every site whose policy withholds it in ``(withheld)`` and is
refused unless noise is local: a site's coordinate is then its own locally noised sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from explain.influence_setup import (
    DEFAULT_INFLUENCE_CLIP,
    Grouping,
    InfluenceScorer,
    grouping_of,
    parse_query,
    positive_number,
)
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

__all__ = ["GROUP_INFLUENCE", "SITE_CONTRIBUTION", "grouped_scores"]


def _labels(grouping: Grouping, score_name: str) -> tuple[str, ...]:
    return tuple(f"{g}/{score_name}" for g in grouping.names) + tuple(
        f"{g}/count" for g in grouping.names
    )


def grouped_scores(
    scores: np.ndarray, index: np.ndarray, num_groups: int, bound: float, clip_bound: float
) -> np.ndarray:
    """The site's vector for per-record ``scores`` ``(n,)`` in groups ``index`` ``(n,)``."""
    if not np.all(np.isfinite(scores)):
        raise ExplanationError("influence scores are not finite; the model or factors diverge")
    c = clip_bound / math.sqrt(2.0)
    clipped = np.clip(scores, -bound, bound) * (c / bound)
    sums = np.bincount(index, weights=clipped, minlength=num_groups)
    counts = np.bincount(index, minlength=num_groups) * c
    return np.concatenate([sums, counts, [scores.size * clip_bound]])


def _release(
    noised_sum: np.ndarray,
    noise_std: float,
    clip_bound: float,
    labels: tuple[str, ...],
    params: Mapping[str, str],
    score_name: str,
) -> PostProcessed:
    check_noised_sum(noised_sum, labels, clip_bound)
    if len(labels) % 2:
        raise ConfigurationError(f"expected an even number of labels, got {len(labels)}")
    bound = positive_number(params, "influence_clip", DEFAULT_INFLUENCE_CLIP)
    records = positive_number(params, "second_order_count", 1.0)
    g = len(labels) // 2
    c = clip_bound / math.sqrt(2.0)
    to_score = bound / c
    values: list[ReleasedValue] = []
    grouped: list[ReleasedValue] = []
    for i in range(g):
        group = labels[i].rsplit("/", 1)[0]
        total = noised_sum[i] * to_score
        count = noised_sum[g + i] / c
        values.append(
            ReleasedValue(
                f"{group}/{score_name}", float(total / records), noise_std * to_score / records
            )
        )
        values.append(ReleasedValue(f"{group}/count", float(count), noise_std / c))
        divisor = max(count, 1.0)
        grouped.append(
            ReleasedValue(f"{group}/mean", float(total / divisor), noise_std * to_score / divisor)
        )
    return PostProcessed(
        noised_count=float(noised_sum[-1] / clip_bound),
        values=tuple(values),
        grouped=tuple(grouped),
    )


def _group_influence_labels(
    encoded_names: Sequence[str], groups: Mapping[str, Sequence[int]], params: Mapping[str, str]
) -> tuple[str, ...]:
    parse_query(params, len(encoded_names))  # a malformed query is refused at OpenRound
    return _labels(grouping_of(params, encoded_names, groups), "influence")


def _group_influence(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    params: Mapping[str, str],
    clip_bound: float,
    /,
    sensitive: Mapping[str, np.ndarray] | None = None,
    context: SiteContext | None = None,
) -> Contribution:
    del sensitive  # sensitive attributes are features of the encoding; grouped from there
    x = as_records(features, labels)
    grouping = grouping_of(params)
    query = parse_query(params, x.shape[1])
    if query.shape[0] != 1:
        raise ConfigurationError(f"group_influence explains one query input, got {query.shape[0]}")
    scorer = InfluenceScorer.from_request(model, params, context)
    scores = scorer.prediction(x, labels, query)[:, 0]
    bound = positive_number(params, "influence_clip", DEFAULT_INFLUENCE_CLIP)
    index = grouping.assign(x, labels, context)
    vector = grouped_scores(scores, index, len(grouping.names), bound, clip_bound)
    return Contribution(vector=vector, count=x.shape[0], labels=_labels(grouping, "influence"))


def _site_labels(
    encoded_names: Sequence[str], groups: Mapping[str, Sequence[int]], params: Mapping[str, str]
) -> tuple[str, ...]:
    del encoded_names, groups
    return _labels(grouping_of({**params, "group_by": "site"}, ("_",), {}), "value")


def _site_contribution(
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
    grouping = grouping_of({**params, "group_by": "site"}, ("_",), {})
    scorer = InfluenceScorer.from_request(model, params, context)
    arrays = context.arrays if context is not None else {}
    target = np.asarray(arrays.get("validation_gradient", np.empty(0)), dtype=np.float64)
    p = sum(q.numel() for q in model.parameters())
    if target.shape != (p,) or not np.all(np.isfinite(target)):
        raise ExplanationError(
            f"site_contribution needs the validation-loss gradient: {p} finite values, "
            f"got shape {target.shape}"
        )
    scores = scorer.loss(x, labels, target)
    bound = positive_number(params, "influence_clip", DEFAULT_INFLUENCE_CLIP)
    index = grouping.assign(x, labels, context)
    vector = grouped_scores(scores, index, len(grouping.names), bound, clip_bound)
    return Contribution(vector=vector, count=x.shape[0], labels=_labels(grouping, "value"))


GROUP_INFLUENCE = register_kind(
    ExplanationKind(
        name="group_influence",
        contribute=_group_influence,
        postprocess=lambda s, sd, c, labels, params: _release(
            s, sd, c, labels, params, "influence"
        ),
        coordinate_labels=_group_influence_labels,
    )
)

SITE_CONTRIBUTION = register_kind(
    ExplanationKind(
        name="site_contribution",
        contribute=_site_contribution,
        postprocess=lambda s, sd, c, labels, params: _release(s, sd, c, labels, params, "value"),
        coordinate_labels=_site_labels,
    )
)
