"""Splitting one table into per-site shards.

Both partitioners are deterministic functions of their inputs (and of the
generator's state), so every site can compute the whole split locally from the
same public seed and keep only its own part; no index list travels anywhere.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedlens.errors import DatasetError

__all__ = ["attribute_partition", "dirichlet_label_partition"]

_MAX_DRAWS = 100


def dirichlet_label_partition(
    labels: NDArray[np.generic],
    num_sites: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 10,
) -> list[NDArray[np.int64]]:
    """Split rows across sites with label skew drawn from a Dirichlet law.

    For every class, the share of its rows that each site receives is drawn
    from ``Dirichlet(alpha, ..., alpha)``: a small ``alpha`` concentrates each
    class on few sites, a large one approaches an even, label-balanced split.
    Draws are repeated until every site holds at least ``min_size`` rows; if
    that keeps failing (tiny ``alpha``), the last draw is repaired by moving
    randomly chosen rows from the largest sites to the short ones.

    Parameters
    ----------
    labels
        Shape ``(n,)``; any values that ``numpy.unique`` can sort.
    num_sites
        Number of sites ``K >= 1``.
    alpha
        Dirichlet concentration, finite and ``> 0``.
    rng
        Source of all randomness; the same state gives the same split.
    min_size
        Smallest acceptable number of rows per site.

    Returns
    -------
    list of numpy.ndarray
        ``K`` sorted int64 arrays of row indices; they are disjoint and their
        union is ``range(n)``.

    Raises
    ------
    DatasetError
        If ``num_sites < 1``, ``alpha`` is not a positive finite number,
        ``min_size < 0``, or there are fewer than ``num_sites * min_size`` rows.
    """
    values = np.asarray(labels)
    if values.ndim != 1:
        raise DatasetError(f"labels must be one-dimensional, got shape {values.shape}")
    _check_num_sites(num_sites)
    if not (math.isfinite(alpha) and alpha > 0):
        raise DatasetError(f"alpha must be a positive finite number, got {alpha}")
    if min_size < 0:
        raise DatasetError(f"min_size must be >= 0, got {min_size}")
    n = values.shape[0]
    if n < num_sites * max(min_size, 1):
        raise DatasetError(
            f"{n} rows cannot give {num_sites} sites at least {max(min_size, 1)} rows each"
        )
    _, codes = np.unique(values, return_inverse=True)
    codes = codes.reshape(-1)
    site_of = np.zeros(n, dtype=np.int64)
    for _ in range(_MAX_DRAWS):
        site_of = _draw(codes, num_sites, alpha, rng)
        if np.bincount(site_of, minlength=num_sites).min() >= min_size:
            break
    else:
        _repair(site_of, num_sites, min_size, rng)
    return [np.flatnonzero(site_of == site).astype(np.int64) for site in range(num_sites)]


def _draw(
    codes: NDArray[np.intp], num_sites: int, alpha: float, rng: np.random.Generator
) -> NDArray[np.int64]:
    """Assign each row a site, class by class; returns shape ``(n,)``."""
    site_of = np.zeros(codes.shape[0], dtype=np.int64)
    for code in range(int(codes.max()) + 1):
        rows = rng.permutation(np.flatnonzero(codes == code))
        shares = rng.dirichlet(np.full(num_sites, alpha))
        if not np.all(np.isfinite(shares)):
            shares = np.full(num_sites, 1.0 / num_sites)
        cuts = np.floor(np.cumsum(shares)[:-1] * rows.shape[0]).astype(np.int64)
        for site, part in enumerate(np.split(rows, cuts)):
            site_of[part] = site
    return site_of


def _repair(
    site_of: NDArray[np.int64], num_sites: int, min_size: int, rng: np.random.Generator
) -> None:
    """Move rows from the largest sites until every site has ``min_size`` rows (in place)."""
    sizes = np.bincount(site_of, minlength=num_sites)
    while sizes.min() < min_size:
        short = int(np.argmin(sizes))
        donor = int(np.argmax(sizes))
        # The row count check guarantees the donor has rows to spare.
        moved = min(min_size - int(sizes[short]), int(sizes[donor]) - min_size)
        picked = rng.choice(np.flatnonzero(site_of == donor), size=moved, replace=False)
        site_of[picked] = short
        sizes[short] += moved
        sizes[donor] -= moved


def attribute_partition(values: NDArray[np.generic], num_sites: int) -> list[NDArray[np.int64]]:
    """Split rows by a natural attribute, keeping every attribute value on one site.

    Distinct values are taken from most to least frequent (ties in sorted
    value order; a missing value counts as a value of its own and sorts
    last) and each is given whole to the site that currently holds the
    fewest rows (ties to the lowest site id). With ``K`` equally frequent
    values and ``K`` sites, value ``i`` in sorted order lands on site ``i``.

    Parameters
    ----------
    values
        Shape ``(n,)``, the attribute of every row.
    num_sites
        Number of sites ``K >= 1``.

    Returns
    -------
    list of numpy.ndarray
        ``K`` sorted int64 arrays of row indices, disjoint, covering ``range(n)``,
        none empty.

    Raises
    ------
    DatasetError
        If ``num_sites < 1`` or there are fewer distinct values than sites.
    """
    array = np.asarray(values)
    if array.ndim != 1:
        raise DatasetError(f"values must be one-dimensional, got shape {array.shape}")
    _check_num_sites(num_sites)
    codes, uniques = pd.factorize(array, sort=True, use_na_sentinel=False)
    codes = np.asarray(codes, dtype=np.int64)
    if len(uniques) < num_sites:
        raise DatasetError(
            f"the attribute has {len(uniques)} distinct values, fewer than {num_sites} sites"
        )
    counts = np.bincount(codes, minlength=len(uniques))
    site_of_value = np.zeros(len(uniques), dtype=np.int64)
    sizes = np.zeros(num_sites, dtype=np.int64)
    for value in np.argsort(-counts, kind="stable"):
        site = int(np.argmin(sizes))
        site_of_value[value] = site
        sizes[site] += counts[value]
    site_of = site_of_value[codes]
    return [np.flatnonzero(site_of == site).astype(np.int64) for site in range(num_sites)]


def _check_num_sites(num_sites: int) -> None:
    if isinstance(num_sites, bool) or not isinstance(num_sites, int | np.integer):
        raise DatasetError(f"num_sites must be an integer, got {num_sites!r}")
    if num_sites < 1:
        raise DatasetError(f"num_sites must be >= 1, got {num_sites}")
