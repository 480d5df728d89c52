"""Counterfactual explanations: the smallest plausible changes that flip a prediction.

In the spirit of Wachter, Mittelstadt & Russell (2018) and DiCE (Mothilal, Sharma &
Tan, FAT* 2020), but as a small discrete search rather than gradient descent, so that
it works for any model and every proposed record is a valid input:

* only mutable features change (the schema's immutable ones, e.g. age, sex and race,
  are held fixed unless the caller says otherwise);
* numeric features move within the DP ranges of a ``feature_stats`` release
  (``"{feature}:low"`` / ``"{feature}:high"``, mean ± 2 std of the federation's data)
  or, without one, within the public schema range; categorical features change only to
  categories the release shows as present;
* the search minimises first the number of changed features, then the distance: L1 in
  encoded units, where a numeric feature counts its encoded move (at most 1, its whole
  range) and a category swap counts 1.

A beam search over sets of changes: at depth ``k`` every kept set of ``k - 1`` changes
is extended by one more change (a grid of values per numeric feature, every allowed
category per categorical one), all candidates are scored in one batch, and the sets
that push the logit furthest towards the other class are kept. At the first depth where
some candidate flips the prediction, the cheapest flips are refined: each numeric move
is shortened by bisection to the smallest one that still flips, then rounded to a whole
number when the feature is integral in the record and schema. The chosen record is
decoded to raw units, re-encoded and predicted once more, so the reported flip holds for
the raw values returned.

The search reads only the global model and released statistics: it costs no privacy.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from explain.local import (
    RawValue,
    decode_numeric,
    encode_record,
    format_raw,
    predict_logits,
    validate_record,
)
from fedlens.datasets import FeatureSpec, Preprocessor
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.types import ReleasedValue

__all__ = ["Counterfactual", "FeatureChange", "SearchLimits", "find_counterfactual"]

_BISECTION_STEPS = 30
_REFINED_CANDIDATES = 12


@dataclass(frozen=True)
class SearchLimits:
    """Where a counterfactual may move each feature.

    Attributes
    ----------
    numeric
        Numeric feature -> ``(low, high)`` in encoded units, within ``[0, 1]``.
    categories
        Categorical feature -> the categories a change may pick.
    source
        Where the limits come from, for messages: ``"feature_stats release ID"`` or
        ``"schema"``.
    """

    numeric: Mapping[str, tuple[float, float]]
    categories: Mapping[str, tuple[str, ...]]
    source: str

    @classmethod
    def from_schema(cls, preprocessor: Preprocessor) -> SearchLimits:
        """The full public ranges and category lists of the schema."""
        schema = preprocessor.schema
        return cls(
            numeric={s.name: (0.0, 1.0) for s in schema.features if s.kind == "numeric"},
            categories={s.name: s.categories for s in schema.features if s.kind != "numeric"},
            source="schema",
        )

    @classmethod
    def from_feature_stats(
        cls,
        preprocessor: Preprocessor,
        values: Sequence[ReleasedValue],
        *,
        source: str = "feature_stats release",
        noise_multiple: float = 2.0,
        min_frequency: float = 0.0,
    ) -> SearchLimits:
        """Ranges and present categories from a ``feature_stats`` release.

        A numeric feature without released ``low``/``high`` keeps its schema range. A
        category counts as present when its released frequency exceeds both
        ``min_frequency`` and ``noise_multiple`` times its noise standard deviation, so
        that privacy noise alone does not make an absent category look present.
        """
        by_name = {v.name: v for v in values}
        numeric: dict[str, tuple[float, float]] = {}
        categories: dict[str, tuple[str, ...]] = {}
        for spec in preprocessor.schema.features:
            if spec.kind == "numeric":
                low, high = by_name.get(f"{spec.name}:low"), by_name.get(f"{spec.name}:high")
                if low is None or high is None:
                    numeric[spec.name] = (0.0, 1.0)
                else:
                    a, b = sorted((_unit(low.value), _unit(high.value)))
                    numeric[spec.name] = (a, b)
                continue
            present = []
            for category in spec.categories:
                freq = by_name.get(f"{spec.name}={category}:freq")
                if freq is not None and freq.value > max(
                    min_frequency, noise_multiple * freq.noise_std
                ):
                    present.append(category)
            categories[spec.name] = tuple(present)
        return cls(numeric=numeric, categories=categories, source=source)


def _unit(value: float) -> float:
    return min(max(float(value), 0.0), 1.0) if math.isfinite(value) else 0.0


@dataclass(frozen=True)
class FeatureChange:
    """One feature a counterfactual changes, in raw units."""

    feature: str
    original: RawValue
    proposed: RawValue


@dataclass(frozen=True, eq=False)
class Counterfactual:
    """A changed record that the model classifies differently.

    Attributes
    ----------
    changes
        The changed features, in schema order.
    record
        The whole counterfactual raw record.
    logit
        The model's logit for ``record`` (re-encoded from its raw values).
    distance
        L1 distance in encoded units, a category swap counting 1.
    classes
        ``(negative, positive)`` class names.
    limits_source
        Where the search limits came from.
    """

    changes: tuple[FeatureChange, ...]
    record: Mapping[str, RawValue]
    logit: float
    distance: float
    classes: tuple[str, str]
    limits_source: str

    @property
    def predicted_label(self) -> str:
        return self.classes[int(self.logit > 0.0)]

    @property
    def probability(self) -> float:
        """Probability the model gives the counterfactual's predicted class."""
        # Stable logistic of |logit|: the predicted class has probability >= 1/2.
        return 1.0 / (1.0 + math.exp(-abs(self.logit)))


@dataclass(frozen=True)
class _Move:
    feature: str
    columns: tuple[int, ...]
    values: tuple[float, ...]  # the new encoded values of ``columns``
    cost: float
    raw: float | None = None  # the exact raw value, when known (rounded moves)


def _moves(
    spec: FeatureSpec,
    columns: tuple[int, ...],
    x: np.ndarray,
    limits: SearchLimits,
    grid_points: int,
) -> list[_Move]:
    if spec.kind == "numeric":
        low, high = limits.numeric.get(spec.name, (0.0, 1.0))
        current = float(x[columns[0]])
        grid = np.unique(np.append(np.linspace(low, high, grid_points), [low, high]))
        return [
            _Move(spec.name, columns, (float(u),), abs(float(u) - current))
            for u in grid
            if abs(float(u) - current) > 1e-9
        ]
    allowed = set(limits.categories.get(spec.name, ()))
    moves = []
    for k, category in enumerate(spec.categories):
        if category not in allowed or x[columns[k]] == 1.0:
            continue
        onehot = tuple(1.0 if i == k else 0.0 for i in range(len(columns)))
        moves.append(_Move(spec.name, columns, onehot, 1.0))
    return moves


def _apply(x: np.ndarray, moves: Sequence[_Move]) -> np.ndarray:
    out = x.copy()
    for move in moves:
        out[list(move.columns)] = move.values
    return out


def find_counterfactual(
    model: nn.Module,
    preprocessor: Preprocessor,
    record: Mapping[str, object],
    limits: SearchLimits,
    *,
    immutable: Collection[str] | None = None,
    max_changes: int = 3,
    beam_width: int = 8,
    grid_points: int = 11,
) -> Counterfactual:
    """The smallest plausible change of ``record`` that flips the model's prediction.

    Parameters
    ----------
    model
        The global model, ``(n, d) -> (n, 1)`` logits.
    preprocessor
        The schema-fixed encoder of the model's inputs.
    record
        Raw feature values by name (validated as by :func:`explain.local.validate_record`).
    limits
        Ranges and categories the search may use (:class:`SearchLimits`).
    immutable
        Features never to change; the schema's immutable features by default.
    max_changes
        Most features changed at once.
    beam_width
        Partial change sets kept between depths.
    grid_points
        Values tried per numeric feature across its allowed range.

    Returns
    -------
    Counterfactual
        Fewest changed features first, then the smallest distance.

    Raises
    ------
    ConfigurationError
        The record does not fit the schema, ``immutable`` names an unknown feature, or a
        search parameter is out of range.
    ExplanationError
        No mutable feature exists, or no flip was found within the limits; the message
        says what was searched.
    """
    schema = preprocessor.schema
    if max_changes < 1 or beam_width < 1 or grid_points < 2:
        raise ConfigurationError(
            "max_changes and beam_width must be >= 1 and grid_points >= 2, got "
            f"{max_changes}, {beam_width}, {grid_points}"
        )
    fixed = set(schema.immutable if immutable is None else immutable)
    unknown = sorted(fixed - set(schema.names))
    if unknown:
        raise ConfigurationError(
            f"immutable names unknown features {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(schema.names)}"
        )
    values = validate_record(schema, record)
    x = encode_record(preprocessor, values)
    logit = float(predict_logits(model, x)[0])
    original = schema.classes[int(logit > 0.0)]
    # Progress towards the other class: positive once the prediction has flipped.
    sign = -1.0 if logit > 0.0 else 1.0
    mutable = [s for s in schema.features if s.name not in fixed]
    if not mutable:
        raise ExplanationError("no counterfactual: every feature is immutable")
    options = {
        s.name: _moves(s, preprocessor.groups[s.name], x, limits, grid_points) for s in mutable
    }
    beam: list[tuple[_Move, ...]] = [()]
    for _depth in range(min(max_changes, len(mutable))):
        candidates: dict[tuple[tuple[str, tuple[float, ...]], ...], tuple[_Move, ...]] = {}
        for state in beam:
            used = {m.feature for m in state}
            for name, moves in options.items():
                if name in used:
                    continue
                for move in moves:
                    combo = tuple(sorted((*state, move), key=lambda m: m.columns[0]))
                    candidates.setdefault(tuple((m.feature, m.values) for m in combo), combo)
        if not candidates:
            break
        combos = list(candidates.values())
        progress = sign * predict_logits(model, np.stack([_apply(x, c) for c in combos]))
        flipped = [i for i in np.flatnonzero(progress > 0.0)]
        if flipped:
            found = _best_flip(
                model, preprocessor, values, x, sign, [combos[i] for i in flipped], limits
            )
            if found is not None:
                return found
        order = np.argsort(-progress, kind="stable")[:beam_width]
        beam = [combos[i] for i in order]
    raise ExplanationError(
        f"no counterfactual found: changing up to {max_changes} of the mutable features "
        f"({', '.join(s.name for s in mutable)}) within the {limits.source} ranges and "
        f"categories never changes the prediction from {original}"
        + (f"; held fixed: {', '.join(sorted(fixed))}" if fixed else "")
    )


def _best_flip(
    model: nn.Module,
    preprocessor: Preprocessor,
    values: Mapping[str, RawValue],
    x: np.ndarray,
    sign: float,
    combos: list[tuple[_Move, ...]],
    limits: SearchLimits,
) -> Counterfactual | None:
    """Refine the cheapest flipping change sets and return the cheapest verified one."""
    combos.sort(key=lambda c: sum(m.cost for m in c))
    best: Counterfactual | None = None
    for combo in combos[:_REFINED_CANDIDATES]:
        refined = _shorten(model, x, sign, combo, limits)
        for attempt in (_rounded(preprocessor, values, refined, limits), refined, combo):
            if not attempt:
                continue
            found = _verify(model, preprocessor, values, x, sign, attempt, limits.source)
            if found is not None:
                if best is None or (len(found.changes), found.distance) < (
                    len(best.changes),
                    best.distance,
                ):
                    best = found
                break
    return best


def _flips(model: nn.Module, probe: np.ndarray, sign: float) -> bool:
    return bool(sign * predict_logits(model, probe)[0] > 0.0)


def _shorten(
    model: nn.Module, x: np.ndarray, sign: float, combo: tuple[_Move, ...], limits: SearchLimits
) -> tuple[_Move, ...]:
    """Drop unneeded moves and shorten numeric ones by bisection, keeping the flip.

    A numeric move is shortened towards the allowed value nearest the original, so that
    it stays within the limits even when the original lies outside them.
    """
    moves: list[_Move | None] = list(combo)
    for i, move in enumerate(combo):
        if len(move.columns) != 1:
            continue
        j = move.columns[0]
        low, high = limits.numeric.get(move.feature, (0.0, 1.0))
        original, target = float(x[j]), move.values[0]
        probe = _apply(x, [m for k, m in enumerate(moves) if k != i and m is not None])
        probe[j] = original
        if _flips(model, probe, sign):
            moves[i] = None  # the other changes flip the prediction without this one
            continue
        start = min(max(original, low), high)
        probe[j] = start
        if start != original and _flips(model, probe, sign):
            moves[i] = _Move(move.feature, move.columns, (start,), abs(start - original))
            continue
        lo, hi = 0.0, 1.0
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            probe[j] = start + mid * (target - start)
            lo, hi = (lo, mid) if _flips(model, probe, sign) else (mid, hi)
        value = start + hi * (target - start)
        moves[i] = _Move(move.feature, move.columns, (value,), abs(value - original))
    return tuple(m for m in moves if m is not None)


def _rounded(
    preprocessor: Preprocessor,
    values: Mapping[str, RawValue],
    moves: tuple[_Move, ...],
    limits: SearchLimits,
) -> tuple[_Move, ...]:
    """Numeric moves rounded away from the original to whole raw values, where integral."""
    out = []
    for move in moves:
        spec = preprocessor.schema.feature(move.feature)
        original = values[move.feature]
        if spec.kind != "numeric" or not isinstance(original, float):
            out.append(move)
            continue
        if not (original.is_integer() and spec.low.is_integer() and spec.high.is_integer()):
            out.append(move)
            continue
        raw = decode_numeric(spec, move.values[0])
        whole = math.ceil(raw - 1e-9) if raw > original else math.floor(raw + 1e-9)
        changed = {**values, move.feature: float(whole)}
        u = float(encode_record(preprocessor, changed)[move.columns[0]])
        low, high = limits.numeric.get(spec.name, (0.0, 1.0))
        if not low - 1e-9 <= u <= high + 1e-9 or whole == original:
            return ()
        out.append(_Move(move.feature, move.columns, (u,), move.cost, float(whole)))
    return tuple(out)


def _verify(
    model: nn.Module,
    preprocessor: Preprocessor,
    values: Mapping[str, RawValue],
    x: np.ndarray,
    sign: float,
    moves: tuple[_Move, ...],
    source: str,
) -> Counterfactual | None:
    """Decode the moves to raw values, re-encode, and keep them only if the flip holds."""
    proposed: dict[str, RawValue] = dict(values)
    changes = []
    for move in sorted(moves, key=lambda m: m.columns[0]):
        spec = preprocessor.schema.feature(move.feature)
        if move.raw is not None:
            raw: RawValue = move.raw
        elif spec.kind == "numeric":
            raw = decode_numeric(spec, move.values[0])
        else:
            raw = spec.categories[int(np.argmax(move.values))]
        if format_raw(raw) == format_raw(values[move.feature]):
            return None
        proposed[move.feature] = raw
        changes.append(FeatureChange(move.feature, values[move.feature], raw))
    encoded = encode_record(preprocessor, proposed)
    logit = float(predict_logits(model, encoded)[0])
    if not sign * logit > 0.0:
        return None
    distance = 0.0
    for move in moves:
        columns = list(move.columns)
        diff = float(np.abs(encoded[columns] - x[columns]).sum())
        distance += diff if len(columns) == 1 else diff / 2.0
    return Counterfactual(
        changes=tuple(changes),
        record=proposed,
        logit=logit,
        distance=distance,
        classes=preprocessor.schema.classes,
        limits_source=source,
    )
