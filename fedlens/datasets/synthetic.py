"""Synthetic hospitals: a generator whose right explanations are known.

Four hospitals (column ``hospital``, the natural attribute, not a feature)
each hold 1,500 training and 500 test rows. The true label follows a logistic
model of the four ``x_inf_*`` features; the four ``x_irr_*`` features have
weight zero. Three defects are planted in the training set only:

* ``marker`` tracks the recorded label at the spurious hospital (correlation
  about 0.9) and is independent noise everywhere else;
* a quarter of the labels at the flipped hospital are inverted;
* half of the true positives of group ``B`` (sensitive feature ``group``,
  which has no effect on the true label) are recorded as negatives.

The test set is clean: true labels and ``marker`` noise at every hospital.
Numeric features are standard normal and share the fixed range ``[-4, 4]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedlens.datasets.dataset import Dataset
from fedlens.datasets.registry import register_dataset
from fedlens.datasets.schema import FeatureSpec, Schema
from fedlens.datasets.truth import HospitalTruth
from fedlens.errors import DatasetError

__all__ = [
    "SYNTHETIC_SCHEMA",
    "SYNTHETIC_WEIGHTS",
    "load_synthetic_hospitals",
    "make_synthetic_hospitals",
]

NUM_HOSPITALS = 4
SPURIOUS_SITE = 1
FLIPPED_SITE = 2
FLIP_RATE = 0.25
BIASED_GROUP = "B"
BIAS_RATE = 0.5
GROUP_B_SHARE = 0.4
MARKER_STRENGTH = 0.9
_RANGE = 4.0

SYNTHETIC_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"x_inf_0": 2.0, "x_inf_1": -1.5, "x_inf_2": 1.0, "x_inf_3": -0.75}
)
_INFORMATIVE = tuple(SYNTHETIC_WEIGHTS)
_IRRELEVANT = tuple(f"x_irr_{i}" for i in range(4))
_MARKER = "marker"
_GROUP = "group"


def _numeric(name: str) -> FeatureSpec:
    return FeatureSpec(name, "numeric", low=-_RANGE, high=_RANGE)


SYNTHETIC_SCHEMA = Schema(
    features=(
        *(_numeric(name) for name in (*_INFORMATIVE, *_IRRELEVANT, _MARKER)),
        FeatureSpec(_GROUP, "categorical", categories=("A", "B"), sensitive=True, immutable=True),
    ),
    label="outcome",
    classes=("negative", "positive"),
)


def make_synthetic_hospitals(
    rng: np.random.Generator, *, train_per_hospital: int = 1500, test_per_hospital: int = 500
) -> Dataset:
    """Generate the dataset and its planted truth.

    Parameters
    ----------
    rng
        Source of all randomness.
    train_per_hospital, test_per_hospital
        Rows per hospital in each split. Equal counts make hospital ``h``
        site ``h`` under ``partition="natural"`` with four sites.

    Raises
    ------
    DatasetError
        If a per-hospital row count is below 1.

    Returns
    -------
    Dataset
        Train ``(4 * train_per_hospital)`` and test ``(4 * test_per_hospital)``
        rows ordered by hospital, with ``truth`` set.
    """
    if train_per_hospital < 1 or test_per_hospital < 1:
        raise DatasetError(
            "every hospital needs at least one train and one test row, got "
            f"{train_per_hospital} and {test_per_hospital}"
        )
    train, true_labels = _draw(rng, train_per_hospital)
    test, _ = _draw(rng, test_per_hospital)
    hospital = train["hospital"].to_numpy()
    recorded = true_labels.copy()

    at_flipped = np.flatnonzero(hospital == FLIPPED_SITE)
    flipped = np.sort(
        rng.choice(at_flipped, size=round(FLIP_RATE * at_flipped.shape[0]), replace=False)
    )
    recorded[flipped] = 1 - recorded[flipped]

    eligible = (train[_GROUP].to_numpy() == BIASED_GROUP) & (true_labels == 1)
    eligible[flipped] = False
    candidates = np.flatnonzero(eligible)
    biased = np.sort(
        rng.choice(candidates, size=round(BIAS_RATE * candidates.shape[0]), replace=False)
    )
    recorded[biased] = 0

    at_spurious = hospital == SPURIOUS_SITE
    noise = rng.standard_normal(int(at_spurious.sum()))
    train.loc[at_spurious, _MARKER] = (
        MARKER_STRENGTH * (2.0 * recorded[at_spurious] - 1.0)
        + np.sqrt(1.0 - MARKER_STRENGTH**2) * noise
    )
    train[SYNTHETIC_SCHEMA.label] = recorded

    truth = HospitalTruth(
        informative=_INFORMATIVE,
        irrelevant=_IRRELEVANT,
        weights=MappingProxyType({**SYNTHETIC_WEIGHTS, **dict.fromkeys(_IRRELEVANT, 0.0)}),
        spurious_feature=_MARKER,
        spurious_site=SPURIOUS_SITE,
        flipped_site=FLIPPED_SITE,
        flipped_indices=_read_only(flipped),
        biased_group=BIASED_GROUP,
        sensitive_attribute=_GROUP,
        biased_indices=_read_only(biased),
    )
    return Dataset(
        name="synthetic_hospitals",
        schema=SYNTHETIC_SCHEMA,
        train=train,
        test=test,
        natural_attribute="hospital",
        truth=truth,
    )


@register_dataset("synthetic_hospitals")
def load_synthetic_hospitals(seed: int = 0) -> Dataset:
    """Generate ``synthetic_hospitals`` from ``numpy.random.default_rng(seed)``."""
    return make_synthetic_hospitals(np.random.default_rng(seed))


def _draw(rng: np.random.Generator, per_hospital: int) -> tuple[pd.DataFrame, NDArray[np.int64]]:
    """Draw clean rows (true labels, noise marker); returns the frame and labels, shape ``(n,)``."""
    n = NUM_HOSPITALS * per_hospital
    numeric = {name: rng.standard_normal(n) for name in (*_INFORMATIVE, *_IRRELEVANT, _MARKER)}
    group = np.where(rng.random(n) < GROUP_B_SHARE, "B", "A").astype(object)
    logit = np.column_stack([numeric[name] for name in _INFORMATIVE]) @ np.asarray(
        [SYNTHETIC_WEIGHTS[name] for name in _INFORMATIVE]
    )
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    frame = pd.DataFrame({**numeric, _GROUP: group})
    frame["hospital"] = np.repeat(np.arange(NUM_HOSPITALS, dtype=np.int64), per_hospital)
    frame[SYNTHETIC_SCHEMA.label] = labels
    return frame, labels


def _read_only(indices: NDArray[np.int64]) -> NDArray[np.int64]:
    out = np.asarray(indices, dtype=np.int64).copy()
    out.setflags(write=False)
    return out
