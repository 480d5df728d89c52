"""Influence kinds: DP sensitivity by brute force, exact releases without noise, groupings,
prototypes that show no real record, planted mislabels, and refusals of bad requests.

Requests are built as a coordinator would: the public encoding, the model's name, the
released second-order factors (from the ``hessian`` or ``kfac`` kind itself, summed over
three sites without noise; for ``ekfac``, then the ``ekfac`` kind's corrections) with
their fingerprint and noised count, and a query encoded as a JSON list. Expected values
are computed directly with numpy from a logistic model fitted with Newton's method.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
from torch import nn

from explain import SiteContext, get_kind, l2_sensitivity
from explain.influence_setup import METHODS, InfluenceScorer
from explain.loo_unfairness import prediction_changes
from explain.per_record import per_record_gradients
from explain.second_order import model_fingerprint
from explain.second_order_kinds import released_factors
from explain.self_influence import DEFAULT_BINS as DEFAULT_SELF_BINS
from explain.self_influence import bin_index, rank_records
from fedlens.datasets import Preprocessor, load_dataset
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.models import build_model
from fedlens.types import ReleasedValue
from tests.explain.test_influence import fit_logistic, sigmoid, with_bias

SECOND_ORDER = ("hessian", "kfac", "ekfac")
INFLUENCE = (
    "group_influence",
    "site_contribution",
    "self_influence",
    "influence_prototypes",
    "loo_unfairness",
)
SITE_IDS = ("site-a", "site-b", "site-c")
FACTOR_CLIP = 1e4  # above every record's term: the released factors are exact
MU = 1.0  # the logistic models minimise sum BCE + (MU / 2) ||theta||^2
NO_CLIP = "1e9"  # an influence_clip no score reaches
KRONECKER = ("kfac", "ekfac")  # methods that score with an MLP's Kronecker factors
MODEL_NAMES = {"hessian": "logistic", "kfac": "mlp", "ekfac": "mlp"}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Hundreds of small solves and eigendecompositions: on two cores, extra BLAS and
    OpenMP threads only add overhead (a K-FAC contribution takes several times longer)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(previous)


# -- a federation and the requests a coordinator would send ---------------------------------------


@dataclass(frozen=True)
class Federation:
    name: str
    pre: Preprocessor
    sites: tuple[tuple[np.ndarray, np.ndarray], ...]  # per site: features (n, d), labels (n,)
    raw: tuple[Mapping[str, np.ndarray], ...]  # per site: raw feature columns
    validation: tuple[np.ndarray, np.ndarray]
    logistic: nn.Module  # float32, fitted to the pooled sites

    @property
    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.concatenate([x for x, _ in self.sites]),
            np.concatenate([y for _, y in self.sites]),
        )


def float32_logistic(theta: np.ndarray) -> nn.Module:
    model = build_model("logistic", theta.size - 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = theta[:-1] if name.endswith("weight") else theta[-1:]
            param.copy_(torch.as_tensor(value).reshape(param.shape))
    return model


def theta_of(model: nn.Module) -> np.ndarray:
    """``(w, b)`` of a logistic model, float64."""
    return np.concatenate([p.detach().double().numpy().reshape(-1) for p in model.parameters()])


@functools.lru_cache(maxsize=2)
def federation(name: str) -> Federation:
    """Three sites: breast_cancer's Dirichlet split, or 3 x 300 rows of adult."""
    ds = load_dataset(name)
    pre = ds.preprocessor
    names = [spec.name for spec in pre.schema.features]
    if name == "adult":
        frames = [ds.train.iloc[300 * i : 300 * (i + 1)] for i in range(3)]
        sites = tuple(
            (pre.transform(f).astype(np.float64), f[ds.schema.label].to_numpy()) for f in frames
        )
        raw = tuple({n: f[n].to_numpy() for n in names} for f in frames)
        test = ds.test.iloc[:200]
    else:
        data = [ds.site(i, 3, seed=0) for i in range(3)]
        sites = tuple((s.features.astype(np.float64), s.labels) for s in data)
        raw = tuple({n: s.frame[n].to_numpy() for n in names} for s in data)
        test = ds.test
    validation = (pre.transform(test).astype(np.float64), test[ds.schema.label].to_numpy())
    x = np.concatenate([x for x, _ in sites])
    y = np.concatenate([y for _, y in sites])
    model = float32_logistic(fit_logistic(x, y.astype(np.float64), MU))
    return Federation(name, pre, sites, raw, validation, model)


def layout_params(pre: Preprocessor) -> dict[str, str]:
    return {
        "feature_names": json.dumps(list(pre.encoded_names)),
        "groups": json.dumps({k: list(v) for k, v in pre.groups.items()}),
    }


def second_order_params(name: str) -> dict[str, str]:
    """A second-order request: the encoding and the model's name; for ``ekfac``, also the
    released K-FAC factors' parameters (their arrays come in the context)."""
    params = {**layout_params(federation("breast_cancer").pre), "model": MODEL_NAMES[name]}
    return {**scorer("kfac").params, **params} if name == "ekfac" else params


def release_factors(
    form: str,
    model_name: str,
    model: nn.Module,
    fed: Federation,
    request: Mapping[str, str] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, float]:
    """The coordinator's second-order round: every site contributes, no noise, released means.

    ``request`` and ``arrays``: the released K-FAC factors an ``ekfac`` round needs.
    """
    kind = get_kind(form)
    params = {**(request or {}), **layout_params(fed.pre), "model": model_name}
    labels = kind.coordinate_labels(fed.pre.encoded_names, fed.pre.groups, params)
    ctx = SiteContext(arrays=dict(arrays or {}))
    total = np.sum(
        [kind.contribute(model, x, y, params, FACTOR_CLIP, None, ctx).vector for x, y in fed.sites],
        axis=0,
    )
    post = kind.postprocess(total, 0.0, FACTOR_CLIP, labels, params)
    return released_factors(post.values, labels), post.noised_count


def boundary_query(model: nn.Module, records: np.ndarray) -> np.ndarray:
    """An input on the segment between two records whose logit is about +1e-3."""
    with torch.no_grad():
        logits = model(torch.as_tensor(records, dtype=torch.float32)).double().numpy()[:, 0]
    low, high = records[int(np.argmin(logits))], records[int(np.argmax(logits))]
    assert logits.min() < 0 < logits.max()

    def logit(t: float) -> float:
        point = torch.as_tensor(((1 - t) * low + t * high)[None, :], dtype=torch.float32)
        with torch.no_grad():
            return float(model(point)[0, 0])

    a, b = 0.0, 1.0
    for _ in range(60):
        mid = (a + b) / 2
        a, b = (mid, b) if logit(mid) < 1e-3 else (a, mid)
    return np.asarray((1 - b) * low + b * high)


@dataclass(frozen=True)
class Scorer:
    """A model and what a request about it carries: params and public arrays."""

    model: nn.Module
    params: Mapping[str, str]
    arrays: Mapping[str, np.ndarray]
    query: np.ndarray


@functools.lru_cache(maxsize=8)
def scorer(method: str, dataset: str = "breast_cancer") -> Scorer:
    fed = federation(dataset)
    if method == "ekfac":  # K-FAC's factors first, then a round of eigenvalue corrections
        base = scorer("kfac", dataset)
        corrections, _ = release_factors("ekfac", "mlp", base.model, fed, base.params, base.arrays)
        params = {**base.params, "method": "ekfac"}
        return Scorer(base.model, params, {**base.arrays, "ekfac": corrections}, base.query)
    model = fed.logistic if method != "kfac" else build_model("mlp", fed.pre.dimension, seed=1)
    params = {**layout_params(fed.pre), "model": "mlp" if method == "kfac" else "logistic"}
    params |= {"method": method, "sites": json.dumps(SITE_IDS), "noise": "local"}
    arrays: dict[str, np.ndarray] = {}
    if method == "tracin":
        theta = theta_of(model)
        rates = [0.1, 0.05]
        params["checkpoint_rates"] = json.dumps(rates)
        for t, factor in enumerate((0.5, 0.9)):
            arrays[f"checkpoint/{t}/linear.weight"] = (factor * theta[None, :-1]).astype(np.float32)
            arrays[f"checkpoint/{t}/linear.bias"] = (factor * theta[-1:]).astype(np.float32)
    else:
        mean, count = release_factors(method, params["model"], model, fed)
        arrays["second_order"] = mean
        params["second_order_fingerprint"] = model_fingerprint(model)
        params["second_order_count"] = repr(count)
        params["damping"] = repr(MU / count if method == "hessian" else 0.01)
    xv, yv = fed.validation
    # As the coordinator sends it: the mean loss gradient on its held-out split.
    arrays["validation_gradient"] = per_record_gradients(model, xv, yv).mean(axis=0)
    query = boundary_query(model, fed.pooled[0])
    return Scorer(model, params, arrays, query)


def request(method: str, dataset: str = "breast_cancer", **extra: str) -> dict[str, str]:
    s = scorer(method, dataset)
    return {**s.params, "query": json.dumps(s.query.tolist()), **extra}


def context(
    method: str, site: int = 0, *, dataset: str = "breast_cancer", breakdown: bool = True
) -> SiteContext:
    return SiteContext(
        site_id=SITE_IDS[site],
        site_ids=SITE_IDS,
        site_breakdown=breakdown,
        arrays=dict(scorer(method, dataset).arrays),
    )


def model_for(method: str) -> nn.Module:
    return scorer(method).model


def by_name(values: Sequence[ReleasedValue]) -> dict[str, ReleasedValue]:
    return {v.name: v for v in values}


def pooled_release(
    name: str,
    method: str,
    params: Mapping[str, str],
    clip: float,
    *,
    dataset: str = "breast_cancer",
    breakdown: Sequence[bool] = (True, True, True),
) -> tuple[dict[str, ReleasedValue], dict[str, ReleasedValue], float]:
    """Contribute at the three sites, sum, post-process without noise: values, grouped, count."""
    fed = federation(dataset)
    kind = get_kind(name)
    model = scorer(method, dataset).model
    labels = kind.coordinate_labels(fed.pre.encoded_names, fed.pre.groups, params)
    parts = [
        kind.contribute(
            model, x, y, params, clip, None, context(method, i, dataset=dataset, breakdown=b)
        )
        for i, ((x, y), b) in enumerate(zip(fed.sites, breakdown, strict=True))
    ]
    for part in parts:
        assert part.labels == labels
    post = kind.postprocess(np.sum([p.vector for p in parts], axis=0), 0.0, clip, labels, params)
    return by_name(post.values), by_name(post.grouped), post.noised_count


# -- direct computations for a logistic model -----------------------------------------------------


@dataclass(frozen=True)
class Direct:
    """Influence of a logistic model computed with numpy alone, in units of ``1 / N``."""

    theta: np.ndarray
    inverse: np.ndarray  # (H / N + lambda I)^{-1}
    count: float

    @classmethod
    def of(cls, fed: Federation) -> Direct:
        theta = theta_of(fed.logistic)
        xt = with_bias(fed.pooled[0])
        p = sigmoid(xt @ theta)
        n = float(xt.shape[0])
        hessian = (xt * (p * (1 - p))[:, None]).T @ xt / n + (MU / n) * np.eye(theta.size)
        return cls(theta, np.linalg.inv(hessian), n)

    def residual(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(sigmoid(with_bias(x) @ self.theta) - y)

    def prediction(self, x: np.ndarray, y: np.ndarray, query: np.ndarray) -> np.ndarray:
        direction = self.inverse @ with_bias(query[None, :])[0]
        return np.asarray(-self.residual(x, y) * (with_bias(x) @ direction))

    def own(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        xt = with_bias(x)
        return np.asarray(self.residual(x, y) ** 2 * np.einsum("ij,jk,ik->i", xt, self.inverse, xt))

    def loss(self, x: np.ndarray, y: np.ndarray, target: np.ndarray) -> np.ndarray:
        return np.asarray(self.residual(x, y) * (with_bias(x) @ (self.inverse @ target)))


def bin_of(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    return np.asarray(np.digitize(values, np.asarray(edges)) - 1)


# -- sensitivity: the DP guarantee, by brute force ------------------------------------------------

SENSITIVITY_CASES = [(name, name) for name in SECOND_ORDER] + [
    (name, method) for name in INFLUENCE for method in METHODS
]


def sensitivity_setup(name: str, method: str) -> tuple[nn.Module, dict[str, str], float]:
    """Model, params and clip bound that make clipping bind for most records.

    The second-order kinds get a float64 copy of their model here, so that the check is
    about clipping and scaling; the float32 model a site holds is checked by
    test_the_bound_holds_for_the_float32_model_a_site_holds.
    """
    if name in SECOND_ORDER:
        params = second_order_params(name)
        return copy.deepcopy(model_for(name)).double(), params, 0.05
    return model_for(method), request(method, influence_clip="1e-3", k="5"), 1.0


def moves(
    name: str,
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    params: Mapping[str, str],
    clip: float,
    ctx: SiteContext | None,
) -> np.ndarray:
    """``(n,)``: how far the site's vector moves when each one of its records is removed."""
    kind = get_kind(name)
    full = kind.contribute(model, x, y, params, clip, None, ctx).vector
    return np.array(
        [
            np.linalg.norm(
                full
                - kind.contribute(
                    model, np.delete(x, i, 0), np.delete(y, i), params, clip, None, ctx
                ).vector
            )
            for i in range(x.shape[0])
        ]
    )


@pytest.mark.parametrize(("name", "method"), SENSITIVITY_CASES)
def test_removing_any_one_record_moves_the_contribution_by_at_most_sqrt2_clip(
    name: str, method: str
) -> None:
    x, y = federation("breast_cancer").sites[0]
    n = 12 if method in KRONECKER else 40  # Kronecker scoring costs more per call
    x, y = x[:n], y[:n]
    model, params, clip = sensitivity_setup(name, method)
    move = moves(name, model, x, y, params, clip, context(method)).max()
    bound = l2_sensitivity(clip)
    assert move <= bound * (1 + 1e-12)
    # The bound is reached (clipping binds, a record flips a probe...), so a term scaled
    # any larger than it should be would break it.
    floor = 0.1 if name == "influence_prototypes" else 0.999
    assert move >= floor * bound


@pytest.mark.parametrize(
    ("name", "method"),
    [c for c in SENSITIVITY_CASES if c[0] in SECOND_ORDER or c[1] not in KRONECKER],
)
def test_the_bound_holds_for_arbitrary_finite_records(name: str, method: str) -> None:
    """Sites' records are not checked to be encoded: the guarantee must not rely on it."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 30)) * rng.choice([0.1, 1.0, 5.0], size=(20, 1))
    y = (rng.random(20) < 0.5).astype(np.int64)
    model, params, clip = sensitivity_setup(name, method)
    move = moves(name, model, x, y, params, clip, context(method)).max()
    assert move <= l2_sensitivity(clip) * (1 + 1e-12)


@pytest.mark.parametrize("name", SECOND_ORDER)
def test_the_bound_holds_for_the_float32_model_a_site_holds(name: str) -> None:
    _, params, clip = sensitivity_setup(name, name)
    model = model_for(name)
    assert next(model.parameters()).dtype == torch.float32
    rng = np.random.default_rng(5)
    pooled = federation("breast_cancer").pooled[0]
    # Which batch sizes round differently depends on the BLAS kernels: try several.
    sites = [pooled[:n] for n in (3, 4, 10, 60)] + [
        rng.normal(size=(n, 30)) * rng.choice([0.1, 1.0, 5.0], size=(n, 1)) for n in (4, 10, 30)
    ]
    ctx = context(name)
    worst = max(
        moves(name, model, x, np.zeros(x.shape[0], dtype=np.int64), params, clip, ctx).max()
        for x in sites
    )
    assert worst <= l2_sensitivity(clip) * (1 + 1e-12)


def test_prototype_sensitivity_is_reached_with_antipodal_records_and_never_exceeded() -> None:
    """The worst case of the sum of top-k rows: the record that replaces a removed proponent
    sits at the opposite end of the ball of radius R."""
    s = scorer("hessian")
    radius = math.sqrt(30)
    w = theta_of(s.model)[:-1]
    u = w / np.linalg.norm(w)
    kind = get_kind("influence_prototypes")
    params = request("hessian", k="5")
    ctx = context("hessian")
    # Four kinds of records: +R u or -R u, label 0 or 1; find how the scorer ranks them.
    kinds = [(sign, label) for sign in (1.0, -1.0) for label in (0, 1)]
    probe = np.stack([sign * radius * u for sign, _ in kinds])
    scores = InfluenceScorer.from_request(s.model, params, ctx).prediction(
        probe, np.array([label for _, label in kinds]), s.query[None, :]
    )[:, 0]
    ranked = [kinds[i] for i in np.argsort(-scores)]
    assert ranked[0][0] == -ranked[1][0]  # the two strongest proponents are antipodal
    sizes = (5, 3, 3, 5)
    x = np.concatenate(
        [np.tile(sign * radius * u, (n, 1)) for (sign, _), n in zip(ranked, sizes, strict=True)]
    )
    y = np.concatenate([np.full(n, label) for (_, label), n in zip(ranked, sizes, strict=True)])
    move = moves("influence_prototypes", s.model, x, y, params, 1.0, ctx).max()
    np.testing.assert_allclose(move, l2_sensitivity(1.0), rtol=1e-6)
    assert kind.contribute(s.model, x, y, params, 1.0, None, ctx).vector[-1] == 5.0


# -- coordinates ----------------------------------------------------------------------------------


COORDINATE_CASES = [(n, n, "label") for n in SECOND_ORDER] + [
    (n, "hessian", g) for n in INFLUENCE for g in ("label", "mean radius")
]


@pytest.mark.parametrize(("name", "method", "group_by"), COORDINATE_CASES)
def test_a_contribution_has_one_coordinate_per_label_and_the_count(
    name: str, method: str, group_by: str
) -> None:
    fed = federation("breast_cancer")
    x, y = fed.sites[1]
    params = (
        second_order_params(name) if name in SECOND_ORDER else request(method, group_by=group_by)
    )
    kind = get_kind(name)
    labels = kind.coordinate_labels(fed.pre.encoded_names, fed.pre.groups, params)
    contribution = kind.contribute(model_for(method), x, y, params, 1.0, None, context(method, 1))
    assert contribution.labels == labels
    assert contribution.vector.shape == (len(labels) + 1,)
    assert len(set(labels)) == len(labels)
    assert np.all(np.isfinite(contribution.vector))
    expected_count = 10 if name == "influence_prototypes" else x.shape[0]  # k defaults to 10
    assert contribution.count == expected_count
    assert contribution.vector[-1] == pytest.approx(expected_count * 1.0)


def test_group_labels_follow_the_grouping() -> None:
    fed = federation("adult")
    kind = get_kind("group_influence")
    params = request("hessian", "adult")
    labels = kind.coordinate_labels(
        fed.pre.encoded_names, fed.pre.groups, {**params, "group_by": "race"}
    )
    races = [n for n in fed.pre.encoded_names if n.startswith("race=")]
    assert labels == (
        *(f"{g}/influence" for g in [*races, "race=(other)"]),
        *(f"{g}/count" for g in [*races, "race=(other)"]),
    )
    quartiles = kind.coordinate_labels(
        fed.pre.encoded_names, fed.pre.groups, {**params, "group_by": "age"}
    )
    assert quartiles[:4] == tuple(
        f"age in {q}/influence" for q in ("[0, 0.25)", "[0.25, 0.5)", "[0.5, 0.75)", "[0.75, 1]")
    )
    sites = kind.coordinate_labels(
        fed.pre.encoded_names, fed.pre.groups, {**params, "group_by": "site"}
    )
    assert sites[:4] == (*(f"{s}/influence" for s in SITE_IDS), "(withheld)/influence")


# -- group_influence: exact without noise ---------------------------------------------------------


def adult_groups(fed: Federation, key: str, site: int) -> list[str]:
    """Each record's group name, from the raw columns (not the encoding)."""
    x, y = fed.sites[site]
    if key == "label":
        return [f"label={v}" for v in y]
    if key == "site":
        return [SITE_IDS[site]] * len(y)
    if key == "age":
        col = fed.pre.encoded_names.index("age")
        quartiles = ("[0, 0.25)", "[0.25, 0.5)", "[0.5, 0.75)", "[0.75, 1]")
        return [f"age in {quartiles[min(int(v * 4), 3)]}" for v in x[:, col]]
    return [f"{key}={v}" if isinstance(v, str) else f"{key}=(other)" for v in fed.raw[site][key]]


@pytest.mark.parametrize("group_by", ["label", "race", "workclass", "age", "site"])
def test_group_influence_sums_to_the_federations_influence_without_noise(group_by: str) -> None:
    fed = federation("adult")
    s = scorer("hessian", "adult")
    direct = Direct.of(fed)
    params = request("hessian", "adult", group_by=group_by, influence_clip=NO_CLIP)
    values, grouped, count = pooled_release(
        "group_influence", "hessian", params, 2.0, dataset="adult"
    )
    assert count == pytest.approx(900)

    expected_total: dict[str, float] = {}
    expected_count: dict[str, int] = {}
    for site, (x, y) in enumerate(fed.sites):
        scores = direct.prediction(x, y, s.query)
        for g, score in zip(adult_groups(fed, group_by, site), scores, strict=True):
            expected_total[g] = expected_total.get(g, 0.0) + score / direct.count
            expected_count[g] = expected_count.get(g, 0) + 1
    assert len(expected_total) >= 2
    released = {
        k[: -len("/influence")]: v.value for k, v in values.items() if k.endswith("/influence")
    }
    for g, total in expected_total.items():
        assert released[g] == pytest.approx(total, rel=1e-4, abs=1e-7)
        assert values[f"{g}/count"].value == pytest.approx(expected_count[g])
        assert grouped[f"{g}/mean"].value == pytest.approx(
            total * direct.count / expected_count[g], rel=1e-4, abs=1e-6
        )
    for g in set(released) - set(expected_total):  # groups nobody falls in release zero
        assert released[g] == pytest.approx(0.0, abs=1e-9)
        assert values[f"{g}/count"].value == pytest.approx(0.0, abs=1e-9)
    # The groups add up to the influence of all records: the total logit push.
    everything = sum(direct.prediction(x, y, s.query).sum() for x, y in fed.sites) / direct.count
    assert sum(released.values()) == pytest.approx(everything, rel=1e-4)
    assert abs(everything) > 1e-3


def test_the_default_influence_clip_binds_on_large_scores() -> None:
    """With the default clip B = 10 the released total is the sum of clipped scores."""
    fed = federation("adult")
    s = scorer("hessian", "adult")
    direct = Direct.of(fed)
    params = request("hessian", "adult", group_by="label")
    values, _, _ = pooled_release("group_influence", "hessian", params, 1.0, dataset="adult")
    scores = np.concatenate([direct.prediction(x, y, s.query) for x, y in fed.sites])
    labels = fed.pooled[1]
    assert np.abs(scores).max() > 10  # clipping is active
    for label in (0, 1):
        expected = np.clip(scores[labels == label], -10, 10).sum() / direct.count
        assert values[f"label={label}/influence"].value == pytest.approx(
            expected, rel=1e-4, abs=1e-7
        )


def test_a_site_whose_policy_denies_a_breakdown_is_withheld() -> None:
    fed = federation("adult")
    s = scorer("hessian", "adult")
    direct = Direct.of(fed)
    params = request("hessian", "adult", group_by="site", influence_clip=NO_CLIP)
    values, _, _ = pooled_release(
        "group_influence", "hessian", params, 1.0, dataset="adult", breakdown=(True, False, False)
    )
    per_site = [direct.prediction(x, y, s.query).sum() / direct.count for x, y in fed.sites]
    assert values["site-a/influence"].value == pytest.approx(per_site[0], rel=1e-4)
    assert values["(withheld)/influence"].value == pytest.approx(
        per_site[1] + per_site[2], rel=1e-4
    )
    assert values["site-b/count"].value == pytest.approx(0.0, abs=1e-9)
    assert values["site-c/influence"].value == pytest.approx(0.0, abs=1e-12)
    assert values["(withheld)/count"].value == pytest.approx(600)


def test_a_site_not_in_the_rounds_list_is_withheld() -> None:
    kind = get_kind("group_influence")
    x, y = federation("breast_cancer").sites[0]
    params = request("hessian", group_by="site")
    ctx = replace(context("hessian"), site_id="site-z")
    vector = kind.contribute(scorer("hessian").model, x, y, params, 1.0, None, ctx).vector
    # Coordinates: 4 sums (3 sites + withheld), 4 counts, the record count.
    assert np.count_nonzero(vector[4:8]) == 1 and vector[7] > 0


@pytest.mark.parametrize("name", ["group_influence", "site_contribution"])
def test_a_breakdown_by_site_is_refused_unless_noise_is_local(name: str) -> None:
    fed = federation("breast_cancer")
    kind = get_kind(name)
    params = request("hessian", group_by="site", noise="distributed")
    with pytest.raises(ConfigurationError, match="local noise only"):
        kind.coordinate_labels(fed.pre.encoded_names, fed.pre.groups, params)
    x, y = fed.sites[0]
    with pytest.raises(ConfigurationError, match="local noise only"):
        kind.contribute(scorer("hessian").model, x, y, params, 1.0, None, context("hessian"))


def test_grouping_by_site_needs_to_know_the_site() -> None:
    x, y = federation("breast_cancer").sites[0]
    params = request("hessian", group_by="site")
    ctx = SiteContext(arrays=dict(scorer("hessian").arrays))  # no site_id
    with pytest.raises(ExplanationError, match="which site"):
        get_kind("group_influence").contribute(
            scorer("hessian").model, x, y, params, 1.0, None, ctx
        )


# -- site_contribution ----------------------------------------------------------------------------


def test_site_contribution_is_each_sites_influence_on_the_validation_loss() -> None:
    fed = federation("breast_cancer")
    s = scorer("hessian")
    direct = Direct.of(fed)
    xv, yv = fed.validation
    target = with_bias(xv).T @ direct.residual(xv, yv) / xv.shape[0]  # mean loss gradient
    params = request("hessian", influence_clip=NO_CLIP)
    values, _, count = pooled_release("site_contribution", "hessian", params, 1.0)
    assert count == pytest.approx(fed.pooled[0].shape[0])
    for site, (x, y) in zip(SITE_IDS, fed.sites, strict=True):
        expected = direct.loss(x, y, target).sum() / direct.count
        assert values[f"{site}/value"].value == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert values[f"{site}/count"].value == pytest.approx(x.shape[0])
    assert values["(withheld)/count"].value == pytest.approx(0.0, abs=1e-9)
    assert np.allclose(s.arrays["validation_gradient"], target, rtol=1e-4, atol=1e-6)


# -- hessian and kfac: exact without noise --------------------------------------------------------


def test_the_hessian_release_is_the_mean_gauss_newton_matrix() -> None:
    fed = federation("breast_cancer")
    direct = Direct.of(fed)
    xt = with_bias(fed.pooled[0])
    p = sigmoid(xt @ direct.theta)
    mean = (xt * (p * (1 - p))[:, None]).T @ xt / xt.shape[0]
    params = {**layout_params(fed.pre), "model": "logistic"}
    values, _, count = pooled_release("hessian", "hessian", params, FACTOR_CLIP)
    assert count == pytest.approx(xt.shape[0])
    assert values["H[0,0]"].value == pytest.approx(mean[0, 0], rel=1e-5)
    assert values["H[3,30]"].value == pytest.approx(math.sqrt(2) * mean[3, 30], rel=1e-5)
    # The request-side factors are those same values.
    packed = scorer("hessian").arrays["second_order"]
    iu = np.triu_indices(31, 1)
    np.testing.assert_allclose(packed[:31], np.diag(mean), rtol=1e-5)
    np.testing.assert_allclose(packed[31:], math.sqrt(2) * mean[iu], rtol=1e-5, atol=1e-9)


def test_the_kfac_release_is_the_mean_of_each_records_factors() -> None:
    fed = federation("breast_cancer")
    params = {**layout_params(fed.pre), "model": "mlp"}
    values, _, count = pooled_release("kfac", "kfac", params, FACTOR_CLIP)
    x = fed.pooled[0]
    assert count == pytest.approx(x.shape[0])
    xt = with_bias(x)
    first = xt.T @ xt / x.shape[0]  # layer 0's A: inputs with a trailing 1
    assert values["layers.0/A[0,0]"].value == pytest.approx(first[0, 0], rel=1e-6)
    assert values["layers.0/A[2,30]"].value == pytest.approx(math.sqrt(2) * first[2, 30], rel=1e-6)
    assert values["layers.0/A[30,30]"].value == pytest.approx(1.0, rel=1e-9)
    assert values["layers.2/A[32,32]"].value == pytest.approx(1.0, rel=1e-9)
    assert values["layers.2/G[0,0]"].value > 0


def test_second_order_noise_std_is_that_of_a_mean() -> None:
    """The stated std of a released factor entry matches the spread of repeated releases."""
    fed = federation("breast_cancer")
    kind = get_kind("hessian")
    params = second_order_params("hessian")
    labels = kind.coordinate_labels(fed.pre.encoded_names, fed.pre.groups, params)
    x, y = fed.sites[0]
    vector = kind.contribute(model_for("hessian"), x, y, params, 2.0).vector
    rng = np.random.default_rng(0)
    std = 3.0
    draws = [
        kind.postprocess(vector + rng.normal(0, std, vector.size), std, 2.0, labels, params)
        for _ in range(200)
    ]
    first = np.array([d.values[0].value for d in draws])
    assert draws[0].values[0].noise_std == pytest.approx(std / draws[0].noised_count)
    assert first.std() == pytest.approx(std / x.shape[0], rel=0.2)
    assert first.mean() == pytest.approx(vector[0] / x.shape[0], abs=3 * std / x.shape[0])


# -- influence_prototypes -------------------------------------------------------------------------


def test_prototypes_are_the_mean_of_each_sites_top_k_records_without_noise() -> None:
    fed = federation("breast_cancer")
    s = scorer("hessian")
    direct = Direct.of(fed)
    k = 5
    params = request("hessian", k=str(k))
    values, _, count = pooled_release("influence_prototypes", "hessian", params, 1.0)
    assert count == pytest.approx(3 * k)
    tops, bottoms = [], []
    for x, y in fed.sites:
        order = np.argsort(-direct.prediction(x, y, s.query), kind="stable")
        tops.append(x[order[:k]])
        bottoms.append(x[order[-k:]])
    for side, rows in (("proponents", tops), ("opponents", bottoms)):
        expected = np.concatenate(rows).mean(axis=0)
        released = np.array([values[f"{side}/{n}"].value for n in fed.pre.encoded_names])
        np.testing.assert_allclose(released, expected, rtol=1e-9, atol=1e-12)
    proponents = np.array([values[f"proponents/{n}"].value for n in fed.pre.encoded_names])
    opponents = np.array([values[f"opponents/{n}"].value for n in fed.pre.encoded_names])
    assert np.linalg.norm(proponents - opponents) > 0.1


@pytest.mark.parametrize("method", ["hessian", "tracin"])
def test_released_prototypes_are_no_real_record(method: str) -> None:
    fed = federation("breast_cancer")
    params = request(method, k="5")
    values, _, _ = pooled_release("influence_prototypes", method, params, 1.0)
    x = np.concatenate([fed.pooled[0], fed.validation[0]])
    for side in ("proponents", "opponents"):
        released = np.array([values[f"{side}/{n}"].value for n in fed.pre.encoded_names])
        nearest = np.linalg.norm(x - released, axis=1).min()
        assert nearest > 0.1, f"{side} lie {nearest:.3g} from a real record"


def test_prototype_noise_std_is_honest() -> None:
    fed = federation("breast_cancer")
    kind = get_kind("influence_prototypes")
    params = request("hessian", k="5")
    labels = kind.coordinate_labels(fed.pre.encoded_names, fed.pre.groups, params)
    vector = np.sum(
        [
            kind.contribute(
                scorer("hessian").model, x, y, params, 1.0, None, context("hessian", i)
            ).vector
            for i, (x, y) in enumerate(fed.sites)
        ],
        axis=0,
    )
    rng = np.random.default_rng(1)
    std = 0.05
    draws = np.array(
        [
            [
                v.value
                for v in kind.postprocess(
                    vector + rng.normal(0, std, vector.size), std, 1.0, labels, params
                ).values[:3]
            ]
            for _ in range(600)
        ]
    )
    stated = kind.postprocess(vector, std, 1.0, labels, params).values[0].noise_std
    # Mid-range columns (not clipped at 0 or 1): the spread is the stated std.
    clean = kind.postprocess(vector, 0.0, 1.0, labels, params).values[:3]
    for j, value in enumerate(clean):
        if 0.2 < value.value < 0.8:
            assert draws[:, j].std() == pytest.approx(stated, rel=0.15)


# -- self_influence: planted mislabels ------------------------------------------------------------


@dataclass(frozen=True)
class Planted:
    x: np.ndarray
    y: np.ndarray  # with the planted flips
    flipped: np.ndarray  # indices
    model: nn.Module
    params: dict[str, str]
    arrays: dict[str, np.ndarray]


@functools.lru_cache(maxsize=1)
def planted() -> Planted:
    fed = federation("breast_cancer")
    x, y = fed.pooled
    clean = fit_logistic(x, y.astype(np.float64), MU)
    margin = (2 * y - 1) * (with_bias(x) @ clean)
    # Eight records the clean model gets right with confidence, spread over the top 200.
    flipped = np.sort(np.argsort(-margin)[:200][::25])
    y_planted = y.copy()
    y_planted[flipped] = 1 - y_planted[flipped]
    model = float32_logistic(fit_logistic(x, y_planted.astype(np.float64), MU))
    split = Federation(fed.name, fed.pre, ((x, y_planted),), fed.raw, fed.validation, model)
    mean, count = release_factors("hessian", "logistic", model, split)
    params = {
        **layout_params(fed.pre),
        "model": "logistic",
        "method": "hessian",
        "second_order_fingerprint": model_fingerprint(model),
        "second_order_count": repr(count),
        "damping": repr(MU / count),
    }
    return Planted(x, y_planted, flipped, model, params, {"second_order": mean})


def test_planted_flipped_labels_land_in_the_top_bins() -> None:
    """Eight confidently classified records get the wrong label before training: a site
    holding only them puts every one in the top bin; the clean records almost never."""
    case = planted()
    kind = get_kind("self_influence")
    edges = (0.0, 1.0, 10.0, 30.0)
    params = {**case.params, "bins": json.dumps(edges), "group_by": "label", "suspicious": "30"}
    ctx = SiteContext(site_id="site-a", site_ids=("site-a",), arrays=case.arrays)
    is_flipped = np.zeros(case.y.size, dtype=bool)
    is_flipped[case.flipped] = True
    per_bin = {}
    for name, rows in (("planted", is_flipped), ("clean", ~is_flipped)):
        vector = kind.contribute(
            case.model, case.x[rows], case.y[rows], params, 1.0, None, ctx
        ).vector
        per_bin[name] = vector[:-1].reshape(2, len(edges)).sum(axis=0)  # over the two labels
    assert per_bin["planted"][-1] == len(case.flipped) == 8
    assert per_bin["clean"][-1] <= 0.01 * (~is_flipped).sum()
    assert per_bin["clean"][:2].sum() >= 0.85 * (~is_flipped).sum()


def test_self_influence_histogram_is_exact_without_noise() -> None:
    fed = federation("breast_cancer")
    direct = Direct.of(fed)
    params = request("hessian", group_by="label")
    values, grouped, count = pooled_release("self_influence", "hessian", params, 1.0)
    x, y = fed.pooled
    scores = direct.own(x, y)
    edges = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    bins = bin_of(scores, edges)
    names = [f"[{a:g}, {b:g})" for a, b in zip(edges, [*edges[1:], math.inf], strict=True)]
    names[-1] = "[30, inf)"
    assert count == pytest.approx(x.shape[0])
    for label in (0, 1):
        for k, name in enumerate(names):
            expected = int(np.sum((bins == k) & (y == label)))
            assert values[f"label={label}/{name}"].value == pytest.approx(expected, abs=1e-9)
        share = float(np.mean(scores[y == label] >= 1.0))
        assert grouped[f"label={label}/share>=1"].value == pytest.approx(share)


# -- loo_unfairness -------------------------------------------------------------------------------


def test_loo_unfairness_histogram_and_flips_are_exact_without_noise() -> None:
    fed = federation("breast_cancer")
    s = scorer("hessian")
    direct = Direct.of(fed)
    probes = np.stack([s.query, fed.validation[0][0], fed.validation[0][1]])
    params = request("hessian", query=json.dumps(probes.tolist()))
    values, grouped, count = pooled_release("loo_unfairness", "hessian", params, 1.0)
    x, y = fed.pooled
    logits = with_bias(probes) @ direct.theta
    without = (
        logits[None, :]
        - np.stack([direct.prediction(x, y, q) for q in probes], axis=1) / direct.count
    )
    change = np.abs(sigmoid(logits)[None, :] - sigmoid(without)).max(axis=1)
    flips = ((without > 0) != (logits > 0)[None, :]).any(axis=1)
    edges = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    bins = bin_of(change, edges)
    assert count == pytest.approx(x.shape[0])
    assert 0 < flips.sum() < x.shape[0]  # the boundary probe flips for some records
    for k, (a, b) in enumerate(zip(edges, [*edges[1:], 1], strict=True)):
        assert values[f"change in [{a:g}, {b:g})"].value == pytest.approx(
            np.sum(bins == k), abs=1e-6
        )
    assert values["flips"].value == pytest.approx(flips.sum(), abs=1e-6)
    assert grouped["flip_share"].value == pytest.approx(flips.mean())


def test_prediction_changes_flip_only_when_a_probe_crosses_the_boundary() -> None:
    logits = np.array([0.0, 1.0])
    scores = np.array([[-0.5, 0.0], [0.0, 0.5]])
    change, flips = prediction_changes(logits, scores, 1.0)
    # Removing a record moves each probe's logit by minus its score.
    expected = sigmoid(np.array([0.5, 1.0])) - sigmoid(np.array([0.0, 0.5]))
    np.testing.assert_allclose(change, expected, rtol=1e-12)
    # Record 0: probe 0 goes from 0 (class 0) to 0.5 (class 1). Record 1: probe 1 stays
    # positive (1 -> 0.5), probe 0 stays at 0.
    assert flips.tolist() == [True, False]
    # Scores are in units of 1 / count.
    np.testing.assert_allclose(prediction_changes(logits, scores * 4, 4.0)[0], change)


def test_a_score_on_a_bin_edge_falls_in_the_bin_above() -> None:
    edges = np.asarray(DEFAULT_SELF_BINS)
    scores = np.array([0.0, 0.0099, 0.01, 1.0, 29.9, 30.0, 1e6])
    assert bin_index(scores, edges).tolist() == [0, 0, 1, 5, 7, 8, 8]


def test_rank_records_lists_the_most_self_influential_first() -> None:
    scores = np.array([0.5, 3.0, 3.0, 0.1])
    losses = np.array([0.2, 0.1, 0.9, 5.0])
    ranked = rank_records(scores, losses, np.array([0, 1, 0, 1]), 3)
    assert [r.position for r in ranked] == [2, 1, 0]  # the tie at 3.0 goes to the larger loss
    assert ranked[0].label == 0 and ranked[0].self_influence == 3.0 and ranked[0].loss == 0.9
    with pytest.raises(ConfigurationError, match="top must be >= 1"):
        rank_records(scores, losses, np.zeros(4, dtype=np.int64), 0)


# -- refusals -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    name: str
    method: str
    model: nn.Module
    x: np.ndarray
    y: np.ndarray
    params: dict[str, str]
    ctx: SiteContext

    def run(self) -> None:
        get_kind(self.name).contribute(self.model, self.x, self.y, self.params, 1.0, None, self.ctx)


def call(name: str, method: str = "hessian") -> Call:
    x, y = federation("breast_cancer").sites[0]
    x, y = x[:40].copy(), y[:40].copy()
    if name in SECOND_ORDER:
        method, params = name, second_order_params(name)
    else:
        params = request(method, k="5")
    return Call(name, method, model_for(method), x, y, params, context(method))


def with_params(c: Call, **extra: str) -> Call:
    return replace(c, params={**c.params, **extra})


def with_arrays(c: Call, arrays: Mapping[str, np.ndarray]) -> Call:
    return replace(c, ctx=replace(c.ctx, arrays=dict(arrays)))


def nan_feature(c: Call) -> Call:
    x = c.x.copy()
    x[3, 2] = np.nan
    return replace(c, x=x)


def infinite_feature(c: Call) -> Call:
    x = c.x.copy()
    x[0, 0] = -np.inf
    return replace(c, x=x)


def bad_label(c: Call) -> Call:
    y = c.y.copy()
    y[5] = 2
    return replace(c, y=y)


def stale(c: Call) -> Call:
    other = build_model("logistic", 30, seed=7)
    return with_params(c, second_order_fingerprint=model_fingerprint(other))


def no_factors(c: Call) -> Call:
    return with_arrays(c, {k: v for k, v in c.ctx.arrays.items() if k != "second_order"})


def no_fingerprint(c: Call) -> Call:
    return replace(c, params={k: v for k, v in c.params.items() if k != "second_order_fingerprint"})


def short_factors(c: Call) -> Call:
    return with_arrays(c, {**c.ctx.arrays, "second_order": c.ctx.arrays["second_order"][:-1]})


QUERY_KINDS = ("group_influence", "influence_prototypes", "loo_unfairness")
ONE_QUERY_KINDS = ("group_influence", "influence_prototypes")
GROUPED_KINDS = ("group_influence", "self_influence")

REFUSALS: list[tuple[str, tuple[str, ...], Callable[[Call], Call], type[Exception], str]] = [
    (
        "query of the wrong shape",
        QUERY_KINDS,
        lambda c: with_params(c, query=json.dumps([0.5] * 29)),
        ConfigurationError,
        "30 encoded values",
    ),
    (
        "query as a matrix of the wrong width",
        QUERY_KINDS,
        lambda c: with_params(c, query=json.dumps([[0.5] * 31])),
        ConfigurationError,
        "30 encoded values",
    ),
    (
        "NaN in the query",
        QUERY_KINDS,
        lambda c: with_params(c, query=json.dumps([math.nan] + [0.5] * 29)),
        ConfigurationError,
        "NaN or infinite",
    ),
    (
        "query that is not JSON",
        QUERY_KINDS,
        lambda c: with_params(c, query="[0.5, "),
        ConfigurationError,
        "JSON list",
    ),
    (
        "no query",
        QUERY_KINDS,
        lambda c: replace(c, params={k: v for k, v in c.params.items() if k != "query"}),
        ConfigurationError,
        "has none",
    ),
    (
        "two queries",
        ONE_QUERY_KINDS,
        lambda c: with_params(c, query=json.dumps([[0.5] * 30] * 2)),
        ConfigurationError,
        "one query",
    ),
    (
        "unknown group key",
        GROUPED_KINDS,
        lambda c: with_params(c, group_by="blood type"),
        ConfigurationError,
        "'blood type' is not a feature",
    ),
    (
        "k larger than the records allow",
        ("influence_prototypes",),
        lambda c: with_params(c, k="20"),
        ExplanationError,
        "k = 20 needs at least 41 records",
    ),
    (
        "k that is not a positive integer",
        ("influence_prototypes",),
        lambda c: with_params(c, k="0"),
        ConfigurationError,
        "k must be >= 1",
    ),
    ("stale second-order factors", (*INFLUENCE, "ekfac"), stale, ExplanationError, "stale"),
    (
        "missing factors",
        (*INFLUENCE, "ekfac"),
        no_factors,
        ExplanationError,
        "needs released (hessian|kfac) factors",
    ),
    (
        "missing fingerprint",
        (*INFLUENCE, "ekfac"),
        no_fingerprint,
        ExplanationError,
        "needs released (hessian|kfac) factors",
    ),
    (
        "factors of the wrong length",
        INFLUENCE,
        short_factors,
        ExplanationError,
        "a Hessian of this model has 496 packed values",
    ),
    (
        "K-FAC factors of the wrong length",
        ("ekfac",),
        short_factors,
        ExplanationError,
        "K-FAC factors of this model have 1586 packed values",
    ),
    (
        "NaN in the features",
        INFLUENCE + SECOND_ORDER,
        nan_feature,
        ExplanationError,
        "NaN or infinite",
    ),
    (
        "infinite features",
        INFLUENCE + SECOND_ORDER,
        infinite_feature,
        ExplanationError,
        "NaN or infinite",
    ),
    ("a label that is not 0/1", INFLUENCE, bad_label, ExplanationError, "labels must be 0 or 1"),
    (
        "unknown method",
        INFLUENCE,
        lambda c: with_params(c, method="newton"),
        ConfigurationError,
        "unknown method 'newton'",
    ),
    (
        "damping that is not positive",
        INFLUENCE,
        lambda c: with_params(c, damping="-1"),
        ConfigurationError,
        "damping must be finite and > 0",
    ),
]

REFUSAL_CASES = [
    pytest.param(name, mutate, error, message, id=f"{name}: {what}")
    for what, names, mutate, error, message in REFUSALS
    for name in names
]


@pytest.mark.parametrize(("name", "mutate", "error", "message"), REFUSAL_CASES)
def test_bad_requests_are_refused_with_a_message_naming_the_problem(
    name: str, mutate: Callable[[Call], Call], error: type[Exception], message: str
) -> None:
    c = call(name)
    c.run()  # the unmodified request is accepted
    with pytest.raises(error, match=message):
        mutate(c).run()


@pytest.mark.parametrize("name", SECOND_ORDER)
@pytest.mark.parametrize("clip", [math.inf, 0.0, -1.0])
def test_second_order_kinds_refuse_a_clip_bound_that_is_not_finite_and_positive(
    name: str, clip: float
) -> None:
    c = call(name)
    with pytest.raises(ConfigurationError, match="clip bound must be finite and > 0"):
        get_kind(name).contribute(c.model, c.x, c.y, c.params, clip, None, c.ctx)


@pytest.mark.parametrize("name", INFLUENCE)
def test_the_ekfac_method_needs_corrections_that_fit(name: str) -> None:
    c = call(name, "ekfac")
    c.run()
    without = with_arrays(c, {k: v for k, v in c.ctx.arrays.items() if k != "ekfac"})
    with pytest.raises(ExplanationError, match="needs released eigenvalue corrections"):
        without.run()
    short = with_arrays(c, {**c.ctx.arrays, "ekfac": c.ctx.arrays["ekfac"][:-1]})
    with pytest.raises(ExplanationError, match="EK-FAC needs 1025 finite eigenvalues"):
        short.run()
    corrections = c.ctx.arrays["ekfac"].copy()
    corrections[7] = np.nan
    with pytest.raises(ExplanationError, match="EK-FAC needs 1025 finite eigenvalues"):
        with_arrays(c, {**c.ctx.arrays, "ekfac": corrections}).run()


def test_site_contribution_needs_the_validation_gradient() -> None:
    c = call("site_contribution")
    call_without = with_arrays(c, {"second_order": c.ctx.arrays["second_order"]})
    with pytest.raises(ExplanationError, match="validation-loss gradient: 31 finite values"):
        call_without.run()
    wrong = with_arrays(c, {**c.ctx.arrays, "validation_gradient": np.zeros(30)})
    with pytest.raises(ExplanationError, match="validation-loss gradient"):
        wrong.run()


def test_tracin_refuses_missing_or_malformed_checkpoints() -> None:
    c = call("group_influence", "tracin")
    c.run()
    with pytest.raises(ExplanationError, match=r"lacks parameter 'linear\.bias'"):
        with_arrays(
            c, {k: v for k, v in c.ctx.arrays.items() if k != "checkpoint/1/linear.bias"}
        ).run()
    with pytest.raises(ExplanationError, match="positive learning rates"):
        with_params(c, checkpoint_rates="[]").run()
    with pytest.raises(ConfigurationError, match="checkpoint_rates must be a JSON list"):
        with_params(c, checkpoint_rates="fast").run()
    bad = {**c.ctx.arrays, "checkpoint/0/linear.weight": np.zeros((1, 29), dtype=np.float32)}
    with pytest.raises(ExplanationError, match="shape"):
        with_arrays(c, bad).run()


@pytest.mark.parametrize(
    ("name", "extra", "error", "message"),
    [
        (
            "group_influence",
            {"query": json.dumps([0.5] * 29)},
            ConfigurationError,
            "30 encoded values",
        ),
        (
            "influence_prototypes",
            {"query": json.dumps([math.inf] * 30)},
            ConfigurationError,
            "NaN or infinite",
        ),
        (
            "loo_unfairness",
            {"query": json.dumps([0.5] * 31)},
            ConfigurationError,
            "30 encoded values",
        ),
        ("group_influence", {"group_by": "blood type"}, ConfigurationError, "not a feature"),
        ("self_influence", {"group_by": "blood type"}, ConfigurationError, "not a feature"),
        ("self_influence", {"bins": json.dumps([0.1, 1.0])}, ConfigurationError, "starting at 0"),
        ("loo_unfairness", {"bins": json.dumps([0.0, 0.5, 2.0])}, ConfigurationError, "below 1"),
        ("influence_prototypes", {"k": "ten"}, ConfigurationError, "k must be an integer"),
        ("hessian", {"model": "mlp"}, ConfigurationError, "use the kfac kind"),
        ("hessian", {"model": ""}, ConfigurationError, "model's name"),
        ("kfac", {"model": "resnet"}, ConfigurationError, "unknown model 'resnet'"),
    ],
)
def test_a_coordinator_refuses_bad_requests_before_opening_a_round(
    name: str, extra: dict[str, str], error: type[Exception], message: str
) -> None:
    fed = federation("breast_cancer")
    base = (
        {**layout_params(fed.pre), "model": "logistic"}
        if name in SECOND_ORDER
        else request("hessian", k="5")
    )
    kind = get_kind(name)
    kind.coordinate_labels(fed.pre.encoded_names, fed.pre.groups, base)
    with pytest.raises(error, match=message):
        kind.coordinate_labels(fed.pre.encoded_names, fed.pre.groups, {**base, **extra})


@pytest.mark.parametrize("name", SECOND_ORDER + INFLUENCE)
def test_postprocess_refuses_a_sum_of_the_wrong_length(name: str) -> None:
    fed = federation("breast_cancer")
    params = second_order_params(name) if name in SECOND_ORDER else request("hessian", k="5")
    kind = get_kind(name)
    labels = kind.coordinate_labels(fed.pre.encoded_names, fed.pre.groups, params)
    kind.postprocess(np.zeros(len(labels) + 1), 0.0, 1.0, labels, params)  # the dry run passes
    with pytest.raises(ConfigurationError, match="noised sum has shape"):
        kind.postprocess(np.zeros(len(labels)), 0.0, 1.0, labels, params)
