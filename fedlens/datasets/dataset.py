"""A loaded dataset and the shard of it that one site holds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedlens.datasets.partition import attribute_partition, dirichlet_label_partition
from fedlens.datasets.preprocess import Preprocessor
from fedlens.datasets.schema import Schema
from fedlens.datasets.truth import HospitalTruth
from fedlens.errors import DatasetError

__all__ = ["Dataset", "Partition", "SiteData"]

Partition = Literal["dirichlet", "natural"]

TEST_SITE_ID = -1


@dataclass(frozen=True, eq=False)
class SiteData:
    """The records one site holds, raw and encoded.

    Parameters
    ----------
    site_id
        The site's index, or ``-1`` for the held-out test set.
    features
        Shape ``(n, d)``, float32: the encoded rows (see `Preprocessor`).
    labels
        Shape ``(n,)``, int64 in ``{0, 1}``.
    frame
        The raw feature columns of the same ``n`` rows, in the same order;
        its index holds the rows' positions in ``Dataset.train`` (or
        ``Dataset.test``).
    sensitive
        Sensitive feature name -> shape ``(n,)`` array of raw values.
    """

    site_id: int
    features: NDArray[np.float32]
    labels: NDArray[np.int64]
    frame: pd.DataFrame
    sensitive: Mapping[str, NDArray[np.generic]]

    @property
    def size(self) -> int:
        """Number of records ``n``."""
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class Dataset:
    """A registered dataset: schema, raw train and test tables, site splitting.

    The frames are shared by every caller of `load_dataset` in a process and
    must be treated as read-only.

    Parameters
    ----------
    name
        Registry name.
    schema
        Public description of features, label and classes.
    train, test
        Raw feature columns plus the label column (int 0/1 under
        ``schema.label``), with a 0-based range index; they may carry extra
        columns such as the natural attribute when it is not a feature.
    natural_attribute
        Column of ``train`` that ``partition="natural"`` splits by.
    truth
        Planted ground truth, for synthetic datasets only.
    """

    name: str
    schema: Schema
    train: pd.DataFrame
    test: pd.DataFrame
    natural_attribute: str
    truth: HospitalTruth | None = None

    def __post_init__(self) -> None:
        needed = [*self.schema.names, self.schema.label]
        for part, frame in (("train", self.train), ("test", self.test)):
            missing = [column for column in needed if column not in frame.columns]
            if missing:
                raise DatasetError(
                    f"dataset {self.name!r}: {part} lacks columns {', '.join(missing)}"
                )
            if not frame[self.schema.label].isin([0, 1]).all():
                raise DatasetError(f"dataset {self.name!r}: {part} labels must be 0 or 1")
        if self.natural_attribute not in self.train.columns:
            raise DatasetError(
                f"dataset {self.name!r}: natural attribute {self.natural_attribute!r} "
                "is not a column of train"
            )

    @property
    def preprocessor(self) -> Preprocessor:
        """The schema's encoder; the same at every site."""
        return Preprocessor(self.schema)

    def site(
        self,
        site_id: int,
        num_sites: int,
        *,
        partition: Partition = "dirichlet",
        alpha: float = 1.0,
        seed: int = 0,
    ) -> SiteData:
        """Return the training shard of one site.

        Every site computes the same split of ``train`` locally (it depends
        only on the arguments) and keeps its own part.

        Parameters
        ----------
        site_id
            This site's index in ``[0, num_sites)``.
        num_sites
            Number of sites in the federation.
        partition
            ``"dirichlet"``: label skew drawn with `dirichlet_label_partition`
            from ``numpy.random.default_rng(seed)``; ``"natural"``: whole
            values of ``natural_attribute`` per site (`attribute_partition`;
            ``alpha`` and ``seed`` are unused).
        alpha
            Dirichlet concentration (smaller means more label skew).
        seed
            Public seed of the split.

        Raises
        ------
        DatasetError
            For an unknown partition, a ``site_id`` out of range, or a split
            that the partitioner refuses.
        """
        if partition == "dirichlet":
            labels = self.train[self.schema.label].to_numpy()
            rng = np.random.default_rng(seed)
            shards = dirichlet_label_partition(labels, num_sites, alpha, rng)
        elif partition == "natural":
            shards = attribute_partition(self.train[self.natural_attribute].to_numpy(), num_sites)
        else:
            raise DatasetError(
                f"unknown partition {partition!r}; expected 'dirichlet' or 'natural'"
            )
        if not 0 <= site_id < num_sites:
            raise DatasetError(f"site_id must lie in [0, {num_sites}), got {site_id}")
        return self._encode(site_id, self.train.iloc[shards[site_id]])

    def test_data(self) -> SiteData:
        """Return the held-out test set, encoded, as site ``-1``."""
        return self._encode(TEST_SITE_ID, self.test)

    def _encode(self, site_id: int, rows: pd.DataFrame) -> SiteData:
        frame = rows.loc[:, list(self.schema.names)]
        labels = np.asarray(rows[self.schema.label].to_numpy(), dtype=np.int64)
        sensitive = {name: frame[name].to_numpy() for name in self.schema.sensitive}
        return SiteData(
            site_id=site_id,
            features=self.preprocessor.transform(frame),
            labels=labels,
            frame=frame,
            sensitive=MappingProxyType(sensitive),
        )
