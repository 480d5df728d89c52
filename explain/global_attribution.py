"""``global_attribution``: mean attribution per feature and class, optionally per cohort.

Parameters (the round's ``params``, all strings)
------------------------------------------------
``method``
    ``"integrated_gradients"`` (default), ``"gradient_shap"`` or ``"feature_ablation"``
    (:mod:`explain.attribution_methods`). ``n_steps`` (Integrated Gradients),
    ``n_samples`` and ``seed`` (GradientSHAP) tune them.
``baseline``
    JSON list of ``d`` encoded values: the reference point of every method; zeros (the
    low end of every scaled range, no category) by default. ``baselines`` (GradientSHAP
    only) is a JSON list of such lists to draw from, ``[baseline]`` by default. Both must
    be public — the schema, or released DP statistics such as ``feature_stats`` means —
    never another site's records.
``target``
    ``"logit"`` (default): one coordinate per encoded column, the attribution of the
    class-1 logit ``z = log(p1 / p0)``. ``"both"``: the class-1 block followed by the
    class-0 block, labelled ``"age|class=1"`` ... ``"age|class=0"``. Class 0 is explained
    through its own logit ``log(p0 / p1) = -z``; every method here is linear in the
    explained output, so the class-0 block is exactly the negation of the class-1 block.
    The release shows the attribution towards each class under its own name; the
    price is that the two blocks share one clip bound.
``cohort``
    JSON object naming features of the public schema: a categorical feature maps to a
    list of its categories (``{"sex": ["Female"]}``), a numeric feature to an inclusive
    ``[low, high]`` range in raw units (``{"age": [30, 50]}``). A record belongs to the
    cohort when it matches every named feature (any listed category of it). The kind
    sees encoded records only, so it reads the layout from ``feature_names`` and
    ``groups`` and the public numeric scales from ``feature_ranges``
    (``{"age": {"low": 17, "high": 90, "log": false}}``); :func:`attribution_params`
    builds all three from a :class:`fedlens.datasets.Preprocessor`. A raw value outside
    the public range encodes as the range's end, so it counts as that end. Filters that
    name no feature or category of the layout are refused with
    :class:`~fedlens.errors.ConfigurationError` — by the post-processor too, so at
    ``OpenRound``, before any site is asked.
``min_cohort_size``
    Default 50. A site whose cohort holds fewer records raises
    :class:`~fedlens.errors.ExplanationError` from ``contribute``, which the site runs
    before it advertises a key or records a spend, and declines the round: the round
    aborts and no site spends anything. The refusal itself is not private: it tells the
    coordinator (and whoever reads the round's status) that this site's cohort has fewer
    than ``min_cohort_size`` records — never the count itself.

Privacy
-------
Each in-cohort record's whole term (both class blocks together under ``"both"``) is
clipped to L2 norm ``clip_bound``; records outside the cohort contribute nothing, count
included. Every term is a function of its record alone (GradientSHAP seeds its draws
from the record, see :func:`explain.attribution_methods.gradient_shap`), so adding or
removing one record moves a site's vector by at most ``sqrt(2) * clip_bound`` (term plus
count coordinate, :func:`explain.registry.l2_sensitivity`) whatever the method, target
or cohort. The released value is the noised sum divided by the noised count: a
post-processing of DP sums, so it costs no further privacy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from torch import nn

from explain.attribution_methods import (
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    feature_ablation,
    gradient_shap,
    integrated_gradients,
)
from explain.registry import (
    Contribution,
    ExplanationKind,
    PostProcessed,
    SiteContext,
    register_kind,
)
from fedlens.datasets import Preprocessor
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.types import ReleasedValue
from privacy import clip_rows

__all__ = [
    "DEFAULT_MIN_COHORT",
    "DEFAULT_STEPS",
    "GLOBAL_ATTRIBUTION",
    "METHODS",
    "TARGETS",
    "AttributionSettings",
    "Cohort",
    "attribution_params",
    "integrated_gradients",
]

_T = TypeVar("_T")

METHODS = ("integrated_gradients", "gradient_shap", "feature_ablation")
TARGETS = ("logit", "both")
DEFAULT_MIN_COHORT = 50


@dataclass(frozen=True)
class Cohort:
    """A filter on encoded records, parsed from ``params["cohort"]``.

    Attributes
    ----------
    categories
        Feature -> encoded columns of its selected categories; a record matches when
        one of them is set.
    ranges
        Feature -> ``(column, low, high)``: the encoded column and the inclusive bounds
        of the raw range, mapped through the feature's public scale.
    """

    categories: Mapping[str, tuple[int, ...]]
    ranges: Mapping[str, tuple[int, float, float]]

    def select(self, features: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: which of the ``(n, d)`` encoded records belong to the cohort."""
        keep = np.ones(features.shape[0], dtype=bool)
        for cols in self.categories.values():
            keep &= (features[:, list(cols)] > 0.5).any(axis=1)
        for col, low, high in self.ranges.values():
            # Compare in float32, as the encoder stores: monotone rounding keeps a raw
            # value equal to a bound inside the range.
            column = features[:, col].astype(np.float32)
            keep &= (column >= np.float32(low)) & (column <= np.float32(high))
        return keep


@dataclass(frozen=True)
class AttributionSettings:
    """Everything ``global_attribution`` reads from a round's parameters."""

    method: str
    target: str
    n_steps: int
    n_samples: int
    seed: int
    baseline: np.ndarray | None
    baselines: np.ndarray | None
    cohort: Cohort | None
    min_cohort_size: int

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> AttributionSettings:
        """Parse and validate ``params``.

        Raises
        ------
        ConfigurationError
            An unknown method or target, a malformed number or JSON value, or a cohort
            naming no feature or category of the layout; the message names it.
        """
        method = params.get("method", "integrated_gradients")
        if method not in METHODS:
            raise ConfigurationError(
                f"unknown attribution method {method!r}; available: {', '.join(METHODS)}"
            )
        target = params.get("target", "logit")
        if target not in TARGETS:
            raise ConfigurationError(
                f"unknown attribution target {target!r}; available: {', '.join(TARGETS)}"
            )
        baseline = _float_array(params, "baseline", ndim=1)
        baselines = _float_array(params, "baselines", ndim=2)
        if baselines is None and baseline is not None:
            baselines = baseline[None, :]
        return cls(
            method=method,
            target=target,
            n_steps=_int(params, "n_steps", DEFAULT_STEPS, low=1),
            n_samples=_int(params, "n_samples", DEFAULT_SAMPLES, low=1),
            seed=_int(params, "seed", 0, low=0),
            baseline=baseline,
            baselines=baselines,
            cohort=_parse_cohort(params) if "cohort" in params else None,
            min_cohort_size=_int(params, "min_cohort_size", DEFAULT_MIN_COHORT, low=1),
        )


def attribution_params(
    pre: Preprocessor,
    *,
    method: str = "integrated_gradients",
    target: str = "logit",
    cohort: Mapping[str, Sequence[object]] | None = None,
    **extra: str,
) -> dict[str, str]:
    """The parameters of a ``global_attribution`` round over ``pre``'s public encoding.

    Parameters
    ----------
    pre
        The encoder every site uses; its column names, groups and numeric scales are
        public.
    method, target, cohort
        As in the module docstring; ``cohort`` as a mapping, serialised here.
    extra
        Further parameters (``n_steps``, ``seed``, ``min_cohort_size``, ...), verbatim.

    Raises
    ------
    ConfigurationError
        The parameters do not parse (see :meth:`AttributionSettings.from_params`).
    """
    params = {
        "feature_names": json.dumps(list(pre.encoded_names)),
        "groups": json.dumps({k: list(v) for k, v in pre.groups.items()}),
        "feature_ranges": json.dumps(
            {
                spec.name: {"low": spec.low, "high": spec.high, "log": spec.log}
                for spec in pre.schema.features
                if spec.kind == "numeric"
            }
        ),
        "method": method,
        "target": target,
        **extra,
    }
    if cohort is not None:
        params["cohort"] = json.dumps({k: list(v) for k, v in cohort.items()})
    AttributionSettings.from_params(params)
    return params


def _coordinate_labels(
    encoded_names: Sequence[str], groups: Mapping[str, Sequence[int]], params: Mapping[str, str]
) -> tuple[str, ...]:
    del groups  # one coordinate per encoded column and class
    if params.get("target", "logit") == "both":
        return tuple(f"{n}|class=1" for n in encoded_names) + tuple(
            f"{n}|class=0" for n in encoded_names
        )
    return tuple(encoded_names)


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
    del (
        labels,
        sensitive,
        context,
    )  # attributions explain the prediction, whatever the record's label
    settings = AttributionSettings.from_params(params)
    names = (
        tuple(str(n) for n in _json(params, "feature_names", list))
        if "feature_names" in params
        else tuple(f"x{i}" for i in range(features.shape[-1]))
    )
    if features.ndim == 2 and len(names) != features.shape[1]:
        raise ExplanationError(
            f"{len(names)} feature names for {features.shape[1]} feature columns"
        )
    if settings.cohort is not None and features.ndim == 2:
        features = features[settings.cohort.select(features)]
        if features.shape[0] < settings.min_cohort_size:
            # The count stays at the site: the refusal reveals only that it is small.
            raise ExplanationError(
                f"fewer than {settings.min_cohort_size} records of this site are in the "
                "cohort; the site declines"
            )
    attributions = _attribute(model, features, settings)
    if settings.target == "both":
        attributions = np.concatenate([attributions, -attributions], axis=1)
    clipped = clip_rows(attributions, clip_bound)  # the whole term, both classes together
    count = clipped.shape[0]
    vector = np.concatenate([clipped.sum(axis=0), [count * clip_bound]])
    return Contribution(vector=vector, count=count, labels=_coordinate_labels(names, {}, params))


def _attribute(model: nn.Module, features: np.ndarray, s: AttributionSettings) -> np.ndarray:
    if s.method == "gradient_shap":
        return gradient_shap(
            model, features, baselines=s.baselines, n_samples=s.n_samples, seed=s.seed
        )
    if s.method == "feature_ablation":
        return feature_ablation(model, features, baseline=s.baseline)
    return integrated_gradients(model, features, baseline=s.baseline, n_steps=s.n_steps)


def _postprocess(
    noised_sum: np.ndarray,
    noise_std: float,
    clip_bound: float,
    labels: tuple[str, ...],
    params: Mapping[str, str],
) -> PostProcessed:
    # Validates method, target and cohort, so a bad round is refused at OpenRound.
    settings = AttributionSettings.from_params(params)
    if "feature_names" in params:
        names = [str(n) for n in _json(params, "feature_names", list)]
        if settings.baselines is not None and settings.baselines.shape[1] != len(names):
            raise ConfigurationError(
                f"baselines have {settings.baselines.shape[1]} values, "
                f"the layout {len(names)} columns"
            )
        expected = _coordinate_labels(names, {}, params)
        if tuple(labels) != expected:
            raise ConfigurationError(
                f"round labels do not match feature_names and target {settings.target!r}: "
                f"expected {len(expected)} labels {expected[:3]}..., "
                f"got {len(labels)} {tuple(labels[:3])}..."
            )
    noised_count = float(noised_sum[-1] / clip_bound)
    # A noised count can be tiny or negative when few records took part; the mean is
    # then meaningless, so floor the divisor at one record.
    divisor = max(noised_count, 1.0)
    means = noised_sum[:-1] / divisor
    std = noise_std / divisor
    values = tuple(
        ReleasedValue(name=name, value=float(v), noise_std=std)
        for name, v in zip(labels, means, strict=True)
    )
    groups: Mapping[str, list[int]] = _json(params, "groups", dict) if "groups" in params else {}
    blocks: tuple[tuple[str, int], ...] = (("", 0),)
    if settings.target == "both":
        d = len(labels) // 2
        blocks = (("|class=1", 0), ("|class=0", d))
    grouped = tuple(
        ReleasedValue(
            name=f"{feature}{suffix}",
            value=float(means[[offset + j for j in cols]].sum()),
            noise_std=float(std * np.sqrt(len(cols))),
        )
        for suffix, offset in blocks
        for feature, cols in groups.items()
    )
    grouped = tuple(sorted(grouped, key=lambda v: -abs(v.value)))
    return PostProcessed(noised_count=noised_count, values=values, grouped=grouped)


# -- parameter parsing -----------------------------------------------------------------------


def _json(params: Mapping[str, str], key: str, kind: type[_T]) -> _T:
    try:
        value = json.loads(params[key])
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"parameter {key!r} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise ConfigurationError(
            f"parameter {key!r} must be a JSON {kind.__name__}, got {value!r:.80}"
        )
    return value


def _int(params: Mapping[str, str], key: str, default: int, *, low: int) -> int:
    if key not in params:
        return default
    try:
        value = int(params[key])
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"parameter {key!r} must be an integer, got {params[key]!r}"
        ) from None
    if value < low:
        raise ConfigurationError(f"parameter {key!r} must be at least {low}, got {value}")
    return value


def _float_array(params: Mapping[str, str], key: str, *, ndim: int) -> np.ndarray | None:
    if key not in params:
        return None
    raw = _json(params, key, list)
    try:
        value = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigurationError(f"parameter {key!r} must hold numbers, got {raw!r:.80}") from None
    if value.ndim != ndim or value.size == 0 or not np.all(np.isfinite(value)):
        shape = "a list of numbers" if ndim == 1 else "a list of equally long lists of numbers"
        raise ConfigurationError(f"parameter {key!r} must be {shape}, got {raw!r:.80}")
    return value


def _parse_cohort(params: Mapping[str, str]) -> Cohort:
    spec = _json(params, "cohort", dict)
    if not spec:
        raise ConfigurationError("parameter 'cohort' is empty; name at least one feature")
    if "feature_names" not in params or "groups" not in params:
        raise ConfigurationError("a cohort needs feature_names and groups to find its columns")
    names = [str(n) for n in _json(params, "feature_names", list)]
    groups = _json(params, "groups", dict)
    scales = _json(params, "feature_ranges", dict) if "feature_ranges" in params else {}
    categories: dict[str, tuple[int, ...]] = {}
    ranges: dict[str, tuple[int, float, float]] = {}
    for feature, wanted in spec.items():
        if feature not in groups:
            raise ConfigurationError(
                f"cohort names unknown feature {feature!r}; known: {', '.join(groups)}"
            )
        cols = groups[feature]
        if not isinstance(cols, list) or not all(
            isinstance(j, int) and 0 <= j < len(names) for j in cols
        ):
            raise ConfigurationError(f"group {feature!r} does not list columns of feature_names")
        if not isinstance(wanted, list) or not wanted:
            raise ConfigurationError(f"cohort feature {feature!r} must map to a non-empty list")
        if feature in scales:
            ranges[feature] = _encoded_range(feature, cols, wanted, scales[feature])
        elif len(cols) == 1 and names[cols[0]] == feature:
            raise ConfigurationError(
                f"cohort feature {feature!r} is numeric but feature_ranges gives no public "
                "range to encode its bounds"
            )
        else:
            by_category = {names[j].removeprefix(f"{feature}="): j for j in cols}
            for category in wanted:
                if not isinstance(category, str) or category not in by_category:
                    raise ConfigurationError(
                        f"cohort names unknown category {category!r} of feature {feature!r}; "
                        f"known: {', '.join(by_category)}"
                    )
            categories[feature] = tuple(sorted({by_category[c] for c in wanted}))
    return Cohort(categories=categories, ranges=ranges)


def _encoded_range(
    feature: str, cols: list[int], wanted: list[object], scale: object
) -> tuple[int, float, float]:
    """``(column, low, high)`` of a raw ``[low, high]`` filter, mapped like the encoder."""
    if len(cols) != 1:
        raise ConfigurationError(f"feature_ranges lists {feature!r}, which has several columns")
    bounds = [float(v) for v in wanted if isinstance(v, int | float) and not isinstance(v, bool)]
    if (
        len(wanted) != 2
        or len(bounds) != 2
        or not all(math.isfinite(v) for v in bounds)
        or bounds[0] > bounds[1]
    ):
        raise ConfigurationError(
            f"cohort feature {feature!r} is numeric: give [low, high] with low <= high, "
            f"got {wanted!r:.80}"
        )
    if not isinstance(scale, dict) or not {"low", "high"} <= scale.keys():
        raise ConfigurationError(f"feature_ranges[{feature!r}] needs low and high")
    lo, hi, log = float(scale["low"]), float(scale["high"]), bool(scale.get("log", False))
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo or (log and lo <= -1.0):
        raise ConfigurationError(f"feature_ranges[{feature!r}] is not a valid scale")

    def encode(v: float) -> float:
        # The same map as fedlens.datasets.Preprocessor: log1p first for log scales.
        if log:
            v, a, b = math.log1p(max(v, lo)), math.log1p(lo), math.log1p(hi)
        else:
            a, b = lo, hi
        return min(max((v - a) / (b - a), 0.0), 1.0)

    return cols[0], encode(bounds[0]), encode(bounds[1])


GLOBAL_ATTRIBUTION = register_kind(
    ExplanationKind(
        name="global_attribution",
        contribute=_contribute,
        postprocess=_postprocess,
        coordinate_labels=_coordinate_labels,
    )
)
