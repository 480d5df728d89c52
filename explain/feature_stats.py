"""``feature_stats``: DP means, spreads, ranges and category frequencies per feature.

What the analyst gets, in encoded units (every encoded column lies in ``[0, 1]``, see
:class:`fedlens.datasets.Preprocessor`): for each numeric feature its mean, standard
deviation and a range ``mean ± 2 std`` clamped to ``[0, 1]`` (the image of the feature's
public schema range), and for each categorical feature the frequency of every listed
category. The means and frequencies in column order form a DP baseline for attributions;
the ranges bound counterfactual searches. The model plays no part.

Per-record term and sensitivity
-------------------------------
A record ``x`` (``d`` encoded columns, ``p`` of them numeric features, ``c`` categorical
features) contributes the term

    t(x) = (C / B) * [x_1, ..., x_d, x_{j_1}^2, ..., x_{j_p}^2],
    B = sqrt(2 p + c),

where ``C`` is the round's ``clip_bound`` and ``j_1 < ... < j_p`` are the numeric columns.
For an encoded record ``||t(x)|| <= C`` holds by construction: a numeric column adds
``x^2 + x^4 <= 2`` to the squared norm and a one-hot group at most ``1`` (one category,
or none for a missing or unlisted value). The term is still passed through
:func:`privacy.clip_rows`, so the bound holds for any input; that clipping is active only
for rows outside the encoded domain (a value outside ``[0, 1]``, two categories of one
feature), and only those rows' statistics are biased.

A site's vector is ``[sum of t(x), count * C]``. Adding or removing one record
(add-or-remove-one neighbours at one site) changes the sum of terms by ``t(x)``, at most
``C`` in L2, and the count coordinate by ``C``: the L2 sensitivity is ``sqrt(2) * C``
(:func:`explain.registry.l2_sensitivity`). With Gaussian noise of standard deviation
``z * sqrt(2) * C`` per coordinate, where ``z`` is the multiplier of
:func:`privacy.gaussian_noise_multiplier` for ``(epsilon, delta)``, each site's noised
vector is (epsilon, delta)-DP (the Gaussian mechanism; Balle & Wang, ICML 2018), and
so is every statistic computed from the sum, by post-processing.

Because the scale ``C / B`` is fixed by the public encoding and undone after
aggregation, ``C`` does not trade bias for noise here as it does for
``global_attribution``: the released means carry noise of standard deviation
``z * sqrt(2) * B / n`` whatever ``C`` is, and ``C`` only sets the fixed-point range.

Post-processing
---------------
With ``n~`` the noised count (floored at one record) and ``S`` the noised sum scaled
back by ``B / C``: column means ``m = S_j / n~`` clamped to ``[0, 1]``, second moments
``q = S_{d+k} / n~``, standard deviations ``sqrt(max(q - m^2, 0))`` clamped to
``[0, 0.5]`` (the largest spread of a ``[0, 1]`` value), and the frequencies of one
feature's categories projected onto ``{f >= 0, sum f <= 1}`` (a sum below one is the
share of missing or unlisted values, so it is kept). Each of these is a Euclidean
projection onto a convex set that holds the true value, so it can only shrink the error.

Each released value carries the standard deviation of the privacy noise in it. With
``s_m = s / n~``, where ``s`` is the noise std of one summed coordinate scaled back by
``B / C``: ``s_m`` for means and frequencies; to first order (delta method)
``s_m * sqrt(1 + 4 m^2) / (2 std)`` for a standard deviation, capped at
``sqrt(s_m * sqrt(1 + 4 m^2))`` where the derivative blows up near zero spread; and
``sqrt(var(m) + 4 var(std) -+ 4 cov(m, std))`` for the range ends, with
``cov(m, std) = -m s_m^2 / std``. Like ``global_attribution``, these ignore the noise
in the count, and they ignore the projections (which only shrink the error).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from explain.registry import (
    Contribution,
    ExplanationKind,
    PostProcessed,
    SiteContext,
    register_kind,
)
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.types import ReleasedValue
from privacy import clip_rows

__all__ = ["FEATURE_STATS", "EncodedFeature", "FeatureLayout", "feature_stats_terms"]

# The largest standard deviation of a variable with values in [0, 1].
_MAX_STD = 0.5
# Range ends are mean ± this many standard deviations.
_RANGE_STDS = 2.0


@dataclass(frozen=True)
class EncodedFeature:
    """One original feature and its encoded columns.

    Attributes
    ----------
    name
        The feature's name in the schema.
    columns
        Its encoded columns, ascending: one for a numeric feature, one per listed
        category (one-hot) for a categorical one.
    numeric
        Whether the feature is numeric (else categorical).
    """

    name: str
    columns: tuple[int, ...]
    numeric: bool


@dataclass(frozen=True)
class FeatureLayout:
    """The public structure of the encoded columns that ``feature_stats`` summarises.

    Build it with :meth:`from_groups` or :meth:`from_params`, which check it.

    Attributes
    ----------
    names
        ``(d,)`` encoded column names.
    features
        Every original feature, ordered by its first column; together they cover each
        column exactly once.
    """

    names: tuple[str, ...]
    features: tuple[EncodedFeature, ...]

    @classmethod
    def from_groups(
        cls, encoded_names: Sequence[object], groups: Mapping[str, object] | None = None
    ) -> FeatureLayout:
        """Recognise numeric and one-hot features from column names and groups.

        A group of one column named exactly as the group is a numeric feature; a group
        whose columns are all named ``"{group}={category}"`` is a categorical one (the
        naming of :class:`fedlens.datasets.Preprocessor`). Without groups, every column
        is a numeric feature of its own.

        Raises
        ------
        ConfigurationError
            No columns, repeated column names, or groups that name an unknown column,
            share a column, leave a column out, or do not match their columns' names.
        """
        if not encoded_names:
            raise ConfigurationError("feature_stats needs at least one feature column")
        if not all(isinstance(n, str) and n for n in encoded_names):
            raise ConfigurationError("feature_names must be non-empty strings")
        names = tuple(str(n) for n in encoded_names)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigurationError(f"feature_names repeat {', '.join(map(repr, repeated))}")
        if groups is None:
            features = tuple(EncodedFeature(n, (j,), True) for j, n in enumerate(names))
            return cls(names=names, features=features)
        owner: dict[int, str] = {}
        found = []
        for group, raw in groups.items():
            columns = _group_columns(group, raw, len(names))
            for j in columns:
                if j in owner:
                    raise ConfigurationError(
                        f"column {j} ({names[j]!r}) is in both groups {owner[j]!r} and {group!r}"
                    )
                owner[j] = group
            found.append(EncodedFeature(group, columns, _group_is_numeric(group, columns, names)))
        missing = [j for j in range(len(names)) if j not in owner]
        if missing:
            listed = ", ".join(f"{j} ({names[j]!r})" for j in missing)
            raise ConfigurationError(f"columns in no group: {listed}")
        features = tuple(sorted(found, key=lambda f: f.columns[0]))
        return cls(names=names, features=features)

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, str],
        *,
        dimension: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> FeatureLayout:
        """The layout a round declares in ``params["feature_names"]`` and ``["groups"]``.

        Without ``feature_names`` every column is a numeric feature, named ``x0``, ``x1``,
        ... (when ``dimension`` is given) or as the first half of ``labels``.

        Parameters
        ----------
        params
            The round's parameters; ``feature_names`` a JSON list of column names,
            ``groups`` a JSON object mapping feature names to lists of column indices.
        dimension
            The number of encoded columns of the data, when known.
        labels
            The round's coordinate labels, when known; they must be the layout's.

        Raises
        ------
        ConfigurationError
            Malformed JSON, ``groups`` without ``feature_names``, a layout that
            :meth:`from_groups` refuses, or one that does not match ``dimension`` or
            ``labels``.
        """
        groups = _json_object(params, "groups") if "groups" in params else None
        names: Sequence[object]
        if "feature_names" in params:
            names = _json_list(params, "feature_names")
        elif groups is not None:
            raise ConfigurationError("groups need feature_names to name their columns")
        elif dimension is not None:
            names = tuple(f"x{j}" for j in range(dimension))
        elif labels is not None and len(labels) % 2 == 0:
            names = tuple(labels[: len(labels) // 2])
        else:
            raise ConfigurationError("feature_stats needs feature_names or the feature count")
        layout = cls.from_groups(names, groups)
        if dimension is not None and dimension != layout.dimension:
            raise ConfigurationError(
                f"{layout.dimension} feature names for {dimension} feature columns"
            )
        if labels is not None and tuple(labels) != layout.coordinate_labels:
            raise ConfigurationError(
                f"round labels do not match feature_names and groups: expected "
                f"{len(layout.coordinate_labels)} labels {layout.coordinate_labels[:4]}..., "
                f"got {len(labels)} {tuple(labels[:4])}..."
            )
        return layout

    @property
    def dimension(self) -> int:
        """Number of encoded columns ``d``."""
        return len(self.names)

    @property
    def numeric_columns(self) -> tuple[int, ...]:
        """Columns of the numeric features, ascending; ``(p,)``."""
        return tuple(f.columns[0] for f in self.features if f.numeric)

    @property
    def coordinate_labels(self) -> tuple[str, ...]:
        """Names of the summed coordinates: every column, then ``"{name}^2"`` per numeric."""
        return self.names + tuple(f"{self.names[j]}^2" for j in self.numeric_columns)

    @property
    def term_bound(self) -> float:
        """``B = sqrt(2 p + c)``: the largest L2 norm of an unscaled encoded record's term."""
        numeric = len(self.numeric_columns)
        return math.sqrt(2 * numeric + (len(self.features) - numeric))


def _json_value(params: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(params[key])
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"parameter {key!r} is not valid JSON: {exc}") from None


def _json_list(params: Mapping[str, str], key: str) -> list[object]:
    value = _json_value(params, key)
    if not isinstance(value, list):
        raise ConfigurationError(f"parameter {key!r} must be a JSON list, got {value!r:.80}")
    return value


def _json_object(params: Mapping[str, str], key: str) -> dict[str, object]:
    value = _json_value(params, key)
    if not isinstance(value, dict):
        raise ConfigurationError(f"parameter {key!r} must be a JSON object, got {value!r:.80}")
    return value


def _group_columns(group: str, raw: object, dimension: int) -> tuple[int, ...]:
    if not isinstance(group, str) or not group:
        raise ConfigurationError(f"group names must be non-empty strings, got {group!r}")
    if not isinstance(raw, list | tuple) or not raw:
        raise ConfigurationError(f"group {group!r} must list at least one column index")
    for j in raw:
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < dimension:
            raise ConfigurationError(
                f"group {group!r} names column {j!r}, not an index in [0, {dimension})"
            )
    if len(set(raw)) != len(raw):
        raise ConfigurationError(f"group {group!r} repeats a column")
    return tuple(sorted(raw))


def _group_is_numeric(group: str, columns: tuple[int, ...], names: tuple[str, ...]) -> bool:
    """Numeric if one column named as the group, categorical if all are ``group=...``."""
    if len(columns) == 1 and names[columns[0]] == group:
        return True
    for j in columns:
        if not names[j].startswith(f"{group}="):
            raise ConfigurationError(
                f"group {group!r} does not match column {j} ({names[j]!r}): expected the "
                f"column {group!r} of a numeric feature or {group + '=<category>'!r} columns"
            )
    return False


def feature_stats_terms(
    features: np.ndarray, layout: FeatureLayout, clip_bound: float
) -> np.ndarray:
    """Every record's ``feature_stats`` term, scaled so that its L2 norm is at most the bound.

    Parameters
    ----------
    features
        ``(n, d)`` encoded records, values in ``[0, 1]``, at most one category per
        categorical feature.
    layout
        Which columns are numeric and which one-hot.
    clip_bound
        ``C``, the round's per-record L2 bound.

    Returns
    -------
    numpy.ndarray
        ``(n, d + p)`` float64: ``(C / B) * [x, x_numeric^2]`` per row (module docstring),
        every row's L2 norm at most ``C``. Rows outside the encoded domain are clipped to
        ``C`` (only then is a row changed by more than the scale).

    Raises
    ------
    ExplanationError
        ``features`` is not ``(n, d)`` or holds NaN or infinite values.
    ConfigurationError
        ``clip_bound`` is not finite and > 0.
    """
    if features.ndim != 2 or features.shape[1] != layout.dimension:
        raise ExplanationError(
            f"features must have shape (n, {layout.dimension}), got {features.shape}"
        )
    if not math.isfinite(clip_bound) or clip_bound <= 0:
        raise ConfigurationError(f"clip bound must be finite and > 0, got {clip_bound!r}")
    x = np.asarray(features, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ExplanationError("features contain NaN or infinite values")
    numeric = list(layout.numeric_columns)
    raw = np.concatenate([x, np.square(x[:, numeric])], axis=1)
    # Within the encoded domain this already bounds the norm; clip_rows absorbs rounding
    # and enforces the bound for rows outside it.
    return clip_rows(raw * (clip_bound / layout.term_bound), clip_bound)


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
    del model, labels, sensitive, context  # statistics of the inputs alone
    if features.ndim != 2:
        raise ExplanationError(f"features must be (n, d), got shape {features.shape}")
    layout = FeatureLayout.from_params(params, dimension=features.shape[1])
    terms = feature_stats_terms(features, layout, clip_bound)
    count = terms.shape[0]
    vector = np.concatenate([terms.sum(axis=0), [count * clip_bound]])
    return Contribution(vector=vector, count=count, labels=layout.coordinate_labels)


def _postprocess(
    noised_sum: np.ndarray,
    noise_std: float,
    clip_bound: float,
    labels: tuple[str, ...],
    params: Mapping[str, str],
) -> PostProcessed:
    layout = FeatureLayout.from_params(params, labels=labels)
    if noised_sum.shape != (len(labels) + 1,):
        raise ConfigurationError(
            f"noised sum has shape {noised_sum.shape}, expected ({len(labels) + 1},)"
        )
    if not math.isfinite(clip_bound) or clip_bound <= 0:
        raise ConfigurationError(f"clip bound must be finite and > 0, got {clip_bound!r}")
    if not math.isfinite(noise_std) or noise_std < 0:
        raise ConfigurationError(f"noise std must be finite and >= 0, got {noise_std!r}")
    noised_count = float(noised_sum[-1] / clip_bound)
    # As for global_attribution: a tiny or negative noised count makes no divisor.
    divisor = max(noised_count, 1.0)
    unscale = layout.term_bound / clip_bound
    moments = np.asarray(noised_sum[:-1], dtype=np.float64) * unscale / divisor
    sd = noise_std * unscale / divisor
    first, second = moments[: layout.dimension], moments[layout.dimension :]
    square_of = {j: k for k, j in enumerate(layout.numeric_columns)}
    values: list[ReleasedValue] = []
    for feature in layout.features:
        if feature.numeric:
            j = feature.columns[0]
            values.extend(_numeric_values(feature.name, first[j], second[square_of[j]], sd))
        else:
            freqs = _project_frequencies(first[list(feature.columns)])
            values.extend(
                ReleasedValue(name=f"{layout.names[j]}:freq", value=float(f), noise_std=sd)
                for j, f in zip(feature.columns, freqs, strict=True)
            )
    return PostProcessed(noised_count=noised_count, values=tuple(values), grouped=())


def _numeric_values(
    name: str, mean: float, second_moment: float, sd: float
) -> tuple[ReleasedValue, ...]:
    m = float(np.clip(mean, 0.0, 1.0))
    std = min(math.sqrt(max(float(second_moment) - m * m, 0.0)), _MAX_STD)
    # std = sqrt(q - m^2), with independent noise of std sd in q and in m, so to first
    # order d std = (dq - 2 m dm) / (2 std): var(std) = sd^2 (1 + 4 m^2) / (4 std^2) and
    # cov(m, std) = -m sd^2 / std. Near zero spread the derivative blows up while the
    # error of a square root stays below the root of the variance's error: cap there.
    sd_var = sd * math.sqrt(1.0 + 4.0 * m * m)
    if std > 0 and sd_var / (2.0 * std) < math.sqrt(sd_var):
        sd_std, cov = sd_var / (2.0 * std), -m * sd * sd / std
    else:
        sd_std, cov = math.sqrt(sd_var), 0.0
    # var(m -+ k std) = var(m) + k^2 var(std) -+ 2 k cov(m, std).
    spread = sd * sd + (_RANGE_STDS * sd_std) ** 2
    sd_low = math.sqrt(max(spread - 2.0 * _RANGE_STDS * cov, 0.0))
    sd_high = math.sqrt(max(spread + 2.0 * _RANGE_STDS * cov, 0.0))
    low = min(max(m - _RANGE_STDS * std, 0.0), 1.0)
    high = min(max(m + _RANGE_STDS * std, 0.0), 1.0)
    return (
        ReleasedValue(name=f"{name}:mean", value=m, noise_std=sd),
        ReleasedValue(name=f"{name}:std", value=std, noise_std=sd_std),
        ReleasedValue(name=f"{name}:low", value=low, noise_std=sd_low),
        ReleasedValue(name=f"{name}:high", value=high, noise_std=sd_high),
    )


def _project_frequencies(raw: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``(k,)`` noised frequencies onto ``{f >= 0, sum f <= 1}``.

    Clamping at zero is the projection unless the clamped sum exceeds one; then it is
    the projection onto the probability simplex (Duchi et al., ICML 2008).
    """
    clamped: np.ndarray = np.maximum(raw, 0.0)
    if clamped.sum() <= 1.0:
        return clamped
    ordered = np.sort(raw)[::-1]
    cumulative = np.cumsum(ordered) - 1.0
    ranks = np.arange(1, raw.size + 1)
    last = int(np.flatnonzero(ordered - cumulative / ranks > 0)[-1])
    projected: np.ndarray = np.maximum(raw - cumulative[last] / (last + 1), 0.0)
    return projected


def _coordinate_labels(
    encoded_names: Sequence[str], groups: Mapping[str, Sequence[int]], params: Mapping[str, str]
) -> tuple[str, ...]:
    del params  # the layout is the public encoding's alone
    return FeatureLayout.from_groups(encoded_names, groups).coordinate_labels


FEATURE_STATS = register_kind(
    ExplanationKind(
        name="feature_stats",
        contribute=_contribute,
        postprocess=_postprocess,
        coordinate_labels=_coordinate_labels,
    )
)
