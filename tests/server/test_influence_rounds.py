"""Influence rounds end to end over real gRPC: the federation releases the Hessian, the
coordinator hands it to the sites, and group influence comes back equal to the
centralised computation; stale factors and bad queries are refused before any spend."""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from client.explanation import ExplainRequest
from client.site import Site
from client.site_config import SiteConfig
from explain.influence import influence_on_predictions
from explain.second_order import SecondOrder, hessian_terms_sum, model_fingerprint
from fedlens.datasets import load_dataset
from fedlens.errors import ExplanationError
from fedlens.models import build_model
from fedlens.runconfig import RunConfig
from fedlens.types import RoundPhase, RoundStatus
from privacy import gaussian_noise_multiplier
from server.aggregation import Aggregator, QueryHandler
from server.grpc_server import RunningServer, serve
from server.influence_rounds import (
    correction_inputs,
    influence_params,
    run_influence,
    second_order_inputs,
    validation_inputs,
)
from server.round_specs import explanation_round_spec
from server.storage import Store
from tests.influence_models import fit_logistic_state

NOW = datetime(2026, 1, 1, tzinfo=UTC)
NAMES = ("site-0", "site-1", "site-2")
MU = 1.0


def _train_mlp(features: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    model = build_model("mlp", features.shape[1], seed=0)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    for _ in range(200):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).reshape(-1), y)
        loss.backward()
        optimiser.step()
    return model.state_dict()


class Federation:
    """Three real sites and a real aggregator; rounds driven as the ServerApp drives them."""

    def __init__(self, tmp: Path, run: RunConfig) -> None:
        self.run = run
        self.dataset = load_dataset(run.dataset, seed=run.seed)
        self.store = Store(f"sqlite:///{tmp / 'fedlens.db'}")
        self.aggregator = Aggregator(self.store)
        self.server: RunningServer = serve(self.aggregator, QueryHandler(self.store))
        self.run = run.model_copy(update={"aggregator": self.server.address})
        self.sites = [
            Site(
                self.run,
                SiteConfig.from_flower(
                    {
                        "partition-id": i,
                        "num-partitions": 3,
                        "state-dir": str(tmp / name),
                        "epsilon": 100.0,
                    }
                ),
            )
            for i, name in enumerate(NAMES)
        ]
        pre = self.dataset.preprocessor
        x = pre.transform(self.dataset.train).astype(np.float64)
        y = self.dataset.train[self.dataset.schema.label].to_numpy().astype(np.float64)
        self.state = fit_logistic_state(x, y, MU) if run.model == "logistic" else _train_mlp(x, y)
        self.model = build_model(run.model, pre.dimension)
        self.model.load_state_dict(self.state)
        self.opened: list[str] = []

    def explain_round(
        self, run: RunConfig, extra: Mapping[str, str], public: Mapping[str, np.ndarray]
    ) -> RoundStatus:
        spec = explanation_round_spec(
            run, self.dataset.preprocessor, NAMES, round_id=uuid.uuid4().hex, extra_params=extra
        )
        self.aggregator.open_round(spec)
        self.opened.append(spec.kind)
        request = ExplainRequest(
            round_id=spec.round_id,
            kind=spec.kind,
            site_ids=NAMES,
            aggregator=self.run.aggregator,
            epsilon=run.explain_epsilon,
            delta=run.explain_delta,
            clip_bound=spec.clip_bound,
            bits=spec.bits,
            scale=spec.scale,
            timeout_s=20.0,
            params=dict(spec.params),
            public=dict(public),
        )
        errors: dict[str, Exception] = {}

        def work(site: Site) -> None:
            try:
                site.explain(request, self.state, now=NOW)
            except Exception as exc:  # asserted on by the tests
                errors[site.name] = exc

        threads = [threading.Thread(target=work, args=(s,)) for s in self.sites]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.errors = errors
        return self.aggregator.status(spec.round_id)

    def influence(self) -> list[RoundStatus]:
        return run_influence(self.run, self.dataset, self.model, NAMES, [], self.explain_round)

    def spent(self) -> list[int]:
        return [len(site.ledger()[0].history()) for site in self.sites]


def _federation(tmp: Path) -> Federation:
    run = RunConfig.model_validate(
        {
            "dataset": "breast_cancer",
            "model": "logistic",
            "num-sites": 3,
            "explain-kind": "group_influence",
            "explain-epsilon": 30.0,
            "influence-clip": 1000.0,
            "influence-damping": MU / 455,
        }
    )
    return Federation(tmp, run)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = _federation(tmp_path)
    yield fed
    fed.server.stop(grace=None)


@pytest.fixture(scope="module")
def released(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Federation, list[RoundStatus]]]:
    """One federation that has run the Hessian round and the group influence round."""
    fed = _federation(tmp_path_factory.mktemp("released"))
    yield fed, fed.influence()
    fed.server.stop(grace=None)


def test_group_influence_through_a_released_hessian_matches_the_central_one(
    released: tuple[Federation, list[RoundStatus]],
) -> None:
    federation, statuses = released
    assert [s.phase for s in statuses] == [RoundPhase.COMPLETE, RoundPhase.COMPLETE], (
        statuses,
        federation.errors,
    )
    assert federation.opened == ["hessian", "group_influence"]
    factors = federation.store.get_release(statuses[0].release_id)
    assert factors.params["model_fingerprint"] == model_fingerprint(federation.model)
    release = federation.store.get_release(statuses[1].release_id)
    assert release.params["second_order_release"] == factors.release_id

    # The same computation on the pooled records, with the released (noised) factors.
    inputs = second_order_inputs(factors, federation.model, MU / 455)
    count = float(inputs.params["second_order_count"])
    second = SecondOrder.from_packed(
        federation.model, "hessian", inputs.arrays["second_order"] * count, count, MU / 455
    )
    query = np.asarray(json.loads(release.params["query"]))[None, :]
    by_label = {0: 0.0, 1: 0.0}
    for site in federation.sites:
        data = site.data()
        x = data.features.astype(np.float64)
        scores = influence_on_predictions(federation.model, second, x, data.labels, query)[:, 0]
        for label in (0, 1):
            by_label[label] += float(scores[data.labels == label].sum())
    values = {v.name: v for v in release.values}
    for label in (0, 1):
        got = values[f"label={label}/influence"]
        assert abs(got.value - by_label[label]) <= 5 * got.noise_std + 1e-9, (label, got)
    assert values["label=0/count"].value + values["label=1/count"].value == pytest.approx(
        sum(site.data().size for site in federation.sites), rel=0.05
    )


def test_the_released_hessian_matches_the_pooled_one(
    released: tuple[Federation, list[RoundStatus]],
) -> None:
    federation, statuses = released
    factors = federation.store.get_release(statuses[0].release_id)
    inputs = second_order_inputs(factors, federation.model, 1e-3)
    x = np.concatenate([s.data().features for s in federation.sites]).astype(np.float64)
    clip = federation.run.second_order_clip
    packed, n = hessian_terms_sum(federation.model, x, clip)
    noise = factors.values[0].noise_std
    assert factors.noised_count == pytest.approx(n, rel=0.05)
    assert np.max(np.abs(inputs.arrays["second_order"] - packed / n)) <= 6 * noise


def test_stale_factors_are_refused_by_coordinator_and_sites_before_any_spend(
    released: tuple[Federation, list[RoundStatus]],
) -> None:
    federation, statuses = released
    factors = federation.store.get_release(statuses[0].release_id)
    spent = federation.spent()
    other = build_model("logistic", federation.dataset.preprocessor.dimension, seed=7)
    with pytest.raises(ExplanationError, match="stale"):
        second_order_inputs(factors, other, 1e-3)
    # A request that names factors of another model: every site declines, nobody spends.
    inputs = second_order_inputs(factors, federation.model, 1e-3)
    stale = {**inputs.params, "second_order_fingerprint": model_fingerprint(other)}
    params = influence_params(federation.run, federation.dataset, NAMES) | stale
    status = federation.explain_round(federation.run, params, inputs.arrays)
    assert status.phase is RoundPhase.ABORTED
    assert all("stale" in str(e) for e in federation.errors.values()), federation.errors
    assert federation.spent() == spent


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"influence_query": '{"mean radius": 14.0}'}, "lacks the features"),
        ({"influence_query": '{"bogus": 1}'}, "unknown features"),
        ({"influence_query": "[1, 2]"}, "JSON object"),
        ({"influence_group_by": "shoe size"}, "not a feature"),
    ],
)
def test_bad_requests_are_refused_before_any_site_is_asked(
    federation: Federation, update: dict[str, str], message: str
) -> None:
    federation.run = federation.run.model_copy(update=update)
    statuses = federation.influence()
    assert statuses[-1].phase is RoundPhase.ABORTED
    assert message in statuses[-1].reason
    # Not even the Hessian round was opened: nobody spent anything.
    assert federation.opened == []
    assert federation.spent() == [0, 0, 0]


def test_ekfac_runs_kfac_then_corrections_then_influence(tmp_path: Path) -> None:
    run = RunConfig.model_validate(
        {
            "dataset": "breast_cancer",
            "model": "mlp",
            "num-sites": 3,
            "explain-kind": "group_influence",
            "explain-epsilon": 30.0,
            "influence-method": "ekfac",
            "influence-clip": 1000.0,
        }
    )
    assert run.releases == 3
    fed = Federation(tmp_path, run)
    try:
        statuses = fed.influence()
    finally:
        fed.server.stop(grace=None)
    assert [s.phase for s in statuses] == [RoundPhase.COMPLETE] * 3, statuses
    assert fed.opened == ["kfac", "ekfac", "group_influence"]
    kfac, ekfac, release = (fed.store.get_release(s.release_id) for s in statuses)
    assert release.params["method"] == "ekfac"
    assert release.params["second_order_release"] == kfac.release_id
    assert release.params["ekfac_release"] == ekfac.release_id
    # The pooled computation with the same released factors and corrections.
    inputs = correction_inputs(
        second_order_inputs(kfac, fed.model, run.influence_damping), ekfac, fed.model
    )
    count = float(inputs.params["second_order_count"])
    second = SecondOrder.from_packed(
        fed.model, "kfac", inputs.arrays["second_order"] * count, count, run.influence_damping
    ).corrected(inputs.arrays["ekfac"])
    query = np.asarray(json.loads(release.params["query"]))[None, :]
    total = 0.0
    for site in fed.sites:
        data = site.data()
        x = data.features.astype(np.float64)
        total += float(influence_on_predictions(fed.model, second, x, data.labels, query).sum())
    values = {v.name: v for v in release.values}
    got = values["label=0/influence"].value + values["label=1/influence"].value
    std = np.hypot(values["label=0/influence"].noise_std, values["label=1/influence"].noise_std)
    assert abs(got - total) <= 5 * std + 1e-9, (got, total, std)


@pytest.mark.parametrize(
    "kind", ["influence_prototypes", "self_influence", "site_contribution", "loo_unfairness"]
)
def test_every_influence_kind_completes_with_the_released_factors(
    released: tuple[Federation, list[RoundStatus]], kind: str
) -> None:
    federation, statuses = released
    factors = federation.store.get_release(statuses[0].release_id)
    inputs = second_order_inputs(factors, federation.model, MU / 455)
    # ε = 5 each: the sites' budgets (100) already paid for two releases at ε = 30.
    run = federation.run.model_copy(
        update={"explain_kind": kind, "influence_k": 5, "explain_epsilon": 5.0}
    )
    params = influence_params(run, federation.dataset, NAMES) | inputs.params
    arrays = dict(inputs.arrays)
    if kind == "site_contribution":
        arrays |= validation_inputs(federation.model, federation.dataset)
    status = federation.explain_round(run, params, arrays)
    assert status.phase is RoundPhase.COMPLETE, (status, federation.errors)
    release = federation.store.get_release(status.release_id)
    assert release.kind == kind
    assert release.params["second_order_release"] == factors.release_id
    values = {v.name: v for v in release.values}
    if kind == "influence_prototypes":
        # Averages of encoded columns, each in [0, 1]; 5 records per set at each site.
        # Three sites' local noise on the count coordinate, in records: sqrt(3 * 2) * z.
        count_std = math.sqrt(6) * gaussian_noise_multiplier(5.0, run.explain_delta)
        assert release.noised_count == pytest.approx(15, abs=5 * count_std)
        assert all(0.0 <= v.value <= 1.0 for v in release.values)
    elif kind == "self_influence":
        total = sum(v.value for v in release.values)
        assert total == pytest.approx(release.noised_count, rel=0.1)
    elif kind == "site_contribution":
        # No site's policy allows a breakdown: everything lands in "(withheld)".
        assert abs(values["(withheld)/count"].value - release.noised_count) <= 5 * (
            values["(withheld)/count"].noise_std
        )
        assert all(
            abs(values[f"{s}/count"].value) <= 5 * values[f"{s}/count"].noise_std for s in NAMES
        )
    else:
        histogram = [v for v in release.values if v.name.startswith("change in")]
        assert sum(v.value for v in histogram) == pytest.approx(release.noised_count, rel=0.1)
