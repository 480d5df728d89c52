"""Encoding of raw rows into model inputs, fixed by the schema alone.

Nothing here is fitted: numeric ranges and category lists come from the
schema, so every site builds the same encoder and the encoding of a record
does not depend on which other records sit next to it. That is what lets
per-record contributions be clipped and summed across sites meaningfully.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedlens.datasets.schema import FeatureSpec, Schema
from fedlens.errors import DatasetError

__all__ = ["Preprocessor"]


class Preprocessor:
    """Schema-defined encoder from raw rows to a float32 matrix in ``[0, 1]``.

    Numeric features become one column ``(x - low) / (high - low)`` clipped to
    ``[0, 1]`` (after ``log1p`` of ``x``, ``low`` and ``high`` when the feature
    is log-scaled). Categorical features become one column per listed
    category, in schema order; a missing or unlisted value gives a row of zeros.

    Parameters
    ----------
    schema
        The public description of the table.
    """

    def __init__(self, schema: Schema) -> None:
        self._schema = schema
        names: list[str] = []
        groups: dict[str, tuple[int, ...]] = {}
        for spec in schema.features:
            start = len(names)
            if spec.kind == "numeric":
                names.append(spec.name)
            else:
                names.extend(f"{spec.name}={category}" for category in spec.categories)
            groups[spec.name] = tuple(range(start, len(names)))
        self._encoded_names = tuple(names)
        self._groups: Mapping[str, tuple[int, ...]] = MappingProxyType(groups)

    @property
    def schema(self) -> Schema:
        """The schema this encoder was built from."""
        return self._schema

    @property
    def encoded_names(self) -> tuple[str, ...]:
        """Name of every encoded column: ``"age"``, ``"workclass=Private"``, ..."""
        return self._encoded_names

    @property
    def groups(self) -> Mapping[str, tuple[int, ...]]:
        """Original feature name -> indices of its encoded columns, in schema order."""
        return self._groups

    @property
    def dimension(self) -> int:
        """Number of encoded columns ``d``."""
        return len(self._encoded_names)

    def transform(self, frame: pd.DataFrame) -> NDArray[np.float32]:
        """Encode the rows of ``frame``.

        Parameters
        ----------
        frame
            Raw rows holding (at least) every schema feature; other columns
            are ignored.

        Returns
        -------
        numpy.ndarray
            Shape ``(n, d)``, dtype float32, values in ``[0, 1]``; row ``i``
            encodes ``frame.iloc[i]``.

        Raises
        ------
        DatasetError
            If feature columns are missing, or a numeric column holds a
            missing, infinite or non-numeric value.
        """
        if not isinstance(frame, pd.DataFrame):
            raise DatasetError(f"expected a pandas DataFrame, got {type(frame).__name__}")
        missing = [name for name in self._schema.names if name not in frame.columns]
        if missing:
            raise DatasetError(f"frame lacks feature columns: {', '.join(missing)}")
        out = np.zeros((len(frame), self.dimension), dtype=np.float32)
        for spec in self._schema.features:
            columns = self._groups[spec.name]
            if spec.kind == "numeric":
                out[:, columns[0]] = _scale(spec, frame[spec.name])
            else:
                # -1 marks a missing or unlisted value: it keeps an all-zero row.
                codes = np.asarray(
                    pd.Index(spec.categories, dtype=object).get_indexer(
                        frame[spec.name].to_numpy(dtype=object)
                    ),
                    dtype=np.int64,
                )
                rows = np.flatnonzero(codes >= 0)
                out[rows, columns[0] + codes[rows]] = 1.0
        return out


def _scale(spec: FeatureSpec, column: pd.Series) -> NDArray[np.float64]:
    """Map a numeric column onto ``[0, 1]`` with the feature's fixed range; shape ``(n,)``."""
    try:
        values = np.asarray(column.to_numpy(dtype=np.float64, na_value=np.nan))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"numeric feature {spec.name!r} holds non-numeric values") from exc
    if not np.all(np.isfinite(values)):
        raise DatasetError(f"numeric feature {spec.name!r} holds missing or infinite values")
    low, high = spec.low, spec.high
    if spec.log:
        # Clamp before log1p so values below the range cannot leave its domain.
        values = np.log1p(np.maximum(values, low))
        low, high = float(np.log1p(low)), float(np.log1p(high))
    scaled: NDArray[np.float64] = np.clip((values - low) / (high - low), 0.0, 1.0)
    return scaled
