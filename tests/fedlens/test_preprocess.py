"""Tests of schemas and the schema-fixed preprocessor."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlens.datasets import FeatureSpec, Preprocessor, Schema
from fedlens.errors import DatasetError

SCHEMA = Schema(
    features=(
        FeatureSpec("age", "numeric", low=20.0, high=70.0, immutable=True),
        FeatureSpec("colour", "categorical", categories=("red", "green", "blue")),
        FeatureSpec("gain", "numeric", low=0.0, high=999.0, log=True),
        FeatureSpec("sex", "categorical", categories=("F", "M"), sensitive=True, immutable=True),
    ),
    label="y",
    classes=("no", "yes"),
)


def _frame(rows: list[tuple[float, object, float, object]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["age", "colour", "gain", "sex"])


def test_layout_of_encoded_columns() -> None:
    pre = Preprocessor(SCHEMA)
    assert pre.encoded_names == (
        "age",
        "colour=red",
        "colour=green",
        "colour=blue",
        "gain",
        "sex=F",
        "sex=M",
    )
    assert dict(pre.groups) == {"age": (0,), "colour": (1, 2, 3), "gain": (4,), "sex": (5, 6)}
    assert pre.dimension == 7


def test_known_encodings() -> None:
    frame = _frame(
        [
            (20.0, "green", 0.0, "M"),
            (45.0, "purple", 999.0, None),  # unseen category, missing value
            (90.0, None, 10_000.0, "F"),  # out of range on both numerics
            (10.0, "blue", 31.0, "F"),
        ]
    )
    out = Preprocessor(SCHEMA).transform(frame)
    assert out.dtype == np.float32
    assert out.shape == (4, 7)
    expected = np.array(
        [
            [0.0, 0, 1, 0, 0.0, 0, 1],
            [0.5, 0, 0, 0, 1.0, 0, 0],
            [1.0, 0, 0, 0, 1.0, 1, 0],
            [0.0, 0, 0, 1, math.log1p(31.0) / math.log1p(999.0), 1, 0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_extra_columns_are_ignored_and_column_order_does_not_matter() -> None:
    frame = _frame([(30.0, "red", 5.0, "F"), (60.0, "blue", 50.0, "M")])
    shuffled = frame[["sex", "gain", "colour", "age"]].assign(other=[1, 2])
    pre = Preprocessor(SCHEMA)
    np.testing.assert_array_equal(pre.transform(frame), pre.transform(shuffled))


def test_missing_columns_are_named() -> None:
    frame = _frame([(30.0, "red", 5.0, "F")]).drop(columns=["gain", "sex"])
    with pytest.raises(DatasetError, match="gain, sex"):
        Preprocessor(SCHEMA).transform(frame)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "forty"])
def test_bad_numeric_values_are_refused(bad: object) -> None:
    frame = pd.DataFrame({"age": [30.0, bad], "colour": ["red"] * 2, "gain": [1.0] * 2})
    frame["sex"] = "F"
    with pytest.raises(DatasetError, match="'age'"):
        Preprocessor(SCHEMA).transform(frame)


_rows = st.lists(
    st.tuples(
        st.floats(-1e4, 1e4),
        st.sampled_from(["red", "green", "blue", "grey", None]),
        st.floats(0.0, 1e7),
        st.sampled_from(["F", "M", None]),
    ),
    min_size=1,
    max_size=30,
)


@settings(deadline=None, max_examples=60)
@given(_rows, st.integers(0, 2**32 - 1))
def test_a_row_encodes_the_same_whatever_rows_surround_it(
    rows: list[tuple[float, object, float, object]], seed: int
) -> None:
    pre = Preprocessor(SCHEMA)
    frame = _frame(rows)
    full = pre.transform(frame)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    np.testing.assert_array_equal(pre.transform(frame.iloc[order]), full[order])
    subset = np.sort(rng.choice(len(rows), size=min(3, len(rows)), replace=False))
    np.testing.assert_array_equal(pre.transform(frame.iloc[subset]), full[subset])
    assert np.all((full >= 0.0) & (full <= 1.0))
    for columns in pre.groups.values():
        assert np.all(full[:, list(columns)].sum(axis=1) <= 1.0)


def test_schema_lookup_and_flags() -> None:
    assert SCHEMA.feature("gain").log
    assert SCHEMA.sensitive == ("sex",)
    assert SCHEMA.immutable == ("age", "sex")
    assert SCHEMA.names == ("age", "colour", "gain", "sex")
    with pytest.raises(DatasetError, match=r"'height'.*age, colour, gain, sex"):
        SCHEMA.feature("height")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: FeatureSpec("x", "categorical"), "category list"),
        (lambda: FeatureSpec("x", "categorical", categories=("a", "a")), "repeats"),
        (lambda: FeatureSpec("x", "numeric", low=1.0, high=1.0), "low < high"),
        (lambda: FeatureSpec("x", "numeric", low=-2.0, high=1.0, log=True), "low > -1"),
        (lambda: FeatureSpec("x", "numeric", categories=("a",)), "cannot have categories"),
        (
            lambda: Schema(
                (FeatureSpec("x", "numeric"), FeatureSpec("x", "numeric")), "y", ("a", "b")
            ),
            "repeats feature names: x",
        ),
        (lambda: Schema((FeatureSpec("y", "numeric"),), "y", ("a", "b")), "also listed"),
        (lambda: Schema((FeatureSpec("x", "numeric"),), "y", ("a", "a")), "two distinct"),
    ],
)
def test_invalid_specs_are_refused(make: object, needle: str) -> None:
    assert callable(make)
    with pytest.raises(DatasetError, match=needle):
        make()
