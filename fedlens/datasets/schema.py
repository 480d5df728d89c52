"""Public description of a tabular dataset: its features, label and classes.

A schema is metadata that every site knows before seeing any record. Category
lists and numeric ranges come from published dataset documentation, never from
a site's rows, so encoding a record reveals nothing about anybody else's data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedlens.errors import DatasetError

__all__ = ["FeatureKind", "FeatureSpec", "Schema"]

FeatureKind = Literal["numeric", "categorical"]


@dataclass(frozen=True)
class FeatureSpec:
    """One input column of a dataset.

    Parameters
    ----------
    name
        Column name in the raw frame.
    kind
        ``"numeric"`` or ``"categorical"``.
    categories
        Categorical only: the complete public list of categories, in encoding
        order. Values outside it (and missing values) encode as all zeros.
    low, high
        Numeric only: the fixed public range mapped onto ``[0, 1]``. When
        ``log`` is set the range is given in raw units and both ends pass
        through ``log1p`` as well.
    log
        Numeric only: scale ``log1p(x)`` instead of ``x`` (for heavy tails).
    sensitive
        The column is a protected attribute (fairness explanations group by it).
    immutable
        The column cannot be changed by the person it describes
        (counterfactual explanations must hold it fixed).
    """

    name: str
    kind: FeatureKind
    categories: tuple[str, ...] = ()
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    sensitive: bool = False
    immutable: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise DatasetError("a feature needs a non-empty name")
        if self.kind == "categorical":
            if not self.categories:
                raise DatasetError(f"categorical feature {self.name!r} needs a category list")
            if len(set(self.categories)) != len(self.categories):
                raise DatasetError(f"categorical feature {self.name!r} repeats a category")
            if self.log:
                raise DatasetError(f"log scaling applies to numeric features, not {self.name!r}")
        elif self.kind == "numeric":
            if self.categories:
                raise DatasetError(f"numeric feature {self.name!r} cannot have categories")
            if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
                raise DatasetError(
                    f"numeric feature {self.name!r} needs finite low < high, "
                    f"got [{self.low}, {self.high}]"
                )
            if self.log and self.low <= -1.0:
                raise DatasetError(f"log-scaled feature {self.name!r} needs low > -1")
        else:
            raise DatasetError(
                f"feature {self.name!r} has kind {self.kind!r}; expected 'numeric' or 'categorical'"
            )


@dataclass(frozen=True)
class Schema:
    """Features, label column and class names of a binary classification table.

    Parameters
    ----------
    features
        Input columns in encoding order.
    label
        Name of the label column; it holds 0 (``classes[0]``) or 1 (``classes[1]``).
    classes
        ``(negative, positive)`` class names.
    """

    features: tuple[FeatureSpec, ...]
    label: str
    classes: tuple[str, str]

    def __post_init__(self) -> None:
        if not self.features:
            raise DatasetError("a schema needs at least one feature")
        names = [spec.name for spec in self.features]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise DatasetError(f"schema repeats feature names: {', '.join(duplicates)}")
        if self.label in names:
            raise DatasetError(f"label {self.label!r} is also listed as a feature")
        if len(self.classes) != 2 or self.classes[0] == self.classes[1]:
            raise DatasetError(f"a schema needs two distinct class names, got {self.classes!r}")

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names in schema order."""
        return tuple(spec.name for spec in self.features)

    @property
    def sensitive(self) -> tuple[str, ...]:
        """Names of the sensitive features, in schema order."""
        return tuple(spec.name for spec in self.features if spec.sensitive)

    @property
    def immutable(self) -> tuple[str, ...]:
        """Names of the immutable features, in schema order."""
        return tuple(spec.name for spec in self.features if spec.immutable)

    def feature(self, name: str) -> FeatureSpec:
        """Return the specification of feature ``name``.

        Raises
        ------
        DatasetError
            If the schema has no such feature; the message lists the known ones.
        """
        for spec in self.features:
            if spec.name == name:
                return spec
        raise DatasetError(f"unknown feature {name!r}; known features: {', '.join(self.names)}")
