"""Tests of the site partitioners."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from fedlens.datasets import attribute_partition, dirichlet_label_partition
from fedlens.errors import DatasetError


def _assert_disjoint_cover(shards: list[NDArray[np.int64]], n: int) -> None:
    for shard in shards:
        assert shard.dtype == np.int64
        assert np.all(np.diff(shard) > 0), "each shard is sorted without repeats"
    joined = np.concatenate(shards) if shards else np.array([], dtype=np.int64)
    assert joined.shape[0] == n, "shards are disjoint"
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@st.composite
def _dirichlet_case(draw: st.DrawFn) -> tuple[NDArray[np.int64], int, float, int, int]:
    num_sites = draw(st.integers(1, 8))
    min_size = draw(st.integers(0, 12))
    n = draw(st.integers(num_sites * max(min_size, 1), 400))
    num_classes = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    labels = np.random.default_rng(seed).integers(0, num_classes, size=n)
    alpha = draw(st.floats(0.01, 100.0))
    return labels, num_sites, alpha, min_size, seed


@settings(deadline=None, max_examples=60)
@given(_dirichlet_case())
def test_dirichlet_shards_are_disjoint_cover_and_large_enough(
    case: tuple[NDArray[np.int64], int, float, int, int],
) -> None:
    labels, num_sites, alpha, min_size, seed = case
    shards = dirichlet_label_partition(
        labels, num_sites, alpha, np.random.default_rng(seed), min_size=min_size
    )
    assert len(shards) == num_sites
    _assert_disjoint_cover(shards, labels.shape[0])
    assert min(shard.shape[0] for shard in shards) >= min_size


@settings(deadline=None, max_examples=30)
@given(_dirichlet_case())
def test_dirichlet_is_a_function_of_the_seed(
    case: tuple[NDArray[np.int64], int, float, int, int],
) -> None:
    labels, num_sites, alpha, min_size, seed = case
    first = dirichlet_label_partition(
        labels, num_sites, alpha, np.random.default_rng(seed), min_size=min_size
    )
    second = dirichlet_label_partition(
        labels, num_sites, alpha, np.random.default_rng(seed), min_size=min_size
    )
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def _label_skew(labels: NDArray[np.int64], shards: list[NDArray[np.int64]]) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    classes = np.unique(labels)
    overall = np.array([np.mean(labels == c) for c in classes])
    distances = [
        0.5 * np.abs(np.array([np.mean(labels[s] == c) for c in classes]) - overall).sum()
        for s in shards
    ]
    return float(np.mean(distances))


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.random.default_rng(0).integers(0, 3, size=3000)
    skew = {}
    for alpha in (0.1, 100.0):
        skew[alpha] = np.mean(
            [
                _label_skew(
                    labels,
                    dirichlet_label_partition(labels, 5, alpha, np.random.default_rng(seed)),
                )
                for seed in range(5)
            ]
        )
    assert skew[0.1] > 0.3
    assert skew[100.0] < 0.05


def test_dirichlet_repairs_when_draws_keep_starving_sites() -> None:
    # One class and a tiny alpha: almost every draw gives all rows to one site.
    labels = np.zeros(200, dtype=np.int64)
    shards = dirichlet_label_partition(labels, 6, 0.001, np.random.default_rng(1), min_size=20)
    _assert_disjoint_cover(shards, 200)
    assert min(shard.shape[0] for shard in shards) >= 20


@pytest.mark.parametrize(
    ("num_sites", "alpha", "n", "needle"),
    [
        (0, 1.0, 100, "num_sites"),
        (2, 0.0, 100, "alpha"),
        (2, -1.0, 100, "alpha"),
        (2, math.nan, 100, "alpha"),
        (2, math.inf, 100, "alpha"),
        (5, 1.0, 49, "rows"),
    ],
)
def test_dirichlet_rejects_bad_requests(num_sites: int, alpha: float, n: int, needle: str) -> None:
    labels = np.arange(n) % 2
    with pytest.raises(DatasetError, match=needle):
        dirichlet_label_partition(labels, num_sites, alpha, np.random.default_rng(0))


@settings(deadline=None, max_examples=80)
@given(
    st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "g"]), min_size=1, max_size=200),
    st.integers(1, 7),
)
def test_attribute_partition_keeps_every_value_on_one_site(values: list[str], k: int) -> None:
    array = np.array(values, dtype=object)
    distinct = len(set(values))
    if distinct < k:
        with pytest.raises(DatasetError, match="distinct values"):
            attribute_partition(array, k)
        return
    shards = attribute_partition(array, k)
    assert len(shards) == k
    _assert_disjoint_cover(shards, len(values))
    assert all(shard.shape[0] > 0 for shard in shards)
    site_of_row = np.empty(len(values), dtype=np.int64)
    for site, shard in enumerate(shards):
        site_of_row[shard] = site
    for value in set(values):
        assert len(set(site_of_row[array == value])) == 1


def test_attribute_partition_is_greedy_by_frequency() -> None:
    values = np.array(["x"] * 10 + ["y"] * 5 + ["z"] * 4 + ["w"] * 3)
    shards = attribute_partition(values, 2)
    assert set(values[shards[0]]) == {"x"}
    assert set(values[shards[1]]) == {"y", "z", "w"}


def test_attribute_partition_equal_counts_follow_sorted_values() -> None:
    values = np.repeat(np.array([3, 1, 0, 2]), 5)
    shards = attribute_partition(values, 4)
    assert [set(values[shard].tolist()) for shard in shards] == [{0}, {1}, {2}, {3}]


def test_attribute_partition_treats_missing_as_one_value() -> None:
    values = np.array(["a", None, "b", np.nan, "a", None], dtype=object)
    shards = attribute_partition(values, 3)
    _assert_disjoint_cover(shards, 6)
    missing_sites = {site for site, shard in enumerate(shards) for row in shard if row in (1, 3, 5)}
    assert len(missing_sites) == 1


def test_attribute_partition_rejects_bad_site_counts() -> None:
    with pytest.raises(DatasetError, match="num_sites"):
        attribute_partition(np.array([1, 2, 3]), 0)
    with pytest.raises(DatasetError, match="2 distinct values, fewer than 3 sites"):
        attribute_partition(np.array([1, 2, 2]), 3)
