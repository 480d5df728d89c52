"""Datasets, schema-fixed preprocessing and site partitioners.

Every site loads the same public dataset description, computes the same
split from a shared seed and keeps only its own shard; encoding is fixed by
the schema, so it is identical at every site and learnt from nobody's rows.

Registered datasets: ``adult``, ``breast_cancer``, ``synthetic_hospitals``.
"""

from __future__ import annotations

from fedlens.datasets import adult as _adult
from fedlens.datasets import breast_cancer as _breast_cancer
from fedlens.datasets import synthetic as _synthetic
from fedlens.datasets.dataset import Dataset, Partition, SiteData
from fedlens.datasets.partition import attribute_partition, dirichlet_label_partition
from fedlens.datasets.preprocess import Preprocessor
from fedlens.datasets.registry import (
    Loader,
    available_datasets,
    load_dataset,
    register_dataset,
)
from fedlens.datasets.schema import FeatureKind, FeatureSpec, Schema
from fedlens.datasets.truth import HospitalTruth

__all__ = [
    "Dataset",
    "FeatureKind",
    "FeatureSpec",
    "HospitalTruth",
    "Loader",
    "Partition",
    "Preprocessor",
    "Schema",
    "SiteData",
    "attribute_partition",
    "available_datasets",
    "dirichlet_label_partition",
    "load_dataset",
    "register_dataset",
]

# Imported for their registrations only.
del _adult, _breast_cancer, _synthetic
