"""global_attribution's methods, per-class targets and cohorts: known answers and a real round."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from explain import get_kind, integrated_gradients, l2_sensitivity
from explain.attribution_methods import feature_ablation, gradient_shap
from explain.global_attribution import METHODS, AttributionSettings, attribution_params
from fedlens.datasets import FeatureSpec, Preprocessor, Schema, load_dataset
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.models import build_model
from privacy import SeededRandom, clip_rows, gaussian_noise_multiplier

KIND = get_kind("global_attribution")
PRE = load_dataset("synthetic_hospitals").preprocessor


def logistic(d: int, seed: int) -> tuple[torch.nn.Module, np.ndarray]:
    model = build_model("logistic", d, seed=seed)
    return model, model.linear.weight.detach().numpy()[0].astype(np.float64)


def no_labels(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.int64)


# -- known answers ------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 12), st.integers(0, 1000))
def test_ablation_and_gradient_shap_of_a_logistic_logit_are_w_times_x_minus_baseline(
    d: int, seed: int
) -> None:
    model, w = logistic(d, seed)
    rng = np.random.default_rng(seed)
    x = rng.random((7, d)).astype(np.float32)
    base = rng.random(d)
    expected = w * (x - base)
    # Ablation is exact for a linear logit: f(x) - f(x with x_j := b_j) = w_j (x_j - b_j).
    np.testing.assert_allclose(feature_ablation(model, x, baseline=base), expected, atol=1e-5)
    # The logit's gradient is w at every path point, so every sample is exact.
    shap = gradient_shap(model, x, baselines=base[None, :], n_samples=3, seed=seed)
    np.testing.assert_allclose(shap, expected, rtol=1e-5, atol=1e-6)


def test_gradient_shap_with_one_baseline_converges_to_integrated_gradients() -> None:
    # On a non-linear model, GradientSHAP with one baseline is a Monte Carlo estimate of
    # Integrated Gradients (the path point is uniform on the straight line).
    model = build_model("mlp", 5, seed=3)
    x = np.random.default_rng(0).random((10, 5)).astype(np.float32)
    base = np.full(5, 0.2)
    ig = integrated_gradients(model, x, baseline=base, n_steps=200)
    errors = {
        n: np.abs(gradient_shap(model, x, baselines=base[None, :], n_samples=n) - ig).max()
        for n in (8, 8192)
    }
    assert errors[8192] < errors[8] / 5
    np.testing.assert_allclose(
        gradient_shap(model, x, baselines=base[None, :], n_samples=8192), ig, atol=3e-3
    )


def test_gradient_shap_is_reproducible_and_each_row_depends_on_its_record_alone() -> None:
    model = build_model("mlp", 4, seed=1)
    x = np.random.default_rng(1).random((12, 4)).astype(np.float32)
    refs = np.random.default_rng(2).random((3, 4))
    first = gradient_shap(model, x, baselines=refs, n_samples=16, seed=7)
    np.testing.assert_array_equal(
        first, gradient_shap(model, x, baselines=refs, n_samples=16, seed=7)
    )
    shuffled = gradient_shap(model, x[::-1].copy(), baselines=refs, n_samples=16, seed=7)
    np.testing.assert_allclose(shuffled[::-1], first, rtol=1e-6, atol=1e-7)
    assert not np.allclose(first, gradient_shap(model, x, baselines=refs, n_samples=16, seed=8))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_through_the_kind_gives_the_logistic_known_answer(method: str) -> None:
    model, w = logistic(4, 5)
    x = np.random.default_rng(5).random((9, 4)).astype(np.float32)
    base = [0.1, 0.2, 0.3, 0.4]
    params = {"method": method, "baseline": json.dumps(base), "n_samples": "4"}
    got = KIND.contribute(model, x, no_labels(9), params, 100.0).vector
    np.testing.assert_allclose(got[:-1], (w * (x - np.array(base))).sum(axis=0), atol=1e-4)
    assert got[-1] == pytest.approx(9 * 100.0)


# -- per-class targets ---------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(METHODS), st.floats(0.01, 5.0), st.integers(0, 10_000))
def test_both_classes_are_labelled_and_share_one_clip_bound(
    method: str, clip: float, seed: int
) -> None:
    model, w = logistic(3, seed)
    with torch.no_grad():
        model.linear.weight.mul_(50.0)  # large attributions, so clipping bites
    w = 50.0 * w
    x = np.random.default_rng(seed).random((12, 3)).astype(np.float32)
    params = {
        "method": method,
        "target": "both",
        "n_samples": "4",
        "feature_names": json.dumps(["a", "b=1", "b=2"]),
    }
    out = KIND.contribute(model, x, no_labels(12), params, clip)
    per_class = [f"{n}|class={c}" for c in (1, 0) for n in ("a", "b=1", "b=2")]
    assert out.labels == tuple(per_class)
    assert out.labels == KIND.coordinate_labels(["a", "b=1", "b=2"], {}, params)
    assert out.vector.shape == (7,)
    # Class 0 is explained through its logit -z: the exact negation of class 1's block.
    np.testing.assert_allclose(out.vector[3:6], -out.vector[:3], atol=1e-9)
    terms = clip_rows(np.concatenate([w * x, -w * x], axis=1), clip)
    np.testing.assert_allclose(out.vector[:-1], terms.sum(axis=0), rtol=1e-4, atol=1e-5 * clip)
    for i in range(12):  # each record's whole term, both classes, stays within the bound
        one = KIND.contribute(model, x[i : i + 1], no_labels(1), params, clip).vector
        assert np.linalg.norm(one[:-1]) <= clip * (1 + 1e-6)
        rest = KIND.contribute(model, np.delete(x, i, axis=0), no_labels(11), params, clip)
        assert np.linalg.norm(out.vector - rest.vector) <= l2_sensitivity(clip) * (1 + 1e-6)


def test_postprocess_of_both_names_features_per_class() -> None:
    params = {"target": "both", "groups": json.dumps({"age": [0], "sex": [1, 2]})}
    labels = KIND.coordinate_labels(["age", "sex=M", "sex=F"], {}, params)
    noised = np.array([4.0, 1.0, 1.0, -4.0, -1.0, -1.0, 10.0])  # 10 records at clip 1
    post = KIND.postprocess(noised, 1.0, 1.0, labels, params)
    assert [v.name for v in post.values] == list(labels)
    assert {g.name: g.value for g in post.grouped} == pytest.approx(
        {"age|class=1": 0.4, "sex|class=1": 0.2, "age|class=0": -0.4, "sex|class=0": -0.2}
    )
    with pytest.raises(ConfigurationError, match="round labels do not match"):
        KIND.postprocess(
            noised[[0, 1, 2, 6]],
            1.0,
            1.0,
            ("age", "sex=M", "sex=F"),
            {**params, "feature_names": json.dumps(["age", "sex=M", "sex=F"])},
        )


# -- cohorts ------------------------------------------------------------------------------------


def test_the_cohort_selects_exactly_the_matching_raw_records() -> None:
    ds = load_dataset("synthetic_hospitals")
    frame = ds.train.iloc[:3000]
    x = PRE.transform(frame)
    cohort = {"x_inf_0": [-1.0, 0.5], "group": ["B"]}
    settings_ = AttributionSettings.from_params(attribution_params(PRE, cohort=cohort))
    assert settings_.cohort is not None
    raw = frame["x_inf_0"].between(-1.0, 0.5) & (frame["group"] == "B")
    np.testing.assert_array_equal(settings_.cohort.select(x), raw.to_numpy())
    assert 200 < raw.sum() < 1500
    # Only cohort records contribute, count included: the same as giving the site only them.
    model, _ = logistic(PRE.dimension, 0)
    params = attribution_params(PRE, method="feature_ablation", cohort=cohort)
    with_cohort = KIND.contribute(model, x, no_labels(len(x)), params, 0.5)
    subset = x[raw.to_numpy()]
    plain = attribution_params(PRE, method="feature_ablation")
    only = KIND.contribute(model, subset, no_labels(len(subset)), plain, 0.5)
    assert with_cohort.count == only.count == raw.sum()
    np.testing.assert_allclose(with_cohort.vector, only.vector)


def test_range_bounds_are_inclusive_in_raw_units_on_linear_and_log_scales() -> None:
    schema = Schema(
        features=(
            FeatureSpec("age", "numeric", low=17, high=90),
            FeatureSpec("gain", "numeric", low=0, high=99999, log=True),
            FeatureSpec("sex", "categorical", categories=("Female", "Male")),
        ),
        label="y",
        classes=("no", "yes"),
    )
    pre = Preprocessor(schema)
    frame = pd.DataFrame(
        {
            "age": [29.999, 30, 40, 50, 50.001, 95, 30],
            "gain": [0, 100, 5000, 5000, 99, 5001, 100],
            "sex": ["Female", "Female", "Female", "Female", "Female", "Female", "Male"],
        }
    )
    cohort = {"age": [30, 50], "gain": [100, 5000], "sex": ["Female"]}
    settings_ = AttributionSettings.from_params(attribution_params(pre, cohort=cohort))
    assert settings_.cohort is not None
    got = settings_.cohort.select(pre.transform(frame))
    assert got.tolist() == [False, True, True, True, False, False, False]
    # A raw value above the public range encodes as its end, so it counts as the end.
    wide = AttributionSettings.from_params(attribution_params(pre, cohort={"age": [80, 1000]}))
    assert wide.cohort is not None
    assert wide.cohort.select(pre.transform(frame)).tolist() == [False] * 5 + [True, False]


@pytest.mark.parametrize(
    ("cohort", "problem"),
    [
        ('{"hospital": [1]}', "unknown feature 'hospital'"),
        ('{"group": ["C"]}', "unknown category 'C' of feature 'group'"),
        ('{"group": ["A"', "'cohort' is not valid JSON"),
        ("{}", "'cohort' is empty"),
        ('["group"]', "'cohort' must be a JSON dict"),
        ('{"group": []}', "'group' must map to a non-empty list"),
        ('{"x_inf_0": [1, -1]}', "'x_inf_0' is numeric: give \\[low, high\\]"),
        ('{"x_inf_0": ["high"]}', "'x_inf_0' is numeric"),
    ],
)
def test_bad_cohorts_are_refused_naming_the_problem(cohort: str, problem: str) -> None:
    params = {**attribution_params(PRE), "cohort": cohort}
    model, _ = logistic(PRE.dimension, 0)
    x = np.zeros((60, PRE.dimension), dtype=np.float32)
    with pytest.raises(ConfigurationError, match=problem):
        KIND.contribute(model, x, no_labels(60), params, 1.0)
    # The post-processor refuses too: that is what the aggregator runs at OpenRound.
    with pytest.raises(ConfigurationError, match=problem):
        KIND.postprocess(np.zeros(PRE.dimension + 1), 0.0, 1.0, PRE.encoded_names, params)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"method": "lime"}, "unknown attribution method 'lime'"),
        ({"target": "class_2"}, "unknown attribution target 'class_2'"),
        ({"min_cohort_size": "0"}, "'min_cohort_size' must be at least 1"),
        ({"n_samples": "many"}, "'n_samples' must be an integer"),
        ({"baseline": "[0, NaN]"}, "'baseline'"),
        ({"baseline": "[0, 1]"}, "baselines have 2 values, the layout 11 columns"),
        ({"cohort": '{"x_inf_0": [0, 1]}', "feature_ranges": "{}"}, "no public range"),
    ],
)
def test_bad_parameters_are_refused_naming_them(params: dict[str, str], problem: str) -> None:
    # Refused by the post-processor, so at OpenRound, before any site is asked.
    with pytest.raises(ConfigurationError, match=problem):
        KIND.postprocess(
            np.zeros(PRE.dimension + 1),
            0.0,
            1.0,
            PRE.encoded_names,
            {**attribution_params(PRE), **params},
        )


def test_a_site_with_a_small_cohort_refuses_without_revealing_its_size() -> None:
    model, _ = logistic(PRE.dimension, 0)
    x = np.zeros((100, PRE.dimension), dtype=np.float32)
    x[:37, PRE.encoded_names.index("group=B")] = 1.0
    params = attribution_params(PRE, cohort={"group": ["B"]})
    with pytest.raises(ExplanationError, match="fewer than 50 records") as refused:
        KIND.contribute(model, x, no_labels(100), params, 1.0)
    assert "37" not in str(refused.value)
    lower = {**params, "min_cohort_size": "30"}
    assert KIND.contribute(model, x, no_labels(100), lower, 1.0).count == 37


# -- the planted spurious feature ------------------------------------------------------------------


def train_logistic(x: np.ndarray, y: np.ndarray, *, steps: int = 300) -> torch.nn.Module:
    model = build_model("logistic", x.shape[1], seed=0)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    inputs, targets = torch.tensor(x), torch.tensor(y, dtype=torch.float32)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(inputs)[:, 0], targets)
        loss.backward()
        optimiser.step()
    return model


@functools.cache
def hospital_model(hospital: int) -> tuple[torch.nn.Module, np.ndarray]:
    """A model trained on one hospital's training rows only, and those rows encoded."""
    site = load_dataset("synthetic_hospitals").site(hospital, 4, partition="natural")
    return train_logistic(site.features, site.labels), site.features


@pytest.mark.parametrize("method", METHODS)
def test_the_spurious_marker_ranks_high_only_for_its_hospitals_model(method: str) -> None:
    truth = load_dataset("synthetic_hospitals").truth
    assert truth is not None
    clean_site = next(h for h in range(4) if h not in (truth.spurious_site, truth.flipped_site))
    params = attribution_params(PRE, method=method, n_samples="8")
    clip, epsilon, delta = 1.0, 1.0, 1e-5
    sigma = gaussian_noise_multiplier(epsilon, delta) * l2_sensitivity(clip)
    noise = np.random.default_rng(0)
    ranks = {}
    for hospital in (truth.spurious_site, clean_site):
        model, features = hospital_model(hospital)
        out = KIND.contribute(model, features, no_labels(len(features)), params, clip)
        released = out.vector + noise.normal(0.0, sigma, out.vector.shape)
        post = KIND.postprocess(released, sigma, clip, out.labels, params)
        ranks[hospital] = [g.name for g in post.grouped].index(truth.spurious_feature)
    assert ranks[truth.spurious_site] == 0  # the strongest feature of the spurious model
    assert ranks[clean_site] >= len(truth.informative)  # below every informative feature


# -- the real path: three sites, secure aggregation over gRPC -------------------------------------


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


def test_three_sites_release_a_cohorts_ablation_through_secure_aggregation(
    coordinator: str, tmp_path: Path
) -> None:
    import grpc

    from client.explanation import ExplainRequest, contribute_explanation
    from client.ledger_store import LedgerStore
    from fedlens import wire
    from fedlens.types import RoundSpec
    from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc, query_pb2, query_pb2_grpc
    from privacy import FixedPointCodec

    ds = load_dataset("synthetic_hospitals")
    sites = ("site-0", "site-1", "site-2")
    data = [ds.site(i, len(sites)).features for i in range(len(sites))]
    model, w = logistic(PRE.dimension, 2)
    cohort = {"x_inf_0": [0.0, 4.0], "group": ["A"]}
    params = attribution_params(PRE, method="feature_ablation", cohort=cohort)
    clip, epsilon, delta = 0.5, 1.0, 1e-5
    codec = FixedPointCodec.choose(num_sites=3, max_abs=1e6 * clip, precision=1e-5)
    spec = RoundSpec(
        round_id="ga-cohort",
        kind="global_attribution",
        site_ids=sites,
        length=PRE.dimension + 1,
        bits=codec.bits,
        scale=codec.scale,
        clip_bound=clip,
        labels=KIND.coordinate_labels(PRE.encoded_names, PRE.groups, params),
        phase_timeout_s=30.0,
        params=params,
    )
    with grpc.insecure_channel(coordinator) as channel:
        aggregation = aggregation_pb2_grpc.AggregationStub(channel)
        # A cohort naming no feature is refused when the round opens, before any site works.
        bad = replace(
            spec, round_id="ga-bad", params={**params, "cohort": json.dumps({"hospital": [1]})}
        )
        with pytest.raises(grpc.RpcError) as info:
            aggregation.OpenRound(
                aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(bad))
            )
        assert "unknown feature 'hospital'" in (info.value.details() or "")
        aggregation.OpenRound(aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec)))

        request = ExplainRequest(
            round_id=spec.round_id,
            kind=spec.kind,
            site_ids=spec.site_ids,
            aggregator=coordinator,
            epsilon=epsilon,
            delta=delta,
            clip_bound=clip,
            bits=spec.bits,
            scale=spec.scale,
            timeout_s=spec.phase_timeout_s,
            params=spec.params,
        )
        failures: list[BaseException] = []

        def site(i: int) -> None:
            store = LedgerStore(tmp_path / f"ledger-{i}.sqlite")
            try:
                contribute_explanation(
                    request,
                    site_id=sites[i],
                    model=model,
                    features=data[i],
                    labels=no_labels(len(data[i])),
                    ledger=store.load(10.0, 1e-5),
                    store=store,
                    rng=SeededRandom(200 + i),
                    now=datetime(2026, 1, 1, tzinfo=UTC),
                )
            except BaseException as exc:  # collected and asserted on below
                failures.append(exc)

        threads = [threading.Thread(target=site, args=(i,)) for i in range(len(sites))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures
        status = aggregation.GetRoundStatus(
            aggregation_pb2.GetRoundStatusRequest(round_id=spec.round_id)
        )
        assert status.phase == aggregation_pb2.ROUND_PHASE_COMPLETE
        got = wire.release_from_proto(
            query_pb2_grpc.QueryStub(channel).GetRelease(
                query_pb2.GetReleaseRequest(release_id=status.release_id)
            )
        )

    pooled = np.concatenate(data)
    frame_mask = (pooled[:, PRE.groups["x_inf_0"][0]] >= 0.5) & (
        pooled[:, PRE.encoded_names.index("group=A")] == 1.0
    )
    members = pooled[frame_mask]
    assert abs(got.noised_count - members.shape[0]) < 50
    truth = clip_rows(w * members.astype(np.float64), clip).mean(axis=0)
    z = gaussian_noise_multiplier(epsilon, delta)
    expected_std = np.sqrt(3) * z * l2_sensitivity(clip) / members.shape[0]
    for value, expected in zip(got.values, truth, strict=True):
        assert value.noise_std == pytest.approx(expected_std, rel=0.05)
        assert abs(value.value - expected) <= 4.5 * value.noise_std + 1e-3, value.name
