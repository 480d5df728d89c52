"""``fairness``: DP confusion counts per sensitive group, gaps, and what explains the gap.

What the analyst gets
---------------------
For every group of every *partition* — one partition per sensitive attribute named in
``params["sensitive"]`` and one per intersection of two of them — the noised record
count (``"sex=Female:count"``) and, for groups whose noised count reaches
``min_group_size``, the accuracy, selection rate, true-positive rate and false-positive
rate of the global model's predictions (``"sex=Female:tpr"``; a TPR or FPR also needs
that many noised positives or negatives). For each partition with at least two such
groups, the largest differences between its groups (``max - min``, as
:meth:`fairlearn.metrics.MetricFrame.difference` computes them):
``"gap:demographic_parity:sex"`` (selection rate), ``"gap:equalised_odds_tpr:sex"``,
``"gap:equalised_odds_fpr:sex"``, ``"gap:equalised_odds:sex"`` (the larger of the two)
and ``"gap:accuracy:sex"``. Intersection partitions are named ``"sex&race"``, their
groups ``"sex=Female&race=White"``; a record whose value is missing or not among the
public categories belongs to no group of that partition.

The explanation of the gap: for each partition, the two groups with the highest and the
lowest selection rate (the pair behind its demographic-parity gap), and the difference of
their mean Integrated-Gradients attributions (computed with
:func:`explain.global_attribution.integrated_gradients`) per encoded column
(``"attribution_gap:sex=Male vs sex=Female:age"``) and, with ``params["groups"]``, per
original feature in ``grouped``, largest first. It is part of the same vector, so one
round (one ε) pays for counts and attributions together, and the pair is chosen from
the same noised counts by post-processing, at no further cost. ``attribution="false"``
leaves it out and gives the whole norm to the counts.

Per-record term and sensitivity
-------------------------------
With ``P`` partitions, ``G`` groups in all, ``C`` the round's ``clip_bound`` and
``s = C / sqrt(2 P)`` (``C / sqrt(P)`` without attributions), a record with label ``y``,
prediction ``p`` (logit > 0) and clipped attribution ``a`` (L2 norm at most
``attribution_clip = A``) contributes

* ``s`` to the cell ``(g, y, p)`` of each group ``g`` it belongs to — at most one per
  partition, so at most ``P`` cells: squared norm at most ``s^2 P``;
* ``s a / A`` to the attribution block of each such group: at most ``P`` blocks of
  norm at most ``s``, squared norm at most ``s^2 P``.

So every term's L2 norm is at most ``C`` by construction, and a site's vector
``[sum of terms, count * C]`` has L2 sensitivity ``sqrt(2) C`` under adding or removing
one record (:func:`explain.registry.l2_sensitivity`); with Gaussian noise of standard
deviation ``z sqrt(2) C`` per coordinate it is (epsilon, delta)-DP (Balle & Wang, ICML
2018), and everything below is post-processing.

Intervals
---------
Each :class:`fedlens.types.ReleasedValue` carries in ``noise_std`` the standard deviation
of the privacy noise in its value, to first order (delta method); its 95% interval is
``value ± 1.96 noise_std`` (:func:`interval`). With ``v = (sigma / s)^2`` the noise
variance of one cell in records (``sigma`` the ``noise_std`` of the sum), a rate
``a / (a + b)`` of noised cell sums ``a``, ``b`` with variances ``v_a``, ``v_b`` has
variance ``(b^2 v_a + a^2 v_b) / (a + b)^4``; a gap between two groups adds the two
variances (disjoint cells, independent noise). The intervals treat the groups behind a
gap as fixed (the argmax and argmin of noised rates are chosen from the same noise) and
ignore the clamping of noised cells at zero. They cover the privacy noise only, not the
sampling of the records. Attribution gaps carry ``sigma A / s`` per block coordinate
divided by each group's noised count, ignoring the noise in the counts, as
``global_attribution`` does.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from torch import nn

from explain.global_attribution import DEFAULT_STEPS, integrated_gradients
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

__all__ = ["FAIRNESS", "FairnessLayout", "FairnessRelease", "fairness_release", "interval"]

logger = logging.getLogger(__name__)

# Cell order within a group: index 2 * label + prediction.
CELLS = ("tn", "fp", "fn", "tp")
DEFAULT_MIN_GROUP_SIZE = 30
Z_95 = 1.959963984540054
_RESERVED = ("=", "&", ":")


@dataclass(frozen=True)
class Partition:
    """One sensitive attribute, or the intersection of two, and its groups.

    ``attributes`` are the attributes it crosses; ``groups`` its group names in
    row-major order of the attributes' categories; ``offset`` the index of its first
    group among all groups of the layout.
    """

    name: str
    attributes: tuple[str, ...]
    groups: tuple[str, ...]
    offset: int


@dataclass(frozen=True)
class FairnessLayout:
    """The public structure of a ``fairness`` round, read from its parameters.

    Attributes
    ----------
    categories
        Sensitive attribute -> its public categories, in the order of ``params``.
    partitions
        The attributes, then the requested intersections.
    min_group_size
        Smallest noised count (of a group, or of a rate's denominator) released.
    attribution_names
        Encoded column names of the attribution blocks; empty without attributions.
    attribution_clip
        ``A``, the L2 bound of one record's attribution vector.
    n_steps
        Integrated-Gradients steps.
    """

    categories: Mapping[str, tuple[str, ...]]
    partitions: tuple[Partition, ...]
    min_group_size: int
    attribution_names: tuple[str, ...]
    attribution_clip: float
    n_steps: int

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, str],
        *,
        dimension: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> FairnessLayout:
        """Read and check ``sensitive``, ``intersections``, ``min_group_size``,
        ``attribution``, ``attribution_clip``, ``n_steps`` and ``feature_names``.

        ``sensitive`` is a JSON object mapping attributes to lists of categories;
        ``intersections`` a JSON list of attribute pairs (every pair by default, ``[]``
        for none). Without ``feature_names`` the attribution columns are ``x0``, ``x1``,
        ... for ``dimension`` columns or as many as ``labels`` imply.

        Raises
        ------
        ConfigurationError
            Malformed JSON, an unknown attribute in an intersection, repeated or empty
            names, an out-of-range number, or layout that does not match ``dimension``
            or ``labels``.
        """
        categories = _sensitive(params)
        partitions = [
            Partition(a, (a,), tuple(f"{a}={c}" for c in cats), 0) for a, cats in categories.items()
        ]
        for a, b in _intersections(params, tuple(categories)):
            groups = tuple(f"{a}={ca}&{b}={cb}" for ca in categories[a] for cb in categories[b])
            partitions.append(Partition(f"{a}&{b}", (a, b), groups, 0))
        offset, placed = 0, []
        for p in partitions:
            placed.append(Partition(p.name, p.attributes, p.groups, offset))
            offset += len(p.groups)
        min_size = _number(params, "min_group_size", DEFAULT_MIN_GROUP_SIZE, integer=True)
        clip = _number(params, "attribution_clip", 1.0, integer=False)
        steps = _number(params, "n_steps", DEFAULT_STEPS, integer=True)
        attribution = params.get("attribution", "true").lower()
        if attribution not in ("true", "false"):
            raise ConfigurationError(f"attribution must be 'true' or 'false', got {attribution!r}")
        names: tuple[str, ...] = ()
        if attribution == "true":
            names = _attribution_names(params, offset, dimension, labels)
        layout = cls(categories, tuple(placed), int(min_size), names, float(clip), int(steps))
        if labels is not None and tuple(labels) != layout.coordinate_labels:
            raise ConfigurationError(
                f"round labels do not match the fairness parameters: expected "
                f"{len(layout.coordinate_labels)} labels {layout.coordinate_labels[:4]}..., "
                f"got {len(labels)} {tuple(labels[:4])}..."
            )
        return layout

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(g for p in self.partitions for g in p.groups)

    @property
    def coordinate_labels(self) -> tuple[str, ...]:
        """``"{group}:{cell}"`` for every group and cell, then ``"{group}:attr:{column}"``."""
        cells = tuple(f"{g}:{c}" for g in self.groups for c in CELLS)
        return cells + tuple(f"{g}:attr:{n}" for g in self.groups for n in self.attribution_names)

    def scale(self, clip_bound: float) -> float:
        """``s``: the weight of one cell, so that every record's term has norm ``<= C``."""
        parts = len(self.partitions) * (2 if self.attribution_names else 1)
        return clip_bound / math.sqrt(parts)


def _json(params: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(params[key])
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"parameter {key!r} is not valid JSON: {exc}") from None


def _name_ok(name: object) -> bool:
    return isinstance(name, str) and bool(name) and not any(r in name for r in _RESERVED)


def _sensitive(params: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    if "sensitive" not in params:
        raise ConfigurationError(
            "fairness needs parameter 'sensitive': a JSON object of attribute -> categories"
        )
    raw = _json(params, "sensitive")
    if not isinstance(raw, dict) or not raw:
        raise ConfigurationError(
            f"parameter 'sensitive' must be a non-empty JSON object, got {raw!r:.80}"
        )
    out: dict[str, tuple[str, ...]] = {}
    for attribute, cats in raw.items():
        if not _name_ok(attribute):
            raise ConfigurationError(
                f"sensitive attribute {attribute!r} must be a non-empty name without = & :"
            )
        if not isinstance(cats, list) or not cats or not all(_name_ok(c) for c in cats):
            raise ConfigurationError(
                f"categories of {attribute!r} must be a non-empty list of names without = & :,"
                f" got {cats!r:.80}"
            )
        if len(set(cats)) != len(cats):
            raise ConfigurationError(f"categories of {attribute!r} repeat a category")
        out[attribute] = tuple(cats)
    return out


def _intersections(params: Mapping[str, str], attributes: tuple[str, ...]) -> list[tuple[str, str]]:
    if "intersections" not in params:
        return list(combinations(attributes, 2))
    raw = _json(params, "intersections")
    if not isinstance(raw, list):
        raise ConfigurationError(f"parameter 'intersections' must be a JSON list, got {raw!r:.80}")
    pairs: list[tuple[str, str]] = []
    for pair in raw:
        if not isinstance(pair, list) or len(pair) != 2 or pair[0] == pair[1]:
            raise ConfigurationError(f"intersection {pair!r} must name two different attributes")
        for a in pair:
            if a not in attributes:
                raise ConfigurationError(
                    f"intersection names unknown sensitive attribute {a!r}; "
                    f"'sensitive' lists {', '.join(attributes)}"
                )
        if (pair[0], pair[1]) in pairs or (pair[1], pair[0]) in pairs:
            raise ConfigurationError(f"intersection {pair!r} is listed twice")
        pairs.append((pair[0], pair[1]))
    return pairs


def _number(params: Mapping[str, str], key: str, default: float, *, integer: bool) -> float:
    text = params.get(key)
    if text is None:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < (1 if integer else 0) or value == 0:
        kind = "an integer >= 1" if integer else "a finite number > 0"
        raise ConfigurationError(f"parameter {key!r} must be {kind}, got {text!r}")
    return value


def _attribution_names(
    params: Mapping[str, str], num_groups: int, dimension: int | None, labels: Sequence[str] | None
) -> tuple[str, ...]:
    if "feature_names" in params:
        raw = _json(params, "feature_names")
        if not isinstance(raw, list) or not all(isinstance(n, str) and n for n in raw):
            raise ConfigurationError("parameter 'feature_names' must be a JSON list of names")
        names = tuple(raw)
    elif dimension is not None:
        names = tuple(f"x{j}" for j in range(dimension))
    elif labels is not None and num_groups and (len(labels) - 4 * num_groups) % num_groups == 0:
        names = tuple(f"x{j}" for j in range((len(labels) - 4 * num_groups) // num_groups))
    else:
        raise ConfigurationError("fairness attributions need feature_names or the feature count")
    if dimension is not None and len(names) != dimension:
        raise ConfigurationError(f"{len(names)} feature names for {dimension} feature columns")
    return names


def _group_index(layout: FairnessLayout, sensitive: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """``(n, P)`` int: each record's group among all groups, per partition; -1 for none."""
    codes: dict[str, np.ndarray] = {}
    for attribute, cats in layout.categories.items():
        if attribute not in sensitive:
            raise ConfigurationError(
                f"unknown sensitive attribute {attribute!r}: this site holds "
                f"{', '.join(sorted(sensitive)) or 'none'}"
            )
        raw = np.asarray(sensitive[attribute], dtype=object)
        if raw.shape != (n,):
            raise ExplanationError(
                f"sensitive {attribute!r} has shape {raw.shape}, expected ({n},)"
            )
        lookup = {c: i for i, c in enumerate(cats)}
        codes[attribute] = np.fromiter(
            (lookup.get(v if isinstance(v, str) else str(v), -1) for v in raw), np.int64, n
        )
    out = np.full((n, len(layout.partitions)), -1, dtype=np.int64)
    for k, p in enumerate(layout.partitions):
        local = np.zeros(n, dtype=np.int64)
        valid = np.ones(n, dtype=bool)
        for attribute in p.attributes:
            code = codes[attribute]
            local = local * len(layout.categories[attribute]) + code
            valid &= code >= 0
        out[valid, k] = p.offset + local[valid]
    return out


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
    del context  # the breakdown is by sensitive group, never by site
    if features.ndim != 2:
        raise ExplanationError(f"features must be (n, d), got shape {features.shape}")
    if not math.isfinite(clip_bound) or clip_bound <= 0:
        raise ConfigurationError(f"clip bound must be finite and > 0, got {clip_bound!r}")
    layout = FairnessLayout.from_params(params, dimension=features.shape[1])
    if sensitive is None:
        raise ExplanationError("fairness needs the records' sensitive attributes; none given")
    n = features.shape[0]
    y = np.asarray(labels)
    if y.shape != (n,) or not np.isin(y, (0, 1)).all():
        raise ExplanationError(f"labels must be (n,) = ({n},) values in {{0, 1}}")
    index = _group_index(layout, sensitive, n)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.tensor(features, dtype=torch.float32)).reshape(-1)
    finally:
        model.train(was_training)
    cell = 2 * y.astype(np.int64) + (logits.numpy() > 0).astype(np.int64)
    num_groups = len(layout.groups)
    member = index >= 0
    s = layout.scale(clip_bound)
    cells = np.bincount((4 * index + cell[:, None])[member], minlength=4 * num_groups).astype(
        np.float64
    )
    parts = [s * cells]
    if layout.attribution_names:
        ig = integrated_gradients(model, features, n_steps=layout.n_steps)
        # Rows of norm at most 1 after dividing by A; each sits in at most P blocks.
        unit = clip_rows(ig, layout.attribution_clip) / layout.attribution_clip
        blocks = np.zeros((num_groups, features.shape[1]))
        rows, cols = np.nonzero(member)
        np.add.at(blocks, index[rows, cols], unit[rows])
        parts.append(s * blocks.ravel())
    vector = np.concatenate([*parts, [n * clip_bound]])
    return Contribution(vector=vector, count=n, labels=layout.coordinate_labels)


@dataclass(frozen=True)
class FairnessRelease:
    """Everything ``fairness`` releases, and what it withheld and why.

    ``values`` and ``grouped`` are as in :class:`explain.registry.PostProcessed`;
    ``omitted`` pairs each withheld name (a group's rates, a rate, a gap) with the reason.
    """

    noised_count: float
    values: tuple[ReleasedValue, ...]
    grouped: tuple[ReleasedValue, ...]
    omitted: tuple[tuple[str, str], ...]


def interval(value: ReleasedValue, z: float = Z_95) -> tuple[float, float]:
    """The interval ``value ± z * noise_std`` (95% for the default ``z``)."""
    return value.value - z * value.noise_std, value.value + z * value.noise_std


def _rate(a: float, b: float, var_a: float, var_b: float) -> tuple[float, float]:
    """``a / (a + b)`` and its delta-method std for independent noise in ``a`` and ``b``."""
    total = a + b
    return a / total, math.sqrt(b * b * var_a + a * a * var_b) / (total * total)


# Gap name -> the rate it compares.
_GAPS = (
    ("demographic_parity", "selection_rate"),
    ("equalised_odds_tpr", "tpr"),
    ("equalised_odds_fpr", "fpr"),
    ("accuracy", "accuracy"),
)


def fairness_release(
    noised_sum: np.ndarray,
    noise_std: float,
    clip_bound: float,
    labels: tuple[str, ...],
    params: Mapping[str, str],
) -> FairnessRelease:
    """Rates, gaps and attribution gaps from the noised sum over all sites.

    Parameters
    ----------
    noised_sum
        ``(len(labels) + 1,)``: the noised sum of every site's vector.
    noise_std
        Standard deviation of the noise in each coordinate of the sum.

    Raises
    ------
    ConfigurationError
        Malformed parameters, labels that are not the parameters' layout, a sum of the
        wrong shape, or a clip bound or noise std out of range.
    """
    layout = FairnessLayout.from_params(params, labels=labels)
    if noised_sum.shape != (len(labels) + 1,):
        raise ConfigurationError(
            f"noised sum has shape {noised_sum.shape}, expected ({len(labels) + 1},)"
        )
    if not math.isfinite(clip_bound) or clip_bound <= 0:
        raise ConfigurationError(f"clip bound must be finite and > 0, got {clip_bound!r}")
    if not math.isfinite(noise_std) or noise_std < 0:
        raise ConfigurationError(f"noise std must be finite and >= 0, got {noise_std!r}")
    s = layout.scale(clip_bound)
    num_groups = len(layout.groups)
    raw = np.asarray(noised_sum, dtype=np.float64)
    cells = np.maximum(raw[: 4 * num_groups] / s, 0.0).reshape(num_groups, 4)
    v = (noise_std / s) ** 2  # noise variance of one cell, in records
    values: list[ReleasedValue] = []
    omitted: list[tuple[str, str]] = []
    rates: dict[str, dict[str, ReleasedValue]] = {}  # group -> rate -> value
    minimum = layout.min_group_size
    for g, (tn, fp, fn, tp) in zip(layout.groups, cells, strict=True):
        count = tn + fp + fn + tp
        values.append(ReleasedValue(f"{g}:count", float(count), 2.0 * math.sqrt(v)))
        if count < minimum:
            omitted.append((g, f"noised count {count:.1f} is below min_group_size {minimum}"))
            continue
        found = {
            "accuracy": _rate(tn + tp, fp + fn, 2 * v, 2 * v),
            "selection_rate": _rate(fp + tp, tn + fn, 2 * v, 2 * v),
        }
        for rate, (a, b), what in (("tpr", (tp, fn), "positives"), ("fpr", (fp, tn), "negatives")):
            if a + b < minimum:
                omitted.append(
                    (f"{g}:{rate}", f"noised {what} {a + b:.1f} below min_group_size {minimum}")
                )
            else:
                found[rate] = _rate(a, b, v, v)
        rates[g] = {}
        for rate, (value, std) in found.items():
            rates[g][rate] = ReleasedValue(f"{g}:{rate}", float(value), float(std))
            values.append(rates[g][rate])
    pairs: dict[str, tuple[str, str]] = {}  # partition -> (highest, lowest) selection rate
    for p in layout.partitions:
        gaps: dict[str, ReleasedValue] = {}
        for gap, rate in _GAPS:
            name = f"gap:{gap}:{p.name}"
            have = [g for g in p.groups if rate in rates.get(g, {})]
            if len(have) < 2:
                omitted.append((name, f"fewer than two groups of {p.name} have a {rate}"))
                continue
            high = max(have, key=lambda g: rates[g][rate].value)
            low = min(have, key=lambda g: rates[g][rate].value)
            hi, lo = rates[high][rate], rates[low][rate]
            gaps[gap] = ReleasedValue(
                name, hi.value - lo.value, math.hypot(hi.noise_std, lo.noise_std)
            )
            if gap == "demographic_parity":
                pairs[p.name] = (high, low)
        if "equalised_odds_tpr" in gaps and "equalised_odds_fpr" in gaps:
            worst = max(
                gaps["equalised_odds_tpr"], gaps["equalised_odds_fpr"], key=lambda g: g.value
            )
            gaps["equalised_odds"] = ReleasedValue(
                f"gap:equalised_odds:{p.name}", worst.value, worst.noise_std
            )
        values.extend(gaps.values())
    grouped: list[ReleasedValue] = []
    if layout.attribution_names:
        attribution_values, grouped = _attribution_gaps(
            layout, raw, cells, noise_std, s, pairs, params
        )
        values.extend(attribution_values)
    for name, reason in omitted:
        logger.info("fairness: %s withheld: %s", name, reason)
    return FairnessRelease(
        noised_count=float(raw[-1] / clip_bound),
        values=tuple(values),
        grouped=tuple(sorted(grouped, key=lambda r: -abs(r.value))),
        omitted=tuple(omitted),
    )


def _attribution_gaps(
    layout: FairnessLayout,
    raw: np.ndarray,
    cells: np.ndarray,
    noise_std: float,
    s: float,
    pairs: Mapping[str, tuple[str, str]],
    params: Mapping[str, str],
) -> tuple[list[ReleasedValue], list[ReleasedValue]]:
    num_groups, d = len(layout.groups), len(layout.attribution_names)
    blocks = raw[4 * num_groups : -1].reshape(num_groups, d) * (layout.attribution_clip / s)
    block_std = noise_std * layout.attribution_clip / s
    position = {g: i for i, g in enumerate(layout.groups)}
    features = _json(params, "groups") if "groups" in params else {}
    if not isinstance(features, dict):
        raise ConfigurationError("parameter 'groups' must be a JSON object")
    values: list[ReleasedValue] = []
    grouped: list[ReleasedValue] = []
    for high, low in pairs.values():
        i, j = position[high], position[low]
        # Both counts reach min_group_size >= 1, so neither divisor is zero.
        n_i, n_j = float(cells[i].sum()), float(cells[j].sum())
        diff = blocks[i] / n_i - blocks[j] / n_j
        std = block_std * math.sqrt(1.0 / n_i**2 + 1.0 / n_j**2)
        prefix = f"attribution_gap:{high} vs {low}"
        values.extend(
            ReleasedValue(f"{prefix}:{n}", float(x), std)
            for n, x in zip(layout.attribution_names, diff, strict=True)
        )
        for feature, cols in features.items():
            if not isinstance(cols, list) or not all(
                isinstance(c, int) and 0 <= c < d for c in cols
            ):
                raise ConfigurationError(f"group {feature!r} must list column indices in [0, {d})")
            grouped.append(
                ReleasedValue(
                    f"{prefix}:{feature}", float(diff[cols].sum()), std * math.sqrt(len(cols))
                )
            )
    return values, grouped


def _postprocess(
    noised_sum: np.ndarray,
    noise_std: float,
    clip_bound: float,
    labels: tuple[str, ...],
    params: Mapping[str, str],
) -> PostProcessed:
    out = fairness_release(noised_sum, noise_std, clip_bound, labels, params)
    return PostProcessed(noised_count=out.noised_count, values=out.values, grouped=out.grouped)


def _coordinate_labels(
    encoded_names: Sequence[str], groups: Mapping[str, Sequence[int]], params: Mapping[str, str]
) -> tuple[str, ...]:
    del groups
    return FairnessLayout.from_params(params, dimension=len(encoded_names)).coordinate_labels


FAIRNESS = register_kind(
    ExplanationKind(
        name="fairness",
        contribute=_contribute,
        postprocess=_postprocess,
        coordinate_labels=_coordinate_labels,
    )
)
