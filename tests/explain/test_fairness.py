"""``fairness``: exact without noise (against fairlearn), honest intervals, the planted bias."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fairlearn.metrics import (
    MetricFrame,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score

from explain import FairnessLayout, fairness_release, get_kind, integrated_gradients, l2_sensitivity
from explain.fairness import interval
from fedlens.datasets import Preprocessor, SiteData, load_dataset
from fedlens.datasets.synthetic import SYNTHETIC_WEIGHTS
from fedlens.errors import ConfigurationError
from fedlens.runconfig import RunConfig
from fedlens.types import ReleasedValue
from privacy import SeededRandom, gaussian_noise_multiplier
from server.round_specs import explanation_round_spec

KIND = get_kind("fairness")
GROUP = {"group": ["A", "B"]}
ADULT = {
    "sex": ["Female", "Male"],
    "race": ["White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other"],
}


def params_of(sensitive: Mapping[str, list[str]], **extra: str) -> dict[str, str]:
    return {"sensitive": json.dumps(sensitive), **extra}


def linear(weights: np.ndarray, bias: float) -> torch.nn.Linear:
    model = torch.nn.Linear(weights.shape[0], 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weights, dtype=torch.float32)[None, :])
        model.bias.fill_(bias)
    return model


def oracle(pre: Preprocessor, extra: Mapping[str, float] | None = None) -> torch.nn.Linear:
    """synthetic_hospitals' true logistic model in encoded units (x = 8 e - 4): group-blind."""
    w = np.zeros(pre.dimension)
    for name, weight in SYNTHETIC_WEIGHTS.items():
        w[pre.encoded_names.index(name)] = 8.0 * weight
    for name, weight in (extra or {}).items():
        w[pre.encoded_names.index(name)] = weight
    return linear(w, -4.0 * sum(SYNTHETIC_WEIGHTS.values()))


def pooled_sum(
    model: torch.nn.Module, sites: list[SiteData], params: Mapping[str, str], clip: float
) -> tuple[np.ndarray, tuple[str, ...]]:
    parts = [KIND.contribute(model, s.features, s.labels, params, clip, s.sensitive) for s in sites]
    return np.sum([p.vector for p in parts], axis=0), parts[0].labels


def by_name(values: tuple[ReleasedValue, ...]) -> dict[str, ReleasedValue]:
    return {v.name: v for v in values}


# -- exactness without noise, against fairlearn -----------------------------------------------


def test_without_noise_rates_and_gaps_are_fairlearns_on_the_pooled_data() -> None:
    ds = load_dataset("adult")
    sites = [ds.site(i, 3, seed=0) for i in range(3)]
    fit = LogisticRegression(max_iter=300).fit(sites[0].features, sites[0].labels)
    model = linear(fit.coef_[0], float(fit.intercept_[0]))
    params = params_of(ADULT, min_group_size="30", attribution="false")
    vector, labels = pooled_sum(model, sites, params, 2.0)
    released = by_name(KIND.postprocess(vector, 0.0, 2.0, labels, params).values)

    x = np.concatenate([s.features for s in sites])
    y = np.concatenate([s.labels for s in sites])
    pred = (model(torch.tensor(x)).detach().numpy()[:, 0] > 0).astype(np.int64)
    frame = pd.DataFrame({k: np.concatenate([s.sensitive[k] for s in sites]) for k in ADULT})
    metrics = {
        "accuracy": accuracy_score,
        "selection_rate": selection_rate,
        "tpr": true_positive_rate,
        "fpr": false_positive_rate,
    }
    gaps = {
        "accuracy": "accuracy",
        "selection_rate": "demographic_parity",
        "tpr": "equalised_odds_tpr",
        "fpr": "equalised_odds_fpr",
    }
    checked = 0
    for partition, columns in (("sex", ["sex"]), ("race", ["race"]), ("sex&race", ["sex", "race"])):
        keys = frame[columns].astype(str).agg("&".join, axis=1)
        names = ("&" + columns[0] + "=" + frame[columns[0]].astype(str)).str[1:]
        for c in columns[1:]:
            names = names + "&" + c + "=" + frame[c].astype(str)
        mf = MetricFrame(metrics=metrics, y_true=y, y_pred=pred, sensitive_features=keys)
        size = keys.value_counts()
        positives = pd.Series(y).groupby(keys.to_numpy()).sum()
        name_of = dict(zip(keys, names, strict=True))
        eo = []
        for metric, gap in gaps.items():
            eligible = [
                k
                for k in mf.by_group.index
                if size[k] >= 30
                and (metric != "tpr" or positives[k] >= 30)
                and (metric != "fpr" or size[k] - positives[k] >= 30)
            ]
            for k in mf.by_group.index:
                name = f"{name_of[k]}:{metric}"
                if k in eligible:
                    assert released[name].value == pytest.approx(
                        mf.by_group.loc[k, metric], rel=1e-12, abs=1e-12
                    ), name
                    checked += 1
                else:
                    assert name not in released, name
            expected = mf.by_group.loc[eligible, metric]
            assert released[f"gap:{gap}:{partition}"].value == pytest.approx(
                expected.max() - expected.min(), rel=1e-12, abs=1e-12
            )
            if metric in ("tpr", "fpr"):
                eo.append(expected.max() - expected.min())
        if partition != "sex&race":  # every group eligible: fairlearn's own difference()
            assert released[f"gap:demographic_parity:{partition}"].value == pytest.approx(
                mf.difference()["selection_rate"], rel=1e-12
            )
        assert released[f"gap:equalised_odds:{partition}"].value == pytest.approx(max(eo))
    assert checked > 40
    # Without noise, every interval is a point.
    assert all(v.noise_std == 0.0 for v in released.values())


def test_attribution_gap_is_the_difference_of_mean_integrated_gradients() -> None:
    ds = load_dataset("synthetic_hospitals")
    pre = ds.preprocessor
    sites = [ds.site(i, 2, seed=0) for i in range(2)]
    model = oracle(pre, {"group=B": -1.5})  # group B gets fewer positive predictions
    params = params_of(
        GROUP,
        feature_names=json.dumps(list(pre.encoded_names)),
        groups=json.dumps({k: list(v) for k, v in pre.groups.items()}),
        attribution_clip="1000",  # never active here: the release is exact
        n_steps="8",
    )
    vector, labels = pooled_sum(model, sites, params, 1.0)
    post = KIND.postprocess(vector, 0.0, 1.0, labels, params)
    released = by_name(post.values)
    assert released["gap:demographic_parity:group"].value > 0.1

    x = np.concatenate([s.features for s in sites])
    g = np.concatenate([s.sensitive["group"] for s in sites])
    ig = integrated_gradients(model, x, n_steps=8)
    expected = ig[g == "A"].mean(axis=0) - ig[g == "B"].mean(axis=0)
    for j, name in enumerate(pre.encoded_names):
        got = released[f"attribution_gap:group=A vs group=B:{name}"].value
        assert got == pytest.approx(expected[j], abs=1e-9), name
    # The group feature explains the gap best: its weight is the only group-dependent one.
    assert post.grouped[0].name == "attribution_gap:group=A vs group=B:group"
    assert post.grouped[0].value == pytest.approx(1.5, rel=1e-5)


def test_no_record_term_exceeds_the_clip_bound() -> None:
    rng = np.random.default_rng(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    params = params_of(
        {"a": ["u", "v"], "b": ["p", "q", "r"]}, attribution_clip="0.01", n_steps="4"
    )
    for _ in range(30):
        x = rng.normal(size=(1, 5)) * 10
        sensitive = {"a": rng.choice(["u", "v", "w"], 1), "b": rng.choice(["p", "q", "r"], 1)}
        for clip in (0.3, 2.0):
            c = KIND.contribute(model, x, rng.integers(0, 2, 1), params, clip, sensitive)
            assert np.linalg.norm(c.vector[:-1]) <= clip * (1 + 1e-9)
            assert c.vector[-1] == clip


# -- noise: the planted bias, interval coverage -----------------------------------------------


def test_the_planted_label_bias_shows_as_an_fpr_gap_excluding_zero() -> None:
    ds = load_dataset("synthetic_hospitals")
    assert ds.truth is not None and ds.truth.biased_group == "B"
    pre = ds.preprocessor
    sites = [ds.site(i, 4, partition="natural") for i in range(4)]
    params = params_of(
        {ds.truth.sensitive_attribute: ["A", "B"]},
        feature_names=json.dumps(list(pre.encoded_names)),
        n_steps="4",
    )
    clip = 1.0
    sigma = gaussian_noise_multiplier(1.0, 1e-5) * l2_sensitivity(clip)
    model = oracle(pre)  # blind to the group: only the recorded labels are biased
    noised = []
    for i, s in enumerate(sites):
        c = KIND.contribute(model, s.features, s.labels, params, clip, s.sensitive)
        noised.append(c.vector + SeededRandom(i).normal(c.vector.size, sigma))
    labels = FairnessLayout.from_params(params, dimension=pre.dimension).coordinate_labels
    released = by_name(
        KIND.postprocess(np.sum(noised, axis=0), 2 * sigma, clip, labels, params).values
    )
    # Half of B's positives were recorded as negatives, and the group-blind model still
    # calls many of them positive: B's false-positive rate is higher.
    gap = released["gap:equalised_odds_fpr:group"]
    assert interval(gap)[0] > 0.05
    assert interval(released["group=B:fpr"])[0] > interval(released["group=A:fpr"])[1]


def test_intervals_cover_the_noiseless_values_about_95_percent_of_the_time() -> None:
    ds = load_dataset("synthetic_hospitals")
    pre = ds.preprocessor
    sites = [ds.site(i, 4, partition="natural") for i in range(4)]
    params = params_of(GROUP, attribution="false")
    model = oracle(pre, {"group=B": -0.8})
    clip = 1.0
    vector, labels = pooled_sum(model, sites, params, clip)
    truth = by_name(fairness_release(vector, 0.0, clip, labels, params).values)
    sigma = 2 * gaussian_noise_multiplier(0.2, 1e-5) * l2_sensitivity(clip)
    watched = ["gap:demographic_parity:group", "gap:equalised_odds_fpr:group", "group=B:tpr"]
    covered = dict.fromkeys(watched, 0)
    trials = 300
    rng = SeededRandom(7)
    for _ in range(trials):
        noisy = vector + rng.normal(vector.size, sigma)
        got = by_name(fairness_release(noisy, sigma, clip, labels, params).values)
        for name in watched:
            low, high = interval(got[name])
            covered[name] += low <= truth[name].value <= high
    for name, hits in covered.items():
        assert 0.90 <= hits / trials <= 0.985, (name, hits / trials)


# -- refusals ---------------------------------------------------------------------------------


def test_small_groups_are_withheld_with_the_reason() -> None:
    ds = load_dataset("synthetic_hospitals")
    site = ds.site(0, 40, seed=0)  # about 150 records
    params = params_of(GROUP, attribution="false", min_group_size="100")
    c = KIND.contribute(
        oracle(ds.preprocessor), site.features, site.labels, params, 1.0, site.sensitive
    )
    out = fairness_release(c.vector, 0.0, 1.0, c.labels, params)
    released = by_name(out.values)
    small = "group=B" if released["group=B:count"].value < 100 else "group=A"
    assert f"{small}:accuracy" not in released
    assert "gap:demographic_parity:group" not in released
    reasons = dict(out.omitted)
    assert "below min_group_size 100" in reasons[small]
    assert "fewer than two groups" in reasons["gap:demographic_parity:group"]


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"sensitive": "{not json"}, "'sensitive' is not valid JSON"),
        ({}, "needs parameter 'sensitive'"),
        (params_of({"religion": ["x"]}), "unknown sensitive attribute 'religion'"),
        (
            params_of(GROUP, intersections='[["group", "site"]]'),
            "unknown sensitive attribute 'site'",
        ),
        (params_of(GROUP, min_group_size="0"), "'min_group_size' must be an integer >= 1"),
        (params_of(GROUP, min_group_size="ten"), "'min_group_size' must be an integer >= 1"),
        (params_of({"group": ["A", "A"]}), "repeat a category"),
        (params_of(GROUP, attribution="maybe"), "attribution must be"),
    ],
)
def test_bad_parameters_are_refused_with_the_problem_named(
    params: dict[str, str], problem: str
) -> None:
    ds = load_dataset("synthetic_hospitals")
    site = ds.site(0, 40, seed=0)
    with pytest.raises(ConfigurationError, match=problem.replace("(", r"\(")):
        KIND.contribute(
            oracle(ds.preprocessor), site.features, site.labels, params, 1.0, site.sensitive
        )


def test_the_coordinator_sizes_a_fairness_round_from_the_public_schema() -> None:
    pre = load_dataset("synthetic_hospitals").preprocessor
    with pytest.raises(ConfigurationError, match="sensitive"):
        KIND.coordinate_labels(pre.encoded_names, pre.groups, {})
    run = RunConfig(dataset="synthetic_hospitals", explain_kind="fairness")
    spec = explanation_round_spec(run, pre, ("a", "b", "c"), round_id="r")
    assert json.loads(spec.params["sensitive"]) == {"group": ["A", "B"]}
    layout = FairnessLayout.from_params(spec.params, labels=spec.labels)
    assert spec.length == len(layout.coordinate_labels) + 1
    assert "group=B:tp" in spec.labels
    # A round sized without attributions does not fit parameters that ask for them.
    counts_only = params_of(GROUP, attribution="false")
    labels = FairnessLayout.from_params(counts_only).coordinate_labels
    with_attribution = params_of(GROUP, feature_names=json.dumps(list(pre.encoded_names)))
    with pytest.raises(ConfigurationError, match="round labels do not match"):
        KIND.postprocess(np.zeros(len(labels) + 1), 0.0, 1.0, labels, with_attribution)


# -- the real path: three sites, secure aggregation over gRPC on loopback ----------------------


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[str]:
    from server.aggregation import Aggregator, QueryHandler
    from server.grpc_server import serve
    from server.storage import Store

    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    running = serve(Aggregator(store), QueryHandler(store))
    try:
        yield running.address
    finally:
        running.stop(grace=None)
        store.close()


def test_three_sites_release_fairness_through_secure_aggregation(
    coordinator: str, tmp_path: Path
) -> None:
    import grpc

    from client.explanation import ExplainRequest, contribute_explanation
    from client.ledger_store import LedgerStore
    from fedlens import wire
    from fedlens.types import RoundSpec
    from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc, query_pb2, query_pb2_grpc
    from privacy import FixedPointCodec
    from server.round_specs import MAX_RECORDS_PER_SITE, PRECISION

    address = coordinator
    names = ("site-0", "site-1", "site-2")
    ds = load_dataset("synthetic_hospitals")
    pre = ds.preprocessor
    sites = [ds.site(i, len(names), seed=0) for i in range(len(names))]
    model = oracle(pre, {"group=B": -1.0})
    params = params_of(
        GROUP,
        feature_names=json.dumps(list(pre.encoded_names)),
        groups=json.dumps({k: list(v) for k, v in pre.groups.items()}),
        n_steps="4",
        min_group_size="50",
    )
    labels = FairnessLayout.from_params(params, dimension=pre.dimension).coordinate_labels
    clip, epsilon, delta = 1.0, 1.0, 1e-5
    codec = FixedPointCodec.choose(
        num_sites=len(names), max_abs=MAX_RECORDS_PER_SITE * clip, precision=PRECISION
    )
    spec = RoundSpec(
        round_id="fair-1",
        kind="fairness",
        site_ids=names,
        length=len(labels) + 1,
        bits=codec.bits,
        scale=codec.scale,
        clip_bound=clip,
        labels=labels,
        phase_timeout_s=30.0,
        params=params,
    )
    request = ExplainRequest(
        round_id=spec.round_id,
        kind=spec.kind,
        site_ids=names,
        aggregator=address,
        epsilon=epsilon,
        delta=delta,
        clip_bound=clip,
        bits=spec.bits,
        scale=spec.scale,
        timeout_s=30.0,
        params=params,
    )
    failures: list[BaseException] = []

    def site(i: int) -> None:
        store = LedgerStore(tmp_path / f"ledger-{i}.sqlite")
        try:
            contribute_explanation(
                request,
                site_id=names[i],
                model=model,
                features=sites[i].features,
                labels=sites[i].labels,
                ledger=store.load(10.0, 1e-5),
                store=store,
                rng=SeededRandom(200 + i),
                now=datetime(2026, 1, 1, tzinfo=UTC),
                sensitive=sites[i].sensitive,
            )
        except BaseException as exc:  # collected and asserted on below
            failures.append(exc)

    with grpc.insecure_channel(address) as channel:
        aggregation = aggregation_pb2_grpc.AggregationStub(channel)
        aggregation.OpenRound(aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec)))
        threads = [threading.Thread(target=site, args=(i,)) for i in range(len(names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures
        status = aggregation.GetRoundStatus(
            aggregation_pb2.GetRoundStatusRequest(round_id="fair-1")
        )
        assert status.phase == aggregation_pb2.ROUND_PHASE_COMPLETE
        got = wire.release_from_proto(
            query_pb2_grpc.QueryStub(channel).GetRelease(
                query_pb2.GetReleaseRequest(release_id=status.release_id)
            )
        )

    assert got.kind == "fairness"
    vector, _ = pooled_sum(model, sites, params, clip)
    truth = by_name(fairness_release(vector, 0.0, clip, labels, params).values)
    released = by_name(got.values)
    assert released.keys() == truth.keys()
    sigma = np.sqrt(3) * gaussian_noise_multiplier(epsilon, delta) * l2_sensitivity(clip)
    assert released["group=A:count"].noise_std == pytest.approx(
        2 * sigma / FairnessLayout.from_params(params, labels=labels).scale(clip), rel=1e-6
    )
    for name, expected in truth.items():
        v = released[name]
        assert abs(v.value - expected.value) <= 4.5 * v.noise_std + 1e-3, name
    assert interval(released["gap:demographic_parity:group"])[0] > 0
