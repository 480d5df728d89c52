"""``self_influence``: DP histograms of how much records shape their own predictions.

A record's self-influence ``v`` (:meth:`explain.influence_setup.InfluenceScorer.self_scores`,
in units of ``1 / N``) is how much its own loss would rise if it were left out of
training. Mislabelled and atypical records have large self-influence (Koh & Liang 2017,
section 5.4; Pruthi et al. 2020): the site ranks its own records by it locally
(:func:`rank_records`, ``fedlens client review``), and only a histogram per group leaves
the site.

With ``K`` bins (``bins``: JSON list of increasing edges starting at 0, default
:data:`DEFAULT_BINS`; the last bin is open) and ``G`` groups (``group_by``, default
``label``), a record contributes ``C`` at coordinate ``g * K + k`` and the site's vector is
``[histogram, count * C]``: L2 sensitivity ``sqrt(2) C``.

Released: the noised count of every ``group/bin`` (std ``noise_std / C``) and, in
``grouped``, each group's share of records at or above ``suspicious`` (default 1.0, a
bin edge).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from explain.influence_setup import InfluenceScorer, grouping_of, positive_number
from explain.per_record import as_records
from explain.registry import (
    Contribution,
    ExplanationKind,
    PostProcessed,
    SiteContext,
    check_noised_sum,
    register_kind,
)
from fedlens.errors import ConfigurationError
from fedlens.types import ReleasedValue

__all__ = ["DEFAULT_BINS", "SELF_INFLUENCE", "RankedRecord", "rank_records"]

DEFAULT_BINS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def _bins(params: Mapping[str, str]) -> np.ndarray:
    raw = params.get("bins")
    if raw is None:
        return np.asarray(DEFAULT_BINS)
    try:
        edges = np.asarray(json.loads(raw), dtype=np.float64)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"bins must be a JSON list of numbers: {exc}") from None
    if (
        edges.ndim != 1
        or edges.size < 2
        or edges[0] != 0
        or not np.all(np.isfinite(edges))
        or not np.all(np.diff(edges) > 0)
    ):
        raise ConfigurationError(f"bins must be finite increasing edges starting at 0, got {raw}")
    return edges


def _bin_names(edges: np.ndarray) -> list[str]:
    ends = [*(f"{b:g}" for b in edges[1:]), "inf"]
    return [f"[{a:g}, {b})" for a, b in zip(edges, ends, strict=True)]


def _labels(
    encoded_names: Sequence[str], groups: Mapping[str, Sequence[int]], params: Mapping[str, str]
) -> tuple[str, ...]:
    grouping = grouping_of(params, encoded_names, groups)
    bins = _bin_names(_bins(params))
    return tuple(f"{g}/{b}" for g in grouping.names for b in bins)


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
    grouping = grouping_of(params)
    edges = _bins(params)
    scores = InfluenceScorer.from_request(model, params, context).self_scores(x, labels)
    index = grouping.assign(x, labels, context) * edges.size + bin_index(scores, edges)
    histogram = np.bincount(index, minlength=len(grouping.names) * edges.size) * clip_bound
    return Contribution(
        vector=np.concatenate([histogram.astype(np.float64), [x.shape[0] * clip_bound]]),
        count=x.shape[0],
        labels=tuple(f"{g}/{b}" for g in grouping.names for b in _bin_names(edges)),
    )


def bin_index(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each score: ``k`` with ``edges[k] <= v < edges[k + 1]`` (last bin open)."""
    return np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, edges.size - 1)


def _postprocess(
    noised_sum: np.ndarray,
    noise_std: float,
    clip_bound: float,
    labels: tuple[str, ...],
    params: Mapping[str, str],
) -> PostProcessed:
    check_noised_sum(noised_sum, labels, clip_bound)
    edges = _bins(params)
    suspicious = positive_number(params, "suspicious", 1.0)
    if suspicious not in edges:
        raise ConfigurationError(f"suspicious must be one of the bin edges, got {suspicious:g}")
    counts = noised_sum[:-1] / clip_bound
    sd = noise_std / clip_bound
    values = tuple(
        ReleasedValue(label, float(v), sd) for label, v in zip(labels, counts, strict=True)
    )
    per_group = counts.reshape(-1, edges.size)
    first = int(np.searchsorted(edges, suspicious))
    grouped = []
    for i, row in enumerate(per_group):
        total = max(float(np.clip(row, 0, None).sum()), 1.0)
        share = float(np.clip(row[first:], 0, None).sum()) / total
        group = labels[i * edges.size].rsplit("/", 1)[0]
        grouped.append(
            ReleasedValue(
                f"{group}/share>={suspicious:g}", share, sd * math.sqrt(edges.size - first) / total
            )
        )
    return PostProcessed(
        noised_count=float(noised_sum[-1] / clip_bound), values=values, grouped=tuple(grouped)
    )


@dataclass(frozen=True)
class RankedRecord:
    """One of a site's records as ``fedlens client review`` lists it (never sent)."""

    position: int
    label: int
    self_influence: float
    loss: float


def rank_records(
    scores: np.ndarray, losses: np.ndarray, labels: np.ndarray, top: int
) -> list[RankedRecord]:
    """The ``top`` records by self-influence, most suspicious first (ties by loss)."""
    if top < 1:
        raise ConfigurationError(f"top must be >= 1, got {top}")
    order = np.lexsort((-losses, -scores))[:top]
    return [RankedRecord(int(i), int(labels[i]), float(scores[i]), float(losses[i])) for i in order]


SELF_INFLUENCE = register_kind(
    ExplanationKind(
        name="self_influence",
        contribute=_contribute,
        postprocess=_postprocess,
        coordinate_labels=_labels,
    )
)
