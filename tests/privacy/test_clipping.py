"""Per-record clipping: the bound holds for every row, short rows are untouched."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlens.errors import ConfigurationError, ExplanationError
from privacy import clip_rows

finite = st.floats(min_value=-1e150, max_value=1e150, allow_nan=False, allow_infinity=False)
rows_strategy = hnp.arrays(
    np.float64,
    st.tuples(st.integers(0, 12), st.integers(0, 9)),
    elements=finite,
)
bounds = st.floats(min_value=1e-6, max_value=1e6)


@given(rows=rows_strategy, bound=bounds)
def test_every_row_is_within_the_bound_and_short_rows_are_unchanged(
    rows: np.ndarray, bound: float
) -> None:
    clipped = clip_rows(rows, bound)
    assert clipped.shape == rows.shape and clipped.dtype == np.float64
    norms = np.linalg.norm(clipped, axis=1)
    assert (norms <= bound).all()
    with np.errstate(over="ignore"):
        original = np.linalg.norm(rows, axis=1)
    short = original <= bound
    assert np.array_equal(clipped[short], rows[short])
    long_ = ~short
    # Long rows keep their direction and reach the bound.
    assert np.allclose(norms[long_], bound, rtol=1e-9)
    for before, after in zip(rows[long_], clipped[long_], strict=True):
        unit_before = before / np.abs(before).max()
        unit_after = after / np.abs(after).max()
        assert np.allclose(unit_before, unit_after, rtol=1e-9, atol=1e-12)


def test_known_values() -> None:
    rows = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]])
    clipped = clip_rows(rows, 1.0)
    assert np.allclose(clipped, [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0], [-0.6, 0.8]])
    assert np.array_equal(clipped[1:3], rows[1:3])


def test_input_is_not_modified() -> None:
    rows = np.array([[3.0, 4.0]])
    clip_rows(rows, 1.0)
    assert np.array_equal(rows, [[3.0, 4.0]])


def test_rows_whose_squares_overflow_are_still_clipped() -> None:
    clipped = clip_rows(np.array([[1e300, 1e300]]), 2.0)
    assert np.allclose(clipped, [[np.sqrt(2.0), np.sqrt(2.0)]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_name_their_index(bad: float) -> None:
    rows = np.zeros((5, 3))
    rows[3, 1] = bad
    with pytest.raises(ExplanationError, match="row 3"):
        clip_rows(rows, 1.0)


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_bound_is_a_configuration_error(bound: float) -> None:
    with pytest.raises(ConfigurationError, match="clip bound"):
        clip_rows(np.ones((2, 2)), bound)


def test_rows_must_be_two_dimensional() -> None:
    with pytest.raises(ExplanationError, match="shape"):
        clip_rows(np.ones(3), 1.0)
