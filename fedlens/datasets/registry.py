"""Datasets looked up by name, so configuration and the wire can name them."""

from __future__ import annotations

import functools
from collections.abc import Callable

from fedlens.datasets.dataset import Dataset
from fedlens.errors import DatasetError

__all__ = ["Loader", "available_datasets", "load_dataset", "register_dataset"]

Loader = Callable[[int], Dataset]
"""A function ``load(seed) -> Dataset``; the seed fixes any random split or generation."""

_LOADERS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register the decorated loader under ``name``.

    Parameters
    ----------
    name
        Registry key, as configuration spells it.

    Returns
    -------
    Callable
        A decorator that records the loader and returns it unchanged.

    Raises
    ------
    DatasetError
        If ``name`` is empty or already names a different loader.
    """
    if not name:
        raise DatasetError("a dataset needs a non-empty name")

    def decorate(loader: Loader) -> Loader:
        existing = _LOADERS.get(name)
        if existing is not None and existing is not loader:
            raise DatasetError(f"dataset {name!r} is already registered")
        _LOADERS[name] = loader
        return loader

    return decorate


def available_datasets() -> tuple[str, ...]:
    """Names of every registered dataset, sorted."""
    return tuple(sorted(_LOADERS))


def load_dataset(name: str, *, seed: int = 0) -> Dataset:
    """Load the dataset registered as ``name``.

    Results are cached per ``(name, seed)``: every site simulated in one
    process shares the same `Dataset`, whose frames must not be modified.

    Parameters
    ----------
    name
        A name from `available_datasets`.
    seed
        Seed of the dataset's own randomness (train/test split, generation).

    Raises
    ------
    DatasetError
        If no dataset is registered as ``name``; the message lists the names.
    """
    if name not in _LOADERS:
        raise DatasetError(
            f"unknown dataset {name!r}; available: {', '.join(available_datasets())}"
        )
    return _load_cached(name, seed)


@functools.lru_cache(maxsize=32)
def _load_cached(name: str, seed: int) -> Dataset:
    return _LOADERS[name](seed)
