"""The planted answers of the synthetic hospitals dataset."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["HospitalTruth"]


@dataclass(frozen=True, eq=False)
class HospitalTruth:
    """What a correct explanation of ``synthetic_hospitals`` must find.

    Hospital ``h`` is site ``h`` under ``partition="natural"`` with four sites.
    Index arrays are positions in ``Dataset.train`` and are read-only.

    Parameters
    ----------
    informative
        Features that drive the true label (non-zero logistic weight).
    irrelevant
        Features with weight zero everywhere.
    weights
        Feature name -> weight of the true logistic model
        ``P(y = 1 | x) = sigmoid(sum_j weights[j] * x_j)`` on raw values
        (no intercept); irrelevant features map to ``0.0``.
    spurious_feature
        Feature that tracks the recorded training label at ``spurious_site``
        only and is noise at every other hospital and in the test set.
    spurious_site
        Hospital whose training rows carry the spurious signal.
    flipped_site
        Hospital whose training labels were flipped at random.
    flipped_indices
        Shape ``(m,)``, sorted int64: training rows whose label was flipped;
        all of them belong to ``flipped_site``.
    biased_group
        Value of ``sensitive_attribute`` whose positive training labels were
        partly recorded as negative.
    sensitive_attribute
        Name of the sensitive feature carrying ``biased_group``.
    biased_indices
        Shape ``(b,)``, sorted int64: training rows of ``biased_group`` whose
        true positive label was recorded as 0. Disjoint from ``flipped_indices``.
    """

    informative: tuple[str, ...]
    irrelevant: tuple[str, ...]
    weights: Mapping[str, float]
    spurious_feature: str
    spurious_site: int
    flipped_site: int
    flipped_indices: NDArray[np.int64]
    biased_group: str
    sensitive_attribute: str
    biased_indices: NDArray[np.int64]
