"""``loo_unfairness``: how much removing a single record changes predictions.

Black & Fredrikson (AIES 2021) call a model leave-one-out unfair to the people it
predicts for when its predictions hinge on single training records. For probe inputs
(``query``: one or more encoded inputs) the influence estimate gives, for each training
record, the change of each probe's positive-class probability if the record were left
out: ``|sigmoid(f) - sigmoid(f - u / N)|`` with ``u`` the record's prediction score
(:class:`explain.influence_setup.InfluenceScorer`). The release is a DP histogram of
each record's largest change over the probes, and a count of records whose removal
would flip some probe's predicted class.

With ``K`` bins (``bins``: JSON list of increasing edges from 0, default
:data:`DEFAULT_BINS`, the last bin open) and ``c = C / sqrt(2)``, a record adds ``c`` to
its bin and ``c`` to the flip coordinate if it flips a probe: ``||t|| <= C``, and with the
count coordinate the L2 sensitivity is ``sqrt(2) C``.

Released: ``change in [a, b)`` counts and ``flips`` (std ``noise_std / c``); in
``grouped``, ``flip_share`` (flips over the noised record count).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
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
from explain.self_influence import bin_index
from fedlens.errors import ConfigurationError
from fedlens.types import ReleasedValue

__all__ = ["DEFAULT_BINS", "LOO_UNFAIRNESS", "prediction_changes"]

DEFAULT_BINS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _bins(params: Mapping[str, str]) -> np.ndarray:
    raw = params.get("bins")
    if raw is None:
        return np.asarray(DEFAULT_BINS)
    try:
        edges = np.asarray(json.loads(raw), dtype=np.float64)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"bins must be a JSON list of numbers: {exc}") from None
    if edges.ndim != 1 or edges.size < 2 or edges[0] != 0 or not np.all(np.diff(edges) > 0):
        raise ConfigurationError(f"bins must be increasing edges starting at 0, got {raw}")
    if not np.all(np.isfinite(edges)) or edges[-1] >= 1:
        raise ConfigurationError(f"bins must be probabilities below 1, got {raw}")
    return edges


def _names(edges: np.ndarray) -> tuple[str, ...]:
    ends = [*(f"{b:g}" for b in edges[1:]), "1"]
    return (*(f"change in [{a:g}, {b})" for a, b in zip(edges, ends, strict=True)), "flips")


def _labels(
    encoded_names: Sequence[str], groups: Mapping[str, Sequence[int]], params: Mapping[str, str]
) -> tuple[str, ...]:
    del groups
    parse_query(params, len(encoded_names))
    return _names(_bins(params))


def prediction_changes(
    logits: np.ndarray, scores: np.ndarray, count: float
) -> tuple[np.ndarray, np.ndarray]:
    """Largest probability change over probes and whether any probe's class flips.

    Parameters
    ----------
    logits
        ``(k,)`` the probes' logits under the trained model.
    scores
        ``(n, k)`` records' prediction scores in units of ``1 / count``.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(n,)`` float64 and ``(n,)`` bool.
    """
    without = logits[None, :] - scores / count
    change = np.abs(_sigmoid(logits)[None, :] - _sigmoid(without))
    flips = (without > 0) != (logits[None, :] > 0)
    return change.max(axis=1), flips.any(axis=1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


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
    edges = _bins(params)
    probes = parse_query(params, x.shape[1])
    scorer = InfluenceScorer.from_request(model, params, context)
    scores = scorer.prediction(x, labels, probes)
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        logits = model(torch.as_tensor(probes, dtype=dtype)).double().numpy().reshape(-1)
    change, flips = prediction_changes(logits, scores, scorer.count)
    c = clip_bound / math.sqrt(2.0)
    histogram = np.bincount(bin_index(change, edges), minlength=edges.size) * c
    vector = np.concatenate([histogram, [flips.sum() * c, x.shape[0] * clip_bound]])
    return Contribution(vector=vector, count=x.shape[0], labels=_names(edges))


def _postprocess(
    noised_sum: np.ndarray,
    noise_std: float,
    clip_bound: float,
    labels: tuple[str, ...],
    params: Mapping[str, str],
) -> PostProcessed:
    del params
    check_noised_sum(noised_sum, labels, clip_bound)
    c = clip_bound / math.sqrt(2.0)
    counts = noised_sum[:-1] / c
    records = float(noised_sum[-1] / clip_bound)
    sd = noise_std / c
    values = tuple(ReleasedValue(n, float(v), sd) for n, v in zip(labels, counts, strict=True))
    divisor = max(records, 1.0)
    share = ReleasedValue("flip_share", float(np.clip(counts[-1] / divisor, 0, 1)), sd / divisor)
    return PostProcessed(noised_count=records, values=values, grouped=(share,))


LOO_UNFAIRNESS = register_kind(
    ExplanationKind(
        name="loo_unfairness",
        contribute=_contribute,
        postprocess=_postprocess,
        coordinate_labels=_labels,
    )
)
