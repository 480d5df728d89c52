"""``fedlens client review``: a site's planted flipped labels come first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from client.review import Review, review_site
from client.site import Site
from client.site_config import SiteConfig
from client.site_state import remember_factors, remember_model
from explain.second_order import hessian_terms_sum, model_fingerprint
from fedlens.cli import main
from fedlens.datasets import Dataset, load_dataset, register_dataset
from fedlens.datasets import registry as registry_module
from fedlens.errors import ConfigurationError
from fedlens.runconfig import RunConfig
from tests.influence_models import fit_logistic_state

RUN = RunConfig.model_validate(
    {"dataset": "synthetic_hospitals", "model": "logistic", "partition": "natural"}
)
PLANTED = "breast_cancer_planted_flips"
FLIPPED_SITE = 0
MU = 1.0


def _planted(seed: int = 0) -> Dataset:
    """``breast_cancer`` split into four sites by a column, 10 % of site 0's labels flipped."""
    base = load_dataset("breast_cancer", seed=seed)
    train = base.train.copy()
    rng = np.random.default_rng(seed)
    train["site"] = np.arange(len(train)) % 4
    at_site = np.flatnonzero(train["site"].to_numpy() == FLIPPED_SITE)
    flipped = rng.choice(at_site, size=round(0.1 * at_site.size), replace=False)
    label = base.schema.label
    train.loc[flipped, label] = 1 - train.loc[flipped, label]
    train.attrs["flipped"] = np.sort(flipped)
    return Dataset(PLANTED, base.schema, train, base.test, natural_attribute="site")


World = tuple[RunConfig, dict[str, torch.Tensor], np.ndarray, int]


def _world(run: RunConfig) -> World:
    dataset = load_dataset(run.dataset, seed=run.seed)
    x = dataset.preprocessor.transform(dataset.train).astype(np.float64)
    y = dataset.train[dataset.schema.label].to_numpy().astype(np.float64)
    if dataset.truth is not None:
        return (
            run,
            fit_logistic_state(x, y, MU),
            dataset.truth.flipped_indices,
            dataset.truth.flipped_site,
        )
    return run, fit_logistic_state(x, y, MU), dataset.train.attrs["flipped"], FLIPPED_SITE


@pytest.fixture(scope="module")
def planted() -> Iterator[World]:
    # Registered for this module only, so the registry's own tests see the shipped names.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry_module, "_LOADERS", dict(registry_module._LOADERS))
        register_dataset(PLANTED)(_planted)
        yield _world(RUN.model_copy(update={"dataset": PLANTED}))
    registry_module._load_cached.cache_clear()


@pytest.fixture(scope="module")
def hospitals() -> World:
    return _world(RUN)


def _site(tmp: Path, run: RunConfig, partition: int) -> Site:
    node = {"partition-id": partition, "num-partitions": 4, "state-dir": str(tmp)}
    return Site(run, SiteConfig.from_flower(node))


def _listed(review: Review) -> np.ndarray:
    return np.array([row["row"] for row in review.rows])


def test_review_lists_the_planted_flipped_labels_first(tmp_path: Path, planted: World) -> None:
    run, state, flipped, site_id = planted
    site = _site(tmp_path, run, site_id)
    remember_model(tmp_path, state)
    m = flipped.size
    review = review_site(tmp_path, top=m)
    assert review.curvature == "local" and review.method == "hessian"
    assert review.records == site.data().size
    hits = np.isin(_listed(review), flipped)
    # The first half of the m records listed (m = the number of flips) are all planted
    # flips, and at least 80 % of all m are.
    assert hits[: m // 2].all(), _listed(review)
    assert hits.mean() >= 0.8, hits.mean()
    scores = [r.self_influence for r in review.ranked]
    assert scores == sorted(scores, reverse=True)


def test_review_finds_noisy_flips_far_above_their_base_rate(
    tmp_path: Path, hospitals: World
) -> None:
    """synthetic_hospitals flips 25 % of one site's labels at random, on a noisy task:
    many flips are not detectable, but the top of the list is mostly flips."""
    run, state, flipped, site_id = hospitals
    _site(tmp_path, run, site_id)
    remember_model(tmp_path, state)
    review = review_site(tmp_path, top=20)
    assert np.isin(_listed(review), flipped).mean() >= 0.6  # base rate 0.25


def test_review_uses_released_factors_of_the_current_model_only(
    tmp_path: Path, planted: World
) -> None:
    run, state, flipped, site_id = planted
    site = _site(tmp_path, run, site_id)
    remember_model(tmp_path, state)
    data = site.data()
    model = site.model(data.features.shape[1], state)
    packed, n = hessian_terms_sum(model, data.features.astype(np.float64))
    params = {
        "method": "hessian",
        "second_order_fingerprint": model_fingerprint(model),
        "second_order_count": str(float(n)),
        "damping": "0.001",
    }
    remember_factors(tmp_path, params, {"second_order": packed / n})
    review = review_site(tmp_path, top=5)
    assert review.curvature == "released"
    assert np.isin(_listed(review), flipped).all()
    # Factors of another model are stale: the site falls back to its own curvature.
    stale = {**params, "second_order_fingerprint": "0" * 16}
    remember_factors(tmp_path, stale, {"second_order": packed / n})
    assert review_site(tmp_path, top=5).curvature == "local"


def test_cli_review_json_and_table(
    tmp_path: Path, planted: World, capsys: pytest.CaptureFixture[str]
) -> None:
    run, state, flipped, site_id = planted
    _site(tmp_path, run, site_id)
    remember_model(tmp_path, state)
    assert main(["client", "review", "--state-dir", str(tmp_path), "--top", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in out["ranked"]] == [1, 2, 3]
    assert all(r["record"]["row"] in set(flipped.tolist()) for r in out["ranked"])
    assert main(["client", "review", "--state-dir", str(tmp_path), "--top", "3"]) == 0
    assert "self-influence" in capsys.readouterr().out


def test_review_refuses_a_directory_without_a_site_or_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not taken part in a run"):
        review_site(tmp_path / "empty")
    _site(tmp_path, RUN, 0)
    with pytest.raises(ConfigurationError, match="no global model"):
        review_site(tmp_path)
    with pytest.raises(ConfigurationError, match="top must be >= 1"):
        review_site(tmp_path, top=0)
