"""feature_stats: exact without noise, bounded terms, honest noise stds, and a real round."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from explain import FeatureLayout, feature_stats_terms, get_kind, l2_sensitivity
from fedlens.datasets import Preprocessor, load_dataset
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.types import ReleasedValue
from privacy import SeededRandom, gaussian_noise_multiplier

KIND = get_kind("feature_stats")
NO_LABELS = np.zeros(0, dtype=np.int64)
NO_MODEL = torch.nn.Identity()  # feature_stats never looks at the model


def params_of(names: tuple[str, ...], groups: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    return {
        "feature_names": json.dumps(list(names)),
        "groups": json.dumps({k: list(v) for k, v in groups.items()}),
    }


def pooled_truth(x: np.ndarray, pre: Preprocessor) -> dict[str, float]:
    """What feature_stats should release without noise, computed directly with numpy."""
    x = x.astype(np.float64)
    out: dict[str, float] = {}
    for spec in pre.schema.features:
        feature, cols = spec.name, pre.groups[spec.name]
        if spec.kind == "numeric":
            mean, std = float(x[:, cols[0]].mean()), float(x[:, cols[0]].std())
            out[f"{feature}:mean"], out[f"{feature}:std"] = mean, std
            out[f"{feature}:low"] = float(np.clip(mean - 2 * std, 0, 1))
            out[f"{feature}:high"] = float(np.clip(mean + 2 * std, 0, 1))
        else:
            for j in cols:
                out[f"{pre.encoded_names[j]}:freq"] = float(x[:, j].mean())
    return out


def by_name(values: tuple[ReleasedValue, ...]) -> dict[str, ReleasedValue]:
    return {v.name: v for v in values}


def release(
    vector: np.ndarray, noise_std: float, clip: float, pre: Preprocessor
) -> dict[str, ReleasedValue]:
    labels = KIND.coordinate_labels(pre.encoded_names, pre.groups, {})
    post = KIND.postprocess(
        vector, noise_std, clip, labels, params_of(pre.encoded_names, pre.groups)
    )
    return by_name(post.values)


# -- exactness without noise -----------------------------------------------------------


@pytest.mark.parametrize("dataset", ["synthetic_hospitals", "adult"])
def test_without_noise_the_release_is_numpys_statistics_of_the_pooled_data(dataset: str) -> None:
    ds = load_dataset(dataset)
    pre = ds.preprocessor
    params = params_of(pre.encoded_names, pre.groups)
    sites = [ds.site(i, 3, seed=1).features for i in range(3)]
    clip = 0.7
    total = sum(KIND.contribute(NO_MODEL, x, NO_LABELS, params, clip).vector for x in sites)
    pooled = np.concatenate(sites).astype(np.float64)
    layout = FeatureLayout.from_params(params, dimension=pre.dimension)
    # Clipping is inactive on encoded records: every term is the scaled raw term.
    raw = np.concatenate([pooled, pooled[:, list(layout.numeric_columns)] ** 2], axis=1)
    np.testing.assert_allclose(
        feature_stats_terms(pooled, layout, clip), raw * clip / layout.term_bound, rtol=1e-12
    )

    released = release(np.asarray(total), 0.0, clip, pre)
    truth = pooled_truth(pooled, pre)
    assert released.keys() == truth.keys()
    for name, expected in truth.items():
        assert released[name].value == pytest.approx(expected, rel=1e-9, abs=1e-12), name
        assert released[name].noise_std == 0.0
    post = KIND.postprocess(
        np.asarray(total),
        0.0,
        clip,
        KIND.coordinate_labels(pre.encoded_names, pre.groups, {}),
        params,
    )
    assert post.noised_count == pytest.approx(pooled.shape[0])
    # Means and frequencies in column order are the attribution baseline.
    baseline = [v.value for v in post.values if v.name.endswith((":mean", ":freq"))]
    np.testing.assert_allclose(baseline, pooled.astype(np.float64).mean(axis=0), rtol=1e-9)


def test_missing_categories_keep_their_share_and_columns_without_groups_are_numeric() -> None:
    names = ("size", "colour=red", "colour=blue")
    groups = {"size": (0,), "colour": (1, 2)}
    x = np.array([[0.2, 1, 0], [0.4, 0, 1], [0.6, 0, 0], [0.8, 1, 0]])
    params = params_of(names, groups)
    vector = KIND.contribute(NO_MODEL, x, NO_LABELS, params, 1.0).vector
    labels = KIND.coordinate_labels(names, groups, {})
    assert labels == ("size", "colour=red", "colour=blue", "size^2")
    got = by_name(KIND.postprocess(vector, 0.0, 1.0, labels, params).values)
    assert [got[f"colour={c}:freq"].value for c in ("red", "blue")] == pytest.approx([0.5, 0.25])
    assert got["size:std"].value == pytest.approx(np.std([0.2, 0.4, 0.6, 0.8]))

    # Without groups every column is a numeric feature of its own.
    plain = KIND.contribute(NO_MODEL, x, NO_LABELS, {}, 1.0)
    assert plain.labels == ("x0", "x1", "x2", "x0^2", "x1^2", "x2^2")
    got = by_name(KIND.postprocess(plain.vector, 0.0, 1.0, plain.labels, {}).values)
    assert got["x1:mean"].value == pytest.approx(0.5)
    assert got["x1:std"].value == pytest.approx(0.5)


def test_noised_moments_are_projected_back_onto_what_data_can_have() -> None:
    names = ("size", "colour=red", "colour=blue")
    groups = {"size": (0,), "colour": (1, 2)}
    params, labels = params_of(names, groups), KIND.coordinate_labels(names, groups, {})
    bound = FeatureLayout.from_groups(names, groups).term_bound

    def post(means: list[float], noise_std: float = 0.0) -> dict[str, ReleasedValue]:
        # Column means (size, red, blue, size^2) of 10 records at clip 1, as a noised sum.
        vector = np.array([*np.asarray(means) * 10 / bound, 10.0])
        return by_name(KIND.postprocess(vector, noise_std, 1.0, labels, params).values)

    got = post([0.5, 0.7, 0.6, 0.3])
    # Frequencies summing past one go to the nearest point of the simplex.
    assert [got["colour=red:freq"].value, got["colour=blue:freq"].value] == pytest.approx(
        [0.55, 0.45]
    )
    assert got["size:std"].value == pytest.approx(np.sqrt(0.3 - 0.25))
    got = post([1.3, -0.2, 0.4, 0.9])
    assert got["size:mean"].value == 1.0
    assert got["size:std"].value == 0.0  # E[x^2] < E[x]^2 after noise
    assert [got["colour=red:freq"].value, got["colour=blue:freq"].value] == [0.0, 0.4]
    got = post([0.5, 0.0, 0.0, 2.0], noise_std=0.1)
    assert got["size:std"].value == 0.5  # no [0, 1] value spreads wider
    assert (got["size:low"].value, got["size:high"].value) == (0.0, 1.0)
    # At zero spread the std's noise is capped where the first-order rule blows up.
    zero = post([0.5, 0.0, 0.0, 0.25], noise_std=0.1)["size:std"]
    sd_mean = 0.1 * bound / 10
    assert zero.value == pytest.approx(0.0, abs=1e-7)
    assert zero.noise_std == pytest.approx(np.sqrt(sd_mean * np.sqrt(2.0)))


# -- the per-record bound ---------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    numeric = draw(st.integers(0, 4))
    categories = draw(st.lists(st.integers(1, 4), max_size=3, min_size=0 if numeric else 1))
    names: list[str] = [f"n{i}" for i in range(numeric)]
    groups: dict[str, tuple[int, ...]] = {name: (i,) for i, name in enumerate(names)}
    for g, k in enumerate(categories):
        groups[f"c{g}"] = tuple(range(len(names), len(names) + k))
        names.extend(f"c{g}={c}" for c in range(k))
    return tuple(names), groups


@settings(max_examples=60, deadline=None)
@given(
    layouts(),
    st.floats(1e-3, 50.0),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_no_record_term_exceeds_the_clip_bound(
    layout_spec: tuple[tuple[str, ...], dict[str, tuple[int, ...]]],
    clip: float,
    seed: int,
    encoded: bool,
) -> None:
    names, groups = layout_spec
    layout = FeatureLayout.from_groups(names, groups)
    rng = np.random.default_rng(seed)
    n = 25
    if encoded:  # what a Preprocessor produces: [0, 1] values, at most one category
        x = np.zeros((n, len(names)))
        for feature in layout.features:
            if feature.numeric:
                x[:, feature.columns[0]] = rng.choice([0.0, 1.0, rng.random()], size=n)
            else:
                pick = rng.integers(-1, len(feature.columns), size=n)
                rows = np.flatnonzero(pick >= 0)
                x[rows, np.asarray(feature.columns)[pick[rows]]] = 1.0
    else:  # anything finite: the bound must hold all the same
        x = rng.normal(scale=rng.choice([0.5, 10.0, 1e6]), size=(n, len(names)))
    terms = feature_stats_terms(x, layout, clip)
    assert np.all(np.linalg.norm(terms, axis=1) <= clip)
    if encoded:  # and within the encoded domain nothing is clipped
        raw = np.concatenate([x, x[:, list(layout.numeric_columns)] ** 2], axis=1)
        np.testing.assert_allclose(terms, raw * clip / layout.term_bound, rtol=1e-12)
    params = params_of(names, groups)
    whole = KIND.contribute(NO_MODEL, x, NO_LABELS, params, clip).vector
    for i in (0, n // 2, n - 1):
        rest = KIND.contribute(NO_MODEL, np.delete(x, i, axis=0), NO_LABELS, params, clip).vector
        assert np.linalg.norm(whole - rest) <= l2_sensitivity(clip) * (1 + 1e-9)


# -- noise ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count_noise", "tolerance"),
    # The stated stds ignore the count's noise, as global_attribution's do: exact
    # without it, a few per cent low with it when there are few features.
    [(False, 0.04), (True, 0.1)],
)
def test_released_noise_stds_match_the_spread_over_repeated_noisings(
    count_noise: bool, tolerance: float
) -> None:
    # Values kept away from every clamp, so the first-order stds are the whole story.
    rng = np.random.default_rng(5)
    n = 4000
    names = ("a", "b", "colour=red", "colour=blue")
    groups = {"a": (0,), "b": (1,), "colour": (2, 3)}
    colour = rng.choice(3, size=n, p=[0.3, 0.4, 0.3])  # 2 = missing: frequencies sum to 0.7
    x = np.column_stack(
        [
            np.clip(rng.normal(0.4, 0.15, n), 0, 1),
            np.clip(rng.normal(0.6, 0.1, n), 0, 1),
            colour == 0,
            colour == 1,
        ]
    ).astype(np.float64)
    params = params_of(names, groups)
    labels = KIND.coordinate_labels(names, groups, {})
    clip = 2.0
    vector = KIND.contribute(NO_MODEL, x, NO_LABELS, params, clip).vector
    sigma = 9.0  # per coordinate, as if several sites' noise were summed
    noise = np.random.default_rng(11).normal(scale=sigma, size=(3000, vector.size))
    if not count_noise:
        noise[:, -1] = 0.0
    runs = [KIND.postprocess(vector + e, sigma, clip, labels, params).values for e in noise]
    values = np.array([[v.value for v in run] for run in runs])
    declared = np.array([[v.noise_std for v in run] for run in runs]).mean(axis=0)
    exact = KIND.postprocess(vector, 0.0, clip, labels, params).values
    assert 0.002 < declared[0] < 0.003  # measurable, yet small next to the spreads
    for j, v in enumerate(exact):
        spread = values[:, j].std()
        assert spread == pytest.approx(declared[j], rel=tolerance), v.name
        # The noised values centre on the exact ones (a spread's bias is second order).
        assert abs(values[:, j].mean() - v.value) < 0.25 * declared[j], v.name


@pytest.mark.parametrize("dataset", ["synthetic_hospitals", "adult"])
def test_dp_means_at_epsilon_one_are_within_a_few_noise_stds(dataset: str) -> None:
    ds = load_dataset(dataset, seed=3)
    pre = ds.preprocessor
    x = ds.site(0, 1, seed=3).features  # the whole training set at one site
    clip = 0.5
    z = gaussian_noise_multiplier(1.0, 1e-6)
    sigma = z * l2_sensitivity(clip)
    vector = KIND.contribute(
        NO_MODEL, x, NO_LABELS, params_of(pre.encoded_names, pre.groups), clip
    ).vector
    noised = vector + SeededRandom(17).normal(vector.size, sigma)
    released = release(noised, sigma, clip, pre)
    truth = pooled_truth(x, pre)
    for name, expected in truth.items():
        if name.endswith((":mean", ":freq")):
            got = released[name]
            assert got.noise_std < 0.005, name  # the whole training set makes them precise
            assert abs(got.value - expected) <= 4.5 * got.noise_std, name


# -- refusals ------------------------------------------------------------------------------

NAMES = ("age", "sex=Female", "sex=Male")


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"feature_names": json.dumps(NAMES), "groups": "{oops"}, "'groups' is not valid JSON"),
        ({"feature_names": json.dumps(NAMES), "groups": "[1]"}, "must be a JSON object"),
        ({"feature_names": "{}"}, "'feature_names' must be a JSON list"),
        ({"groups": json.dumps({"age": [0]})}, "groups need feature_names"),
        (
            params_of(NAMES, {"age": (0,), "colour": (1, 2)}),
            "group 'colour' does not match column 1 ('sex=Female')",
        ),
        (params_of(NAMES, {"age": (0,), "sex": (1, 7)}), "group 'sex' names column 7"),
        (
            params_of(NAMES, {"age": (0,), "sex": (0, 1, 2)}),
            "column 0 ('age') is in both groups 'age' and 'sex'",
        ),
        (params_of(NAMES, {"sex": (1, 2)}), "columns in no group: 0 ('age')"),
        (params_of(NAMES, {"age": (0,), "sex": (1, 2, 1)}), "group 'sex' repeats a column"),
        (params_of(NAMES, {"age": (0,), "": (1, 2)}), "group names must be non-empty"),
        (params_of(NAMES, {"age": (), "sex": (1, 2)}), "group 'age' must list at least one column"),
        (params_of(("age", "age", "b"), {"age": (0,)}), "feature_names repeat 'age'"),
        (
            params_of(("age", "sex=Female"), {"age": (0,), "sex": (1,)}),
            "2 feature names for 3 feature columns",
        ),
    ],
)
def test_bad_parameters_are_refused_with_the_problem_named(
    params: dict[str, str], words: str
) -> None:
    x = np.zeros((2, 3))
    with pytest.raises(ConfigurationError) as info:
        KIND.contribute(NO_MODEL, x, NO_LABELS, params, 1.0)
    assert words in str(info.value)


def test_postprocess_refuses_labels_that_are_not_its_own() -> None:
    groups = {"age": (0,), "sex": (1, 2)}
    params = params_of(NAMES, groups)
    good = KIND.coordinate_labels(NAMES, groups, {})
    KIND.postprocess(np.zeros(len(good) + 1), 0.0, 1.0, good, params)
    # The labels of global_attribution (one per encoded column) lack the squares.
    with pytest.raises(ConfigurationError, match="round labels do not match"):
        KIND.postprocess(np.zeros(len(NAMES) + 1), 0.0, 1.0, NAMES, params)
    with pytest.raises(ConfigurationError, match="noised sum has shape"):
        KIND.postprocess(np.zeros(3), 0.0, 1.0, good, params)
    with pytest.raises(ExplanationError, match="NaN"):
        KIND.contribute(NO_MODEL, np.array([[np.nan, 0, 1]]), NO_LABELS, params, 1.0)
    with pytest.raises(ExplanationError, match="shape"):
        KIND.contribute(NO_MODEL, np.zeros(3), NO_LABELS, params, 1.0)


# -- the real path: coordinator spec, three sites, secure aggregation over gRPC ---------------


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[object, str]]:
    from server.aggregation import Aggregator, QueryHandler
    from server.grpc_server import serve
    from server.storage import Store

    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    aggregator = Aggregator(store)
    running = serve(aggregator, QueryHandler(store))
    try:
        yield aggregator, running.address
    finally:
        running.stop(grace=None)
        store.close()


def test_three_sites_release_the_pooled_statistics_through_secure_aggregation(
    coordinator: tuple[object, str], tmp_path: Path
) -> None:
    import grpc

    from client.explanation import ExplainRequest, contribute_explanation
    from client.ledger_store import LedgerStore
    from fedlens import wire
    from fedlens.runconfig import RunConfig
    from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc, query_pb2, query_pb2_grpc
    from server.round_specs import explanation_round_spec

    _, address = coordinator
    sites = ("site-0", "site-1", "site-2")
    run = RunConfig(
        dataset="synthetic_hospitals", explain_kind="feature_stats", phase_timeout_s=30.0
    )
    ds = load_dataset(run.dataset, seed=run.seed)
    pre = ds.preprocessor
    spec = explanation_round_spec(run, pre, sites, round_id="fs-1")
    assert spec.labels == KIND.coordinate_labels(pre.encoded_names, pre.groups, {})
    assert spec.length == pre.dimension + 9 + 1  # nine numeric features
    # global_attribution's round is sized as before: one coordinate per encoded column.
    attribution = explanation_round_spec(
        run.model_copy(update={"explain_kind": "global_attribution"}), pre, sites, round_id="ga"
    )
    assert attribution.labels == pre.encoded_names
    assert attribution.length == pre.dimension + 1

    with grpc.insecure_channel(address) as channel:
        aggregation = aggregation_pb2_grpc.AggregationStub(channel)
        aggregation.OpenRound(aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec)))
        # A feature_stats round sized like global_attribution's is refused at once.
        wrong = replace(spec, round_id="fs-bad", labels=pre.encoded_names, length=pre.dimension + 1)
        with pytest.raises(grpc.RpcError) as info:
            aggregation.OpenRound(
                aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(wrong))
            )
        assert "round labels do not match" in (info.value.details() or "")

        data = [ds.site(i, len(sites), seed=run.seed).features for i in range(len(sites))]
        request = ExplainRequest(
            round_id=spec.round_id,
            kind=spec.kind,
            site_ids=spec.site_ids,
            aggregator=address,
            epsilon=run.explain_epsilon,
            delta=run.explain_delta,
            clip_bound=spec.clip_bound,
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
                    model=NO_MODEL,
                    features=data[i],
                    labels=np.zeros(len(data[i]), dtype=np.int64),
                    ledger=store.load(10.0, 1e-5),
                    store=store,
                    rng=SeededRandom(100 + i),
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
        status = aggregation.GetRoundStatus(aggregation_pb2.GetRoundStatusRequest(round_id="fs-1"))
        assert status.phase == aggregation_pb2.ROUND_PHASE_COMPLETE
        got = wire.release_from_proto(
            query_pb2_grpc.QueryStub(channel).GetRelease(
                query_pb2.GetReleaseRequest(release_id=status.release_id)
            )
        )

    pooled = np.concatenate(data)
    assert got.kind == "feature_stats"
    assert abs(got.noised_count - pooled.shape[0]) < 50
    released = by_name(got.values)
    truth = pooled_truth(pooled, pre)
    assert released.keys() == truth.keys()
    z = gaussian_noise_multiplier(run.explain_epsilon, run.explain_delta)
    site_sigma = z * l2_sensitivity(spec.clip_bound)
    layout = FeatureLayout.from_params(spec.params, labels=spec.labels)
    # Three sites' noise, scaled back to units of the mean (count noise ignored).
    expected_std = np.sqrt(3) * site_sigma * layout.term_bound / spec.clip_bound / pooled.shape[0]
    assert released["x_inf_0:mean"].noise_std == pytest.approx(expected_std, rel=0.01)
    for name, expected in truth.items():
        v = released[name]
        # The spread's estimate is biased by the noise variance too; far below these bounds.
        assert abs(v.value - expected) <= 4.5 * v.noise_std + 1e-3, name
