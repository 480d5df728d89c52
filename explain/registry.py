"""Registry of explanation kinds, looked up by the name the wire carries.

A kind is a pair of pure functions: ``contribute`` turns a model and a site's records
into a :class:`Contribution` (a sum of per-record terms, each clipped to the declared L2
bound, plus the record count), and ``postprocess`` turns the noised sum over all sites
into released values. A third, ``coordinate_labels``, names the coordinates of the sum
from the public encoding alone, so the coordinator can size a round before any site
computes anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from torch import nn

from fedlens.errors import ConfigurationError
from fedlens.types import ReleasedValue

__all__ = [
    "Contribution",
    "ExplanationKind",
    "PostProcessed",
    "SiteContext",
    "available_kinds",
    "check_noised_sum",
    "get_kind",
    "l2_sensitivity",
    "register_kind",
]


@dataclass(frozen=True)
class Contribution:
    """One site's clipped, not yet noised contribution.

    Attributes
    ----------
    vector
        ``(len(labels) + 1,)`` float64: the sum over records of each record's clipped
        term, followed by ``count * clip_bound`` (each record adds ``clip_bound`` to the
        last coordinate, so one record moves the whole vector by at most
        ``sqrt(2) * clip_bound`` in L2).
    count
        Number of records summed.
    labels
        Names of the coordinates before the count coordinate.
    """

    vector: np.ndarray
    count: int
    labels: tuple[str, ...]


def check_noised_sum(noised_sum: np.ndarray, labels: Sequence[str], clip_bound: float) -> None:
    """Refuse a noised sum that does not fit ``labels`` (plus the count), or a bad clip bound.

    Raises
    ------
    ConfigurationError
        The sum's shape is not ``(len(labels) + 1,)`` or the clip bound is not finite > 0.
    """
    if noised_sum.shape != (len(labels) + 1,):
        raise ConfigurationError(
            f"noised sum has shape {noised_sum.shape}, expected ({len(labels) + 1},)"
        )
    if not math.isfinite(clip_bound) or clip_bound <= 0:
        raise ConfigurationError(f"clip bound must be finite and > 0, got {clip_bound!r}")


def l2_sensitivity(clip_bound: float) -> float:
    """L2 sensitivity of a contribution to adding or removing one record."""
    return float(np.sqrt(2.0) * clip_bound)


@dataclass(frozen=True)
class SiteContext:
    """What a site knows besides its records and the round's parameters.

    Attributes
    ----------
    site_id, site_ids
        This site and every site of the round, in the round's order.
    site_breakdown
        The site's policy allows results broken down by site (its own coordinate in a
        sum, released with local noise only).
    arrays
        Public arrays sent with the request: released second-order factors, TracIn
        checkpoints, a validation-loss gradient. Nothing in them is site data.
    """

    site_id: str = ""
    site_ids: tuple[str, ...] = ()
    site_breakdown: bool = False
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class PostProcessed:
    noised_count: float
    values: tuple[ReleasedValue, ...]
    grouped: tuple[ReleasedValue, ...]


class ContributeFn(Protocol):
    """``contribute(model, features, labels, params, clip_bound, sensitive, context)``.

    ``sensitive`` maps each sensitive attribute the site holds to its records' raw
    values, ``(n,)`` each (:attr:`fedlens.datasets.SiteData.sensitive`); it never leaves
    the site except through the clipped term. ``context`` says which site computes and
    carries the public arrays of the request. Kinds that do not need them ignore them.
    """

    def __call__(
        self,
        model: nn.Module,
        features: np.ndarray,
        labels: np.ndarray,
        params: Mapping[str, str],
        clip_bound: float,
        /,
        sensitive: Mapping[str, np.ndarray] | None = None,
        context: SiteContext | None = None,
    ) -> Contribution: ...


PostprocessFn = Callable[
    [np.ndarray, float, float, tuple[str, ...], Mapping[str, str]], PostProcessed
]
LabelsFn = Callable[
    [Sequence[str], Mapping[str, Sequence[int]], Mapping[str, str]], tuple[str, ...]
]


def _one_per_encoded_column(
    encoded_names: Sequence[str], groups: Mapping[str, Sequence[int]], params: Mapping[str, str]
) -> tuple[str, ...]:
    del groups, params  # one coordinate per encoded column, whatever feature it belongs to
    return tuple(encoded_names)


@dataclass(frozen=True)
class ExplanationKind:
    """A registered explanation kind.

    ``contribute(model, features (n, d), labels (n,), params, clip_bound, sensitive)``
    (``sensitive``: attribute -> ``(n,)`` raw values, or ``None``) and
    ``postprocess(noised_sum (length,), noise_std, clip_bound, labels, params)``.

    ``coordinate_labels(encoded_names, groups, params)`` names the coordinates of a
    contribution (the count coordinate excluded) from the encoder's public column
    names and its feature -> columns groups; a round's ``labels`` are exactly these and
    its ``length`` is one more. By default there is one coordinate per encoded column,
    named as the column.
    """

    name: str
    contribute: ContributeFn
    postprocess: PostprocessFn
    coordinate_labels: LabelsFn = _one_per_encoded_column


_KINDS: dict[str, ExplanationKind] = {}


def register_kind(kind: ExplanationKind) -> ExplanationKind:
    if kind.name in _KINDS:
        raise ConfigurationError(f"explanation kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def available_kinds() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))


def get_kind(name: str) -> ExplanationKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown explanation kind {name!r}; available: {', '.join(available_kinds())}"
        ) from None
