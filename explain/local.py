"""Explanations of one analyst's input: a prediction and its per-feature attributions.

Everything here uses only the global model and released statistics (the DP baseline of
a ``feature_stats`` release), never a site's records, so it costs no privacy: it is
post-processing of the model and of DP releases.

A raw record (a mapping from feature name to a raw value, numbers possibly as strings
as they arrive on the wire) is validated against the dataset's public schema, encoded
with the schema-fixed :class:`fedlens.datasets.Preprocessor`, and its logit attributed
to the encoded columns against a baseline; the columns of one original feature (the
one-hot columns of a categorical feature) are summed into one attribution.

Methods, looked up by name:

``integrated_gradients``
    Integrated Gradients (Sundararajan et al., ICML 2017) through Captum. The
    attributions sum to ``f(x) - f(b)`` (completeness); for a logistic model they equal
    ``w * (x - b)`` exactly.
``occlusion``
    For each original feature, ``f(x) - f(x with that feature's columns set to the
    baseline)``. Cheap, and exact for models additive over features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from explain.global_attribution import integrated_gradients
from fedlens.datasets import FeatureSpec, Preprocessor, Schema
from fedlens.errors import ConfigurationError, DatasetError, ExplanationError
from fedlens.types import ReleasedValue

__all__ = [
    "AttributionMethod",
    "FeatureAttribution",
    "LocalExplanation",
    "RawValue",
    "available_methods",
    "baseline_from_feature_stats",
    "decode_numeric",
    "encode_record",
    "explain_input",
    "format_raw",
    "predict_logits",
    "schema_baseline",
    "validate_record",
]

RawValue = float | str
"""A validated raw feature value: a float for a numeric feature, a category otherwise."""

AttributionMethod = Callable[[nn.Module, np.ndarray, np.ndarray, Preprocessor], np.ndarray]
"""``(model, x (d,), baseline (d,), preprocessor) -> (d,)`` attributions of the logit."""


@dataclass(frozen=True)
class FeatureAttribution:
    """One original feature's share of the prediction.

    Attributes
    ----------
    feature
        The feature's name in the schema.
    value
        The record's validated raw value.
    attribution
        Contribution to the logit of the positive class relative to the baseline; the
        sum over the feature's encoded columns. Positive pushes towards ``classes[1]``.
    """

    feature: str
    value: RawValue
    attribution: float


@dataclass(frozen=True, eq=False)
class LocalExplanation:
    """A prediction for one record and why the model made it.

    Attributes
    ----------
    record
        The validated raw record, in schema order.
    encoded
        ``(d,)`` float64 encoded record.
    baseline
        ``(d,)`` reference point of the attributions.
    logit, baseline_logit
        The model's logit for the record and for the baseline.
    attributions
        One per original feature, sorted by decreasing magnitude (ties in schema order).
    classes
        ``(negative, positive)`` class names.
    method
        The attribution method's registry name.
    """

    record: Mapping[str, RawValue]
    encoded: np.ndarray
    baseline: np.ndarray
    logit: float
    baseline_logit: float
    attributions: tuple[FeatureAttribution, ...]
    classes: tuple[str, str]
    method: str

    @property
    def positive_probability(self) -> float:
        """Probability the model gives ``classes[1]``."""
        return _sigmoid(self.logit)

    @property
    def predicted_class(self) -> int:
        """``1`` if the logit is positive, else ``0``."""
        return int(self.logit > 0.0)

    @property
    def predicted_label(self) -> str:
        """Name of the predicted class."""
        return self.classes[self.predicted_class]

    @property
    def probability(self) -> float:
        """Probability the model gives the predicted class."""
        p = self.positive_probability
        return p if self.predicted_class == 1 else 1.0 - p


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


# -- validation and encoding -----------------------------------------------------------


def validate_record(schema: Schema, record: Mapping[str, object]) -> dict[str, RawValue]:
    """Check a raw record against the schema and return its values in schema order.

    Numeric values may be ints, floats or strings that parse as numbers; categorical
    values must be one of the schema's listed categories, spelled exactly.

    Raises
    ------
    ConfigurationError
        A feature is missing or unknown, a numeric value is not a finite number or lies
        outside the schema range, or a category is not listed; the message names the
        feature and the accepted values or range.
    """
    unknown = sorted(set(map(str, record)) - set(schema.names))
    if unknown:
        raise ConfigurationError(
            f"unknown features {', '.join(map(repr, unknown))}; "
            f"the model's features are: {', '.join(schema.names)}"
        )
    missing = [name for name in schema.names if name not in record]
    if missing:
        raise ConfigurationError(f"the record lacks the features: {', '.join(missing)}")
    return {spec.name: _validate_value(spec, record[spec.name]) for spec in schema.features}


def _validate_value(spec: FeatureSpec, raw: object) -> RawValue:
    if spec.kind == "categorical":
        if not isinstance(raw, str) or raw not in spec.categories:
            raise ConfigurationError(
                f"feature {spec.name!r}: {raw!r} is not a known category; "
                f"accepted: {', '.join(spec.categories)}"
            )
        return raw
    accepted = f"a number in [{format_raw(spec.low)}, {format_raw(spec.high)}]"
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ConfigurationError(f"feature {spec.name!r}: expected {accepted}, got {raw!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(
            f"feature {spec.name!r}: expected {accepted}, got {raw!r}"
        ) from None
    if not math.isfinite(value):
        raise ConfigurationError(f"feature {spec.name!r}: expected {accepted}, got {raw!r}")
    if not spec.low <= value <= spec.high:
        raise ConfigurationError(
            f"feature {spec.name!r}: {format_raw(value)} is out of range; expected {accepted}"
        )
    return value


def encode_record(preprocessor: Preprocessor, record: Mapping[str, RawValue]) -> np.ndarray:
    """Encode one validated raw record; returns ``(d,)`` float64."""
    frame = pd.DataFrame([{name: record[name] for name in preprocessor.schema.names}])
    try:
        encoded = preprocessor.transform(frame)
    except DatasetError as exc:
        raise ConfigurationError(f"cannot encode the record: {exc}") from None
    return np.asarray(encoded[0], dtype=np.float64)


def decode_numeric(spec: FeatureSpec, encoded: float) -> float:
    """Raw value of a numeric feature from its encoded value in ``[0, 1]``."""
    u = min(max(float(encoded), 0.0), 1.0)
    if spec.log:
        low, high = math.log1p(spec.low), math.log1p(spec.high)
        return min(max(math.expm1(low + u * (high - low)), spec.low), spec.high)
    return spec.low + u * (spec.high - spec.low)


def format_raw(value: RawValue) -> str:
    """A raw value as text: categories as they are, numbers without needless digits."""
    if isinstance(value, str):
        return value
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}"


# -- baselines ---------------------------------------------------------------------------


def schema_baseline(preprocessor: Preprocessor) -> np.ndarray:
    """A baseline from public metadata only: mid-range numerics, uniform categories.

    Returns
    -------
    numpy.ndarray
        ``(d,)``: ``0.5`` for every numeric column (the midpoint of the schema range),
        ``1 / k`` for each of a categorical feature's ``k`` columns.
    """
    base = np.zeros(preprocessor.dimension)
    for spec in preprocessor.schema.features:
        columns = list(preprocessor.groups[spec.name])
        base[columns] = 0.5 if spec.kind == "numeric" else 1.0 / len(columns)
    return base


def baseline_from_feature_stats(
    preprocessor: Preprocessor, values: Sequence[ReleasedValue]
) -> np.ndarray:
    """The DP baseline of a ``feature_stats`` release: the mean of every encoded column.

    Parameters
    ----------
    values
        The release's values: ``"{numeric}:mean"`` and ``"{column}:freq"`` are used.

    Returns
    -------
    numpy.ndarray
        ``(d,)`` in encoded units, column order of ``preprocessor``.

    Raises
    ------
    ExplanationError
        The release lacks the mean or frequency of some column of this encoding.
    """
    by_name = {v.name: v.value for v in values}
    base = np.zeros(preprocessor.dimension)
    missing = []
    for spec in preprocessor.schema.features:
        for j in preprocessor.groups[spec.name]:
            column = preprocessor.encoded_names[j]
            key = f"{column}:mean" if spec.kind == "numeric" else f"{column}:freq"
            if key in by_name:
                base[j] = by_name[key]
            else:
                missing.append(key)
    if missing:
        raise ExplanationError(
            f"the feature_stats release does not fit this model's encoding: it lacks "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return base


# -- prediction and attribution ----------------------------------------------------------


def predict_logits(model: nn.Module, encoded: np.ndarray) -> np.ndarray:
    """The model's logits for ``(n, d)`` encoded records; returns ``(n,)`` float64."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(np.atleast_2d(encoded), dtype=torch.float32))
    finally:
        model.train(was_training)
    return np.asarray(out.detach().to(torch.float64).numpy(), dtype=np.float64).reshape(-1)


def _integrated_gradients(
    model: nn.Module, x: np.ndarray, baseline: np.ndarray, preprocessor: Preprocessor
) -> np.ndarray:
    del preprocessor
    attributions: np.ndarray = integrated_gradients(model, x[None, :], baseline=baseline)[0]
    return attributions


def _occlusion(
    model: nn.Module, x: np.ndarray, baseline: np.ndarray, preprocessor: Preprocessor
) -> np.ndarray:
    occluded = np.repeat(x[None, :], len(preprocessor.groups), axis=0)
    for row, columns in enumerate(preprocessor.groups.values()):
        occluded[row, list(columns)] = baseline[list(columns)]
    logits = predict_logits(model, np.vstack([x[None, :], occluded]))
    out = np.zeros_like(x)
    # One value per feature, placed on its first column: grouping sums it unchanged.
    for row, columns in enumerate(preprocessor.groups.values()):
        out[columns[0]] = logits[0] - logits[row + 1]
    return out


_METHODS: dict[str, AttributionMethod] = {
    "integrated_gradients": _integrated_gradients,
    "occlusion": _occlusion,
}


def available_methods() -> tuple[str, ...]:
    """Names of the attribution methods, sorted."""
    return tuple(sorted(_METHODS))


def explain_input(
    model: nn.Module,
    preprocessor: Preprocessor,
    record: Mapping[str, object],
    baseline: np.ndarray,
    method: str = "integrated_gradients",
) -> LocalExplanation:
    """Predict one raw record and attribute the logit to its original features.

    Parameters
    ----------
    model
        The global model, ``(n, d) -> (n, 1)`` logits.
    preprocessor
        The schema-fixed encoder the model was trained with.
    record
        Raw feature values by name (every schema feature, nothing else).
    baseline
        ``(d,)`` encoded reference point, usually :func:`baseline_from_feature_stats`
        of the latest DP release, else :func:`schema_baseline`.
    method
        A name from :func:`available_methods`.

    Returns
    -------
    LocalExplanation
        The prediction and one attribution per original feature.

    Raises
    ------
    ConfigurationError
        The record does not fit the schema (see :func:`validate_record`), or the method
        is unknown.
    ExplanationError
        The baseline does not have shape ``(d,)`` or is not finite.
    """
    try:
        attribute = _METHODS[method]
    except KeyError:
        raise ConfigurationError(
            f"unknown attribution method {method!r}; available: {', '.join(available_methods())}"
        ) from None
    values = validate_record(preprocessor.schema, record)
    base = np.asarray(baseline, dtype=np.float64)
    if base.shape != (preprocessor.dimension,) or not np.all(np.isfinite(base)):
        raise ExplanationError(
            f"baseline must be a finite vector of shape ({preprocessor.dimension},), "
            f"got shape {base.shape}"
        )
    x = encode_record(preprocessor, values)
    logits = predict_logits(model, np.vstack([x, base]))
    encoded_attr = attribute(model, x, base, preprocessor)
    order = {name: i for i, name in enumerate(preprocessor.schema.names)}
    grouped = [
        FeatureAttribution(
            feature=name,
            value=values[name],
            attribution=float(encoded_attr[list(columns)].sum()),
        )
        for name, columns in preprocessor.groups.items()
    ]
    grouped.sort(key=lambda a: (-abs(a.attribution), order[a.feature]))
    return LocalExplanation(
        record=values,
        encoded=x,
        baseline=base,
        logit=float(logits[0]),
        baseline_logit=float(logits[1]),
        attributions=tuple(grouped),
        classes=preprocessor.schema.classes,
        method=method,
    )
