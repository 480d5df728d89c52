"""Tests of the dataset registry, the shipped datasets and per-site shards."""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

import fedlens.datasets as datasets
from fedlens.datasets import Dataset, available_datasets, load_dataset, register_dataset
from fedlens.datasets import registry as registry_module
from fedlens.datasets.synthetic import make_synthetic_hospitals
from fedlens.errors import DatasetError


def test_public_surface() -> None:
    assert sorted(datasets.__all__) == [
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


def test_registry_names_and_errors() -> None:
    assert available_datasets() == ("adult", "breast_cancer", "synthetic_hospitals")
    with pytest.raises(DatasetError, match=r"'mnist'.*adult, breast_cancer, synthetic_hospitals"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="already registered"):
        register_dataset("adult")(lambda seed: load_dataset("breast_cancer", seed=seed))


def test_register_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_LOADERS", dict(registry_module._LOADERS))
    calls: list[int] = []

    @register_dataset("tiny_for_test")
    def load(seed: int) -> Dataset:
        calls.append(seed)
        return load_dataset("breast_cancer", seed=seed)

    assert "tiny_for_test" in available_datasets()
    assert load_dataset("tiny_for_test", seed=3) is load_dataset("tiny_for_test", seed=3)
    assert calls == [3]
    registry_module._load_cached.cache_clear()


# --- adult -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "digest"),
    [
        ("adult.data.gz", "5d7c39d7b8804f071cdd1f2a7c460872"),
        ("adult.test.gz", "35238206dfdf7f1fe215bbb874adecdc"),
    ],
)
def test_shipped_adult_files_are_the_originals(filename: str, digest: str) -> None:
    path = resources.files("fedlens.datasets") / "data" / filename
    with path.open("rb") as raw:
        content = gzip.decompress(raw.read())
    assert hashlib.md5(content).hexdigest() == digest
    assert (resources.files("fedlens.datasets") / "data" / "ATTRIBUTION.md").is_file()


def test_adult_rows_and_labels() -> None:
    adult = load_dataset("adult")
    assert (len(adult.train), len(adult.test)) == (32_561, 16_281)
    assert adult.schema.classes == ("<=50K", ">50K")
    assert adult.schema.sensitive == ("race", "sex")
    assert set(adult.schema.immutable) == {"age", "race", "sex"}
    assert "fnlwgt" not in adult.train.columns
    assert "education" not in adult.train.columns
    for frame in (adult.train, adult.test):
        assert frame["income"].dtype == np.int64
        assert set(frame["income"].unique()) == {0, 1}
    assert int(adult.train["income"].sum()) == 7_841
    assert adult.train["income"].mean() == pytest.approx(0.24, abs=0.005)
    # The test file spells its labels ">50K." / "<=50K.": all must be parsed.
    assert int(adult.test["income"].sum()) == 3_846
    assert adult.train.iloc[0]["workclass"] == "State-gov"
    assert adult.test.iloc[0]["age"] == 25


def test_adult_categories_cover_every_observed_value() -> None:
    adult = load_dataset("adult")
    for spec in adult.schema.features:
        if spec.kind == "categorical":
            for frame in (adult.train, adult.test):
                observed = set(frame[spec.name].dropna())
                assert observed <= set(spec.categories), spec.name
        else:
            for frame in (adult.train, adult.test):
                assert frame[spec.name].between(spec.low, spec.high).all(), spec.name


def test_adult_missing_values_encode_as_zeros() -> None:
    adult = load_dataset("adult")
    encoded = adult.preprocessor.transform(adult.train)
    workclass = list(adult.preprocessor.groups["workclass"])
    empty = encoded[:, workclass].sum(axis=1) == 0
    assert int(empty.sum()) == int(adult.train["workclass"].isna().sum()) == 1_836
    assert np.all((encoded >= 0.0) & (encoded <= 1.0))
    for name, columns in adult.preprocessor.groups.items():
        if adult.schema.feature(name).kind == "categorical":
            assert np.all(encoded[:, list(columns)].sum(axis=1) <= 1.0)


def test_adult_natural_partition_by_workclass() -> None:
    adult = load_dataset("adult")
    assert adult.natural_attribute == "workclass"
    shards = [adult.site(i, 4, partition="natural") for i in range(4)]
    assert [s.size for s in shards] == [22_696, 3_501, 3_209, 3_155]
    assert set(shards[0].frame["workclass"]) == {"Private"}


def test_site_encoding_matches_full_table_encoding() -> None:
    adult = load_dataset("adult")
    full = adult.preprocessor.transform(adult.train)
    labels = adult.train["income"].to_numpy()
    seen: list[np.ndarray] = []
    for site_id in range(3):
        site = adult.site(site_id, 3, alpha=0.5, seed=7)
        rows = site.frame.index.to_numpy()
        assert site.site_id == site_id
        assert site.features.dtype == np.float32 and site.labels.dtype == np.int64
        assert site.features.shape == (site.size, adult.preprocessor.dimension)
        np.testing.assert_array_equal(site.features, full[rows])
        np.testing.assert_array_equal(site.labels, labels[rows])
        assert list(site.frame.columns) == list(adult.schema.names)
        for name in ("sex", "race"):
            np.testing.assert_array_equal(site.sensitive[name], adult.train[name].to_numpy()[rows])
        seen.append(rows)
    joined = np.concatenate(seen)
    assert len(joined) == len(set(joined.tolist())) == len(adult.train)


def test_every_site_computes_the_same_split() -> None:
    adult = load_dataset("adult")
    first = adult.site(1, 4, alpha=0.3, seed=11)
    again = adult.site(1, 4, alpha=0.3, seed=11)
    other_seed = adult.site(1, 4, alpha=0.3, seed=12)
    np.testing.assert_array_equal(first.frame.index, again.frame.index)
    assert not np.array_equal(first.frame.index, other_seed.frame.index)


def test_test_data_is_site_minus_one() -> None:
    adult = load_dataset("adult")
    held_out = adult.test_data()
    assert held_out.site_id == -1
    assert held_out.size == 16_281
    np.testing.assert_array_equal(held_out.labels, adult.test["income"].to_numpy())


def test_bad_site_requests() -> None:
    adult = load_dataset("adult")
    with pytest.raises(DatasetError, match="site_id"):
        adult.site(4, 4)
    with pytest.raises(DatasetError, match="site_id"):
        adult.site(-1, 4)
    with pytest.raises(DatasetError, match="'random'"):
        adult.site(0, 4, partition="random")  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="distinct values"):
        adult.site(0, 10, partition="natural")


def test_dataset_checks_its_columns() -> None:
    adult = load_dataset("adult")
    with pytest.raises(DatasetError, match="test lacks columns sex"):
        Dataset("broken", adult.schema, adult.train, adult.test.drop(columns=["sex"]), "race")
    with pytest.raises(DatasetError, match="'hospital'"):
        Dataset("broken", adult.schema, adult.train, adult.test, "hospital")


def test_unknown_column_in_a_site_frame_is_named() -> None:
    adult = load_dataset("adult")
    with pytest.raises(DatasetError, match="hours-per-week"):
        adult.preprocessor.transform(adult.test.drop(columns=["hours-per-week"]))


# --- breast cancer -----------------------------------------------------------


def test_breast_cancer_split() -> None:
    bc = load_dataset("breast_cancer")
    assert (len(bc.train), len(bc.test)) == (456, 113)
    assert bc.schema.classes == ("benign", "malignant")
    assert bc.schema.label == "diagnosis"
    malignant = int(bc.train["diagnosis"].sum() + bc.test["diagnosis"].sum())
    assert malignant == 212
    assert bc.test["diagnosis"].mean() == pytest.approx(212 / 569, abs=0.01)
    same = load_dataset("breast_cancer", seed=0)
    other = load_dataset("breast_cancer", seed=1)
    pd.testing.assert_frame_equal(bc.test, same.test)
    assert not bc.test.equals(other.test)
    encoded = bc.test_data().features
    assert encoded.shape == (113, 30)
    assert np.all((encoded >= 0.0) & (encoded <= 1.0))


def test_breast_cancer_natural_partition_by_texture_band() -> None:
    bc = load_dataset("breast_cancer")
    assert bc.natural_attribute == "texture_band"
    assert "texture_band" not in bc.schema.names
    shards = [bc.site(i, 4, partition="natural") for i in range(4)]
    sizes = [s.size for s in shards]
    assert sum(sizes) == 456
    assert min(sizes) >= 80
    bands = [set(bc.train.loc[s.frame.index, "texture_band"]) for s in shards]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not bands[a] & bands[b]


# --- synthetic hospitals -----------------------------------------------------


def test_synthetic_truth_is_consistent() -> None:
    data = load_dataset("synthetic_hospitals")
    truth = data.truth
    assert truth is not None
    train = data.train
    assert (len(train), len(data.test)) == (6_000, 2_000)
    assert set(truth.informative).isdisjoint(truth.irrelevant)
    assert all(truth.weights[name] != 0.0 for name in truth.informative)
    assert all(truth.weights[name] == 0.0 for name in truth.irrelevant)
    assert truth.sensitive_attribute in data.schema.sensitive
    assert "hospital" not in data.schema.names

    flipped = truth.flipped_indices
    assert not flipped.flags.writeable
    assert set(train.loc[flipped, "hospital"]) == {truth.flipped_site}
    assert len(flipped) == pytest.approx(0.25 * 1_500, abs=1)
    assert set(truth.biased_indices.tolist()).isdisjoint(flipped.tolist())
    biased = train.loc[truth.biased_indices]
    assert set(biased["group"]) == {truth.biased_group}
    assert set(biased["outcome"]) == {0}


def test_synthetic_natural_sites_are_hospitals() -> None:
    data = load_dataset("synthetic_hospitals")
    for site_id in range(4):
        site = data.site(site_id, 4, partition="natural")
        assert site.size == 1_500
        assert set(data.train.loc[site.frame.index, "hospital"]) == {site_id}


def test_synthetic_marker_is_spurious_at_one_hospital_only() -> None:
    data = load_dataset("synthetic_hospitals")
    assert data.truth is not None
    spurious = data.truth.spurious_site
    for frame, planted in ((data.train, True), (data.test, False)):
        for hospital in range(4):
            rows = frame[frame["hospital"] == hospital]
            corr = np.corrcoef(rows["marker"], rows["outcome"])[0, 1]
            if planted and hospital == spurious:
                assert corr > 0.8
            else:
                assert abs(corr) < 0.1


def test_synthetic_group_bias_is_in_train_only() -> None:
    data = load_dataset("synthetic_hospitals")

    def gap(frame: pd.DataFrame) -> float:
        rates = frame.groupby("group")["outcome"].mean()
        return float(rates["A"] - rates["B"])

    assert gap(data.train) > 0.15
    assert abs(gap(data.test)) < 0.08


def test_clean_test_set_recovers_informative_features() -> None:
    data = load_dataset("synthetic_hospitals")
    assert data.truth is not None
    held_out = data.test_data()
    model = LogisticRegression(max_iter=1_000).fit(held_out.features, held_out.labels)
    names = data.preprocessor.encoded_names
    weight = dict(zip(names, np.abs(model.coef_[0]), strict=True))
    smallest_informative = min(weight[name] for name in data.truth.informative)
    largest_irrelevant = max(weight[name] for name in data.truth.irrelevant)
    assert smallest_informative > 3 * largest_irrelevant
    signs = [np.sign(data.truth.weights[name]) for name in data.truth.informative]
    fitted = [np.sign(model.coef_[0][names.index(name)]) for name in data.truth.informative]
    assert signs == fitted


def test_synthetic_generation_depends_only_on_the_seed() -> None:
    a = load_dataset("synthetic_hospitals", seed=5)
    b = make_synthetic_hospitals(np.random.default_rng(5))
    pd.testing.assert_frame_equal(a.train, b.train)
    assert a.truth is not None and b.truth is not None
    np.testing.assert_array_equal(a.truth.flipped_indices, b.truth.flipped_indices)
    c = load_dataset("synthetic_hospitals", seed=6)
    assert not a.train.equals(c.train)
