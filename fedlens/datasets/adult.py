"""UCI Adult (census income, 1994), shipped with the package.

Source: Becker & Kohavi (1996), UCI Machine Learning Repository,
https://doi.org/10.24432/C5XW20, CC BY 4.0 (see ``data/ATTRIBUTION.md``).
Category lists and numeric ranges below are the public metadata of
``data/adult.names`` and the documented value ranges; nothing is learnt from rows.

``fnlwgt`` (a survey sampling weight) and ``education`` (the same information
as ``education-num``) are dropped. The natural attribute is ``workclass``:
with four sites it yields shards of 22,696 (Private), 3,501, 3,209 and 3,155
training rows, whereas ``race`` would leave two sites with 1,039 and 582 rows.
Missing workclass (``?``) is a partition value of its own.
"""

from __future__ import annotations

import gzip
from importlib import resources

import pandas as pd

from fedlens.datasets.dataset import Dataset
from fedlens.datasets.registry import register_dataset
from fedlens.datasets.schema import FeatureSpec, Schema
from fedlens.errors import DatasetError

__all__ = ["ADULT_COLUMNS", "ADULT_SCHEMA", "load_adult"]

ADULT_COLUMNS = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)

_WORKCLASS = (
    "Private",
    "Self-emp-not-inc",
    "Self-emp-inc",
    "Federal-gov",
    "Local-gov",
    "State-gov",
    "Without-pay",
    "Never-worked",
)
_MARITAL_STATUS = (
    "Married-civ-spouse",
    "Divorced",
    "Never-married",
    "Separated",
    "Widowed",
    "Married-spouse-absent",
    "Married-AF-spouse",
)
_OCCUPATION = (
    "Tech-support",
    "Craft-repair",
    "Other-service",
    "Sales",
    "Exec-managerial",
    "Prof-specialty",
    "Handlers-cleaners",
    "Machine-op-inspct",
    "Adm-clerical",
    "Farming-fishing",
    "Transport-moving",
    "Priv-house-serv",
    "Protective-serv",
    "Armed-Forces",
)
_RELATIONSHIP = ("Wife", "Own-child", "Husband", "Not-in-family", "Other-relative", "Unmarried")
_RACE = ("White", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other", "Black")
_SEX = ("Female", "Male")
_NATIVE_COUNTRY = (
    "United-States",
    "Cambodia",
    "England",
    "Puerto-Rico",
    "Canada",
    "Germany",
    "Outlying-US(Guam-USVI-etc)",
    "India",
    "Japan",
    "Greece",
    "South",
    "China",
    "Cuba",
    "Iran",
    "Honduras",
    "Philippines",
    "Italy",
    "Poland",
    "Jamaica",
    "Vietnam",
    "Mexico",
    "Portugal",
    "Ireland",
    "France",
    "Dominican-Republic",
    "Laos",
    "Ecuador",
    "Taiwan",
    "Haiti",
    "Columbia",
    "Hungary",
    "Guatemala",
    "Nicaragua",
    "Scotland",
    "Thailand",
    "Yugoslavia",
    "El-Salvador",
    "Trinadad&Tobago",
    "Peru",
    "Hong",
    "Holand-Netherlands",
)

ADULT_SCHEMA = Schema(
    features=(
        # The extract kept people older than 16; 90 is the top-coded age.
        FeatureSpec("age", "numeric", low=17.0, high=90.0, immutable=True),
        FeatureSpec("workclass", "categorical", categories=_WORKCLASS),
        FeatureSpec("education-num", "numeric", low=1.0, high=16.0),
        FeatureSpec("marital-status", "categorical", categories=_MARITAL_STATUS),
        FeatureSpec("occupation", "categorical", categories=_OCCUPATION),
        FeatureSpec("relationship", "categorical", categories=_RELATIONSHIP),
        FeatureSpec("race", "categorical", categories=_RACE, sensitive=True, immutable=True),
        FeatureSpec("sex", "categorical", categories=_SEX, sensitive=True, immutable=True),
        # 99999 is the census top code for capital gains.
        FeatureSpec("capital-gain", "numeric", low=0.0, high=99999.0, log=True),
        FeatureSpec("capital-loss", "numeric", low=0.0, high=4356.0, log=True),
        FeatureSpec("hours-per-week", "numeric", low=1.0, high=99.0),
        FeatureSpec("native-country", "categorical", categories=_NATIVE_COUNTRY),
    ),
    label="income",
    classes=("<=50K", ">50K"),
)

_DROPPED = ("fnlwgt", "education")


def _read(filename: str, *, skip_first_line: bool) -> pd.DataFrame:
    """Parse one shipped UCI file into schema columns plus an int 0/1 ``income``."""
    path = resources.files("fedlens.datasets") / "data" / filename
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="ascii") as text:
        frame = pd.read_csv(
            text,
            header=None,
            names=list(ADULT_COLUMNS),
            sep=",",
            skipinitialspace=True,
            skiprows=1 if skip_first_line else 0,
            na_values=["?"],
            keep_default_na=False,
        )
    # The test file writes its labels with a trailing full stop (">50K.").
    income = frame["income"].str.rstrip(".")
    unexpected = sorted(set(income.dropna()) - set(ADULT_SCHEMA.classes))
    if unexpected or income.isna().any():
        raise DatasetError(f"{filename}: unexpected income labels {unexpected}")
    frame["income"] = (income == ADULT_SCHEMA.classes[1]).astype("int64")
    return frame.drop(columns=list(_DROPPED)).reset_index(drop=True)


@register_dataset("adult")
def load_adult(seed: int = 0) -> Dataset:
    """Load UCI Adult with its original train/test split (``seed`` is unused).

    Returns
    -------
    Dataset
        32,561 training and 16,281 test rows; label ``income`` with
        ``>50K`` as class 1; ``sex`` and ``race`` sensitive.
    """
    del seed  # The split is the published one.
    return Dataset(
        name="adult",
        schema=ADULT_SCHEMA,
        train=_read("adult.data.gz", skip_first_line=False),
        test=_read("adult.test.gz", skip_first_line=True),
        natural_attribute="workclass",
    )
