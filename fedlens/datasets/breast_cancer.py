"""Breast Cancer Wisconsin (Diagnostic), as bundled with scikit-learn (no download).

The table has no published coding ranges, so each feature's fixed range is
the minimum/maximum given in the dataset's own description (the summary
statistics table of scikit-learn's ``DESCR``): public metadata written out
here as constants, never recomputed from rows. Those figures are rounded, so
a few records fall marginally outside and are clipped onto ``[0, 1]``.

Sites split naturally by ``texture_band``: the mean grey-level spread of the
aspirate image cut at fixed thresholds (14, 16, 18, 20, 22, 24, 27) into
bands 0..7. Grey-level texture depends on staining and scanning, so the band
stands in for "which laboratory prepared the slide". It is an extra column of
the frames, not a model feature (``mean texture`` already is one).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fedlens.datasets.dataset import Dataset
from fedlens.datasets.registry import register_dataset
from fedlens.datasets.schema import FeatureSpec, Schema
from fedlens.errors import DatasetError

__all__ = ["BREAST_CANCER_SCHEMA", "TEXTURE_THRESHOLDS", "load_breast_cancer"]

# (feature, low, high) in scikit-learn's column order.
_RANGES: tuple[tuple[str, float, float], ...] = (
    ("mean radius", 6.981, 28.11),
    ("mean texture", 9.71, 39.28),
    ("mean perimeter", 43.79, 188.5),
    ("mean area", 143.5, 2501.0),
    ("mean smoothness", 0.053, 0.163),
    ("mean compactness", 0.019, 0.345),
    ("mean concavity", 0.0, 0.427),
    ("mean concave points", 0.0, 0.201),
    ("mean symmetry", 0.106, 0.304),
    ("mean fractal dimension", 0.05, 0.097),
    ("radius error", 0.112, 2.873),
    ("texture error", 0.36, 4.885),
    ("perimeter error", 0.757, 21.98),
    ("area error", 6.802, 542.2),
    ("smoothness error", 0.002, 0.031),
    ("compactness error", 0.002, 0.135),
    ("concavity error", 0.0, 0.396),
    ("concave points error", 0.0, 0.053),
    ("symmetry error", 0.008, 0.079),
    ("fractal dimension error", 0.001, 0.03),
    ("worst radius", 7.93, 36.04),
    ("worst texture", 12.02, 49.54),
    ("worst perimeter", 50.41, 251.2),
    ("worst area", 185.2, 4254.0),
    ("worst smoothness", 0.071, 0.223),
    ("worst compactness", 0.027, 1.058),
    ("worst concavity", 0.0, 1.252),
    ("worst concave points", 0.0, 0.291),
    ("worst symmetry", 0.156, 0.664),
    ("worst fractal dimension", 0.055, 0.208),
)

BREAST_CANCER_SCHEMA = Schema(
    features=tuple(FeatureSpec(name, "numeric", low=low, high=high) for name, low, high in _RANGES),
    label="diagnosis",
    classes=("benign", "malignant"),
)

TEXTURE_THRESHOLDS = (14.0, 16.0, 18.0, 20.0, 22.0, 24.0, 27.0)

_TEST_FRACTION = 0.2


@register_dataset("breast_cancer")
def load_breast_cancer(seed: int = 0) -> Dataset:
    """Load the diagnostic table with a seeded, label-stratified 80/20 split.

    Parameters
    ----------
    seed
        Seed of the train/test split.

    Returns
    -------
    Dataset
        456 training and 113 test rows, 30 numeric features, label
        ``diagnosis`` with ``malignant`` as class 1.
    """
    # Imported here: scikit-learn takes seconds to import and only this loader needs it.
    from sklearn.datasets import load_breast_cancer as sklearn_breast_cancer

    bunch = sklearn_breast_cancer(as_frame=True)
    frame = bunch.frame
    names = list(BREAST_CANCER_SCHEMA.names)
    if [str(name) for name in bunch.feature_names] != names:
        raise DatasetError("scikit-learn's breast cancer columns differ from the schema")
    table = frame.loc[:, names].astype("float64")
    # scikit-learn codes malignant as 0; the schema makes it the positive class.
    table[BREAST_CANCER_SCHEMA.label] = (frame["target"].to_numpy() == 0).astype(np.int64)
    table["texture_band"] = np.searchsorted(
        np.asarray(TEXTURE_THRESHOLDS), table["mean texture"].to_numpy(), side="right"
    ).astype(np.int64)
    test_rows = _stratified_test_rows(
        table[BREAST_CANCER_SCHEMA.label].to_numpy(), np.random.default_rng(seed)
    )
    is_test = np.zeros(len(table), dtype=bool)
    is_test[test_rows] = True
    return Dataset(
        name="breast_cancer",
        schema=BREAST_CANCER_SCHEMA,
        train=table.loc[~is_test].reset_index(drop=True),
        test=table.loc[is_test].reset_index(drop=True),
        natural_attribute="texture_band",
    )


def _stratified_test_rows(labels: NDArray[np.int64], rng: np.random.Generator) -> NDArray[np.int64]:
    """Pick the test fifth of every class; returns sorted row indices, shape ``(m,)``."""
    picked = []
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        count = round(_TEST_FRACTION * rows.shape[0])
        picked.append(rng.choice(rows, size=count, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)
