"""The adult parts of the influence benchmark: LDS of an MLP's influence, and speed.

:func:`mlp_experiment` trains the recipe of :mod:`benchmarks.influence_mlp` on a seeded
subsample of every site's adult rows, federates its K-FAC factors (noiselessly, through
the secure-aggregation round) and scores K-FAC influence, our TracIn and Captum's TracInCP
by their linear datamodeling score against retraining on random half subsets.
:func:`speed_experiment` times one query's group influence at each site, and TracIn
against Captum on the same work.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks.influence_federation import federate
from benchmarks.influence_mlp import (
    Recipe,
    TrainedMLP,
    captum_tracin,
    fastest,
    mlp_logits,
    subset_logits_mlp,
    tracin_presence,
    train_mlp,
)
from benchmarks.influence_truth import (
    half_subsets,
    linear_datamodeling_score,
    predicted_subset_logits,
)
from explain.influence import influence_on_predictions
from explain.per_record import per_record_gradients, tracin_scores
from explain.second_order import SecondOrder, kfac_terms_sum
from fedlens.datasets import load_dataset

__all__ = ["AdultModel", "adult_shards", "mlp_experiment", "speed_experiment"]

logger = logging.getLogger(__name__)

ADULT = "adult"


def adult_shards(
    num_sites: int, alpha: float, seed: int, fraction: float
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A seeded ``fraction`` of every site's adult rows: ``(features, labels, sex)``."""
    data = load_dataset(ADULT, seed=0)
    rng = np.random.default_rng([seed, 1])
    out = []
    for i in range(num_sites):
        site = data.site(i, num_sites, partition="dirichlet", alpha=alpha, seed=seed)
        size = max(2, round(fraction * site.size)) if fraction < 1 else site.size
        keep = np.sort(rng.choice(site.size, size=size, replace=False))
        sex = np.asarray(site.sensitive["sex"])[keep]
        out.append(
            (site.features[keep].astype(np.float64), site.labels[keep].astype(np.float64), sex)
        )
    return out


@dataclass(frozen=True)
class AdultModel:
    """What the speed measurement reuses of :func:`mlp_experiment`."""

    trained: TrainedMLP
    second: SecondOrder
    features: np.ndarray
    labels: np.ndarray
    query: np.ndarray


def mlp_experiment(
    recipe: Recipe,
    *,
    num_sites: int,
    alpha: float,
    rows: int,
    subsets: int,
    fraction: float,
    queries: int,
    seed: int,
) -> tuple[dict[str, Any], AdultModel]:
    """LDS of K-FAC influence, our TracIn and Captum's TracInCP for an MLP on adult."""
    data = load_dataset(ADULT, seed=0)
    sites = adult_shards(num_sites, alpha, seed, rows / data.train.shape[0])
    x = np.vstack([f for f, _, _ in sites])
    y = np.concatenate([lab for _, lab, _ in sites])
    test = data.test_data()
    rng = np.random.default_rng(seed)
    query_x = test.features[np.sort(rng.choice(test.size, size=queries, replace=False))]
    query_x = query_x.astype(np.float64)
    trained = train_mlp(x, y, recipe)
    model = trained.model
    accuracy = float(np.mean((mlp_logits(model, test.features) > 0) == test.labels))

    central, _ = kfac_terms_sum(model, x)
    released = federate([kfac_terms_sum(model, f) for f, _, _ in sites], round_id="kfac-exact")
    second = SecondOrder.from_packed(
        model, "kfac", released.total, released.count, recipe.weight_decay
    )
    grads = per_record_gradients(model, x, y)
    kfac = influence_on_predictions(model, second, x, y, query_x, gradients=grads)
    logger.info("mlp: TracIn and Captum TracInCP of %d queries", queries)
    ours = tracin_presence(model, trained.checkpoints, x, y, query_x)
    captum = captum_tracin(model, trained.checkpoints, x, y, query_x)

    def progress(j: int) -> None:
        if (j + 1) % 10 == 0 or j + 1 == subsets:
            logger.info("mlp: retrained on %d/%d subsets", j + 1, subsets)

    masks = half_subsets(y.size, subsets, rng, fraction)
    actual = subset_logits_mlp(x, y, masks, query_x, recipe, on_subset=progress)
    full = mlp_logits(model, query_x)

    def lds_of(effects: np.ndarray) -> float:
        return linear_datamodeling_score(actual, predicted_subset_logits(full, effects, masks))

    figures = {
        "lds_mlp": lds_of(kfac),
        "lds_tracin": lds_of(ours),
        "lds_captum_tracincp": lds_of(captum),
        "captum_vs_ours_tracin_max_abs_diff": float(np.max(np.abs(captum - ours))),
        "tracin_max_abs_score": float(np.max(np.abs(ours))),
        "kfac_federated_equals_central_max_abs_diff": float(
            np.max(np.abs(released.total - central))
        ),
        "train_rows": int(y.size),
        "site_rows": [int(lab.size) for _, lab, _ in sites],
        "queries": queries,
        "subsets": subsets,
        "subset_fraction": fraction,
        "test_accuracy": accuracy,
        "final_objective": trained.objective,
        "parameters": int(grads.shape[1]),
        "damping": recipe.weight_decay,
        "recipe": asdict(recipe),
        "model": "fedlens mlp (hidden 32, ReLU), float64",
    }
    return figures, AdultModel(trained, second, x, y, query_x[:1])


def speed_experiment(
    setup: AdultModel,
    *,
    num_sites: int,
    alpha: float,
    seed: int,
    fraction: float,
    repeats: int,
) -> dict[str, Any]:
    """Per-site seconds of one query's group influence, and TracIn against Captum's."""
    model, second = setup.trained.model, setup.second
    per_site = []
    for features, labels, sex in adult_shards(num_sites, alpha, seed, fraction):

        def group_influence(
            features: np.ndarray = features, labels: np.ndarray = labels, sex: np.ndarray = sex
        ) -> dict[str, float]:
            effects = influence_on_predictions(model, second, features, labels, setup.query)
            names, index = np.unique(sex.astype(str), return_inverse=True)
            sums = np.bincount(index, weights=effects[:, 0], minlength=names.size)
            return {str(k): float(v) for k, v in zip(names, sums, strict=True)}

        wall, cpu, groups = fastest(group_influence, repeats)
        per_site.append({"rows": int(labels.size), "seconds": wall, "cpu_s": cpu, "groups": groups})

    x, y, ckpts = setup.features, setup.labels, setup.trained.checkpoints
    ours_s, ours_cpu, ours = fastest(
        lambda: tracin_scores(model, ckpts, x, y, setup.query[0]), repeats
    )
    kfac_s, _, _ = fastest(
        lambda: influence_on_predictions(model, second, x, y, setup.query), repeats
    )
    captum_s, captum_cpu, captum = fastest(
        lambda: captum_tracin(model, ckpts, x, y, setup.query), max(1, repeats // 3)
    )
    fast_s, _, _ = fastest(
        lambda: captum_tracin(model, ckpts, x, y, setup.query, sample_wise=True), repeats
    )
    return {
        "query_site_s": float(np.median([s["seconds"] for s in per_site])),
        "speedup_vs_captum": captum_s / ours_s,
        "speedup_vs_captum_cpu": captum_cpu / ours_cpu,
        "speedup_vs_captum_sample_wise": fast_s / ours_s,
        "speedup_vs_captum_kfac_influence": captum_s / kfac_s,
        "per_site": per_site,
        "group_by": "sex",
        "query_model": "mlp with K-FAC (federated factors)",
        "tracin": {
            "rows": int(y.size),
            "checkpoints": len(ckpts),
            "ours_s": ours_s,
            "ours_cpu_s": ours_cpu,
            "captum_s": captum_s,
            "captum_cpu_s": captum_cpu,
            "captum_sample_wise_s": fast_s,
            "ours_kfac_influence_s": kfac_s,
            "max_abs_diff": float(np.max(np.abs(captum[:, 0] - ours))),
        },
        "site_fraction": fraction,
        "repeats": repeats,
    }
