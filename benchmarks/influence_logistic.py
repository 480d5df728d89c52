"""The logistic-regression parts of the influence benchmark, on ``breast_cancer``.

Each function runs one experiment of :mod:`benchmarks.influence` and returns its figures
as a JSON-ready dict; the model is always fit exactly (:func:`fit_logistic`), the
Hessian always federated through :func:`benchmarks.influence_federation.federate`, and
the ground truth always computed by exact refits in the same run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn

from benchmarks.influence_federation import FederatedSum, dp_noise_std, federate
from benchmarks.influence_truth import (
    coalition_values,
    exact_shapley,
    fit_logistic,
    flip_labels,
    half_subsets,
    leave_one_out_effects,
    linear_datamodeling_score,
    log_loss,
    logistic_logits,
    logistic_model,
    mean_pearson,
    predicted_subset_logits,
    recall_at,
    subset_logits,
)
from explain.influence import influence_on_predictions, loss_influence, self_influence
from explain.per_record import per_record_gradients
from explain.second_order import SecondOrder, hessian_terms_sum
from fedlens.datasets import load_dataset

__all__ = ["Shards", "lds_experiment", "mislabel_experiment", "shards", "valuation_experiment"]

logger = logging.getLogger(__name__)

DATASET = "breast_cancer"
Shards = list[tuple[np.ndarray, np.ndarray]]


def shards(num_sites: int, alpha: float, seed: int) -> Shards:
    """Every site's ``(features (n_i, d) float64, labels (n_i,) float64)``."""
    data = load_dataset(DATASET, seed=0)
    out = []
    for i in range(num_sites):
        site = data.site(i, num_sites, partition="dirichlet", alpha=alpha, seed=seed)
        out.append((site.features.astype(np.float64), site.labels.astype(np.float64)))
    return out


def _test() -> tuple[np.ndarray, np.ndarray]:
    test = load_dataset(DATASET, seed=0).test_data()
    return test.features.astype(np.float64), test.labels.astype(np.float64)


def _hessian(
    model: nn.Module,
    sites: Shards,
    *,
    clip_bound: float = math.inf,
    noise_std: float = 0.0,
    seed: int = 0,
    round_id: str = "hessian",
) -> FederatedSum:
    terms = [hessian_terms_sum(model, x, clip_bound=clip_bound) for x, _ in sites]
    return federate(terms, clip_bound=clip_bound, noise_std=noise_std, seed=seed, round_id=round_id)


def _solver(model: nn.Module, released: FederatedSum, mu: float) -> SecondOrder:
    return SecondOrder.from_packed(
        model, "hessian", released.total, released.count, mu / released.count
    )


def lds_experiment(
    sites: Shards,
    mu: float,
    *,
    queries: int,
    subsets: int,
    fraction: float,
    epsilon: float,
    delta: float,
    clip_bound: float,
    clip_grid: Sequence[float],
    draws: int,
    seed: int,
) -> dict[str, Any]:
    """Leave-one-out Pearson, LDS and LDS with a DP Hessian, against exact refits."""
    x = np.vstack([f for f, _ in sites])
    y = np.concatenate([lab for _, lab in sites])
    n = y.size
    test_x, test_y = _test()
    rng = np.random.default_rng(seed)
    query_x = test_x[np.sort(rng.choice(test_x.shape[0], size=queries, replace=False))]
    theta = fit_logistic(x, y, mu)
    model = logistic_model(theta)
    grads = per_record_gradients(model, x, y)

    central_packed, central_count = hessian_terms_sum(model, x)
    released = _hessian(model, sites, seed=seed, round_id="hessian-exact")
    diff = max(
        float(np.max(np.abs(released.total - central_packed))),
        abs(released.count - central_count),
    )
    central = SecondOrder.from_packed(model, "hessian", central_packed, n, mu / n)
    presence = influence_on_predictions(
        model, _solver(model, released, mu), x, y, query_x, gradients=grads
    )
    presence_central = influence_on_predictions(model, central, x, y, query_x, gradients=grads)

    logger.info("logistic: %d leave-one-out refits", n)
    loo = leave_one_out_effects(x, y, mu, theta, query_x)
    logger.info("logistic: %d subset refits", subsets)
    masks = half_subsets(n, subsets, rng, fraction)
    actual = subset_logits(x, y, mu, theta, masks, query_x)
    full = logistic_logits(theta, query_x)

    def lds_of(effects: np.ndarray) -> float:
        return linear_datamodeling_score(actual, predicted_subset_logits(full, effects, masks))

    # A record's Hessian term h J J^T, J = [x, 1], has Frobenius norm h ||J||^2.
    z = logistic_logits(theta, x)
    term_norms = np.exp(-np.logaddexp(0, z) - np.logaddexp(0, -z)) * (np.sum(x**2, axis=1) + 1)
    by_clip: dict[str, dict[str, Any]] = {}
    for c in dict.fromkeys([clip_bound, *clip_grid]):
        std = dp_noise_std(epsilon, delta, c)
        scores, counts = [], []
        for draw in range(draws):
            noised = _hessian(
                model,
                sites,
                clip_bound=c,
                noise_std=std,
                seed=seed + 1 + draw,
                round_id=f"dp-{c}-{draw}",
            )
            effects = influence_on_predictions(
                model, _solver(model, noised, mu), x, y, query_x, gradients=grads
            )
            scores.append(lds_of(effects))
            counts.append(noised.count)
        by_clip[f"{c:g}"] = {
            "lds_dp": float(np.mean(scores)),
            "lds_dp_draws": scores,
            "noise_std_per_site": std,
            "noised_counts": counts,
            "clipped_share": float(np.mean(term_norms > c)),
        }
    chosen = by_clip[f"{clip_bound:g}"]
    return {
        "loo_pearson": mean_pearson(loo, presence),
        "loo_pearson_pooled": float(np.corrcoef(loo.ravel(), presence.ravel())[0, 1]),
        "loo_pearson_central": mean_pearson(loo, presence_central),
        "loo_max_abs_error": float(np.max(np.abs(loo - presence))),
        "lds": lds_of(presence),
        "lds_central": lds_of(presence_central),
        "lds_dp": chosen["lds_dp"],
        "lds_dp_min": float(np.min(chosen["lds_dp_draws"])),
        "federated_equals_central_max_abs_diff": diff,
        "fixed_point_max_error": released.fixed_point_max_error,
        "dp": {
            "epsilon": epsilon,
            "delta": delta,
            "clip_bound": clip_bound,
            "noise_std_per_site": chosen["noise_std_per_site"],
            "noise_std_in_sum": math.sqrt(len(sites)) * chosen["noise_std_per_site"],
            "clipped_share": chosen["clipped_share"],
            "draws": draws,
            "by_clip_bound": by_clip,
        },
        "train_rows": n,
        "site_rows": [int(lab.size) for _, lab in sites],
        "queries": queries,
        "subsets": subsets,
        "subset_fraction": fraction,
        "test_accuracy": float(np.mean((logistic_logits(theta, test_x) > 0) == test_y)),
        "term_norm_quantiles": {
            q: float(np.quantile(term_norms, float(q))) for q in ("0.5", "0.9", "0.99", "1")
        },
    }


def mislabel_experiment(
    sites: Shards,
    mu: float,
    *,
    fraction: float,
    seeds: int,
    epsilon: float,
    delta: float,
    clip_bound: float,
) -> dict[str, Any]:
    """Self-influence (federated Hessian) against the training loss for flipped labels.

    For every site in turn and every seed, ``fraction`` of that site's labels are flipped,
    the model is refit on all sites, and the site ranks its own records.
    """
    trials: list[dict[str, Any]] = []
    std = dp_noise_std(epsilon, delta, clip_bound)
    for site in range(len(sites)):
        for seed in range(seeds):
            labels, flipped = flip_labels(sites[site][1], fraction, np.random.default_rng(seed))
            noisy = [(f, labels if i == site else lab) for i, (f, lab) in enumerate(sites)]
            x = np.vstack([f for f, _ in noisy])
            theta = fit_logistic(x, np.concatenate([lab for _, lab in noisy]), mu)
            model = logistic_model(theta)
            mine = noisy[site][0]
            grads = per_record_gradients(model, mine, labels)
            exact = _hessian(model, noisy, seed=seed, round_id=f"mislabel-{site}-{seed}")
            score = self_influence(model, _solver(model, exact, mu), mine, labels, gradients=grads)
            dp = _hessian(
                model,
                noisy,
                clip_bound=clip_bound,
                noise_std=std,
                seed=seed,
                round_id=f"mislabel-dp-{site}-{seed}",
            )
            score_dp = self_influence(model, _solver(model, dp, mu), mine, labels, gradients=grads)
            z = logistic_logits(theta, mine)
            loss = np.logaddexp(0.0, z) - labels * z
            trials.append(
                {
                    "site": site,
                    "seed": seed,
                    "site_rows": int(labels.size),
                    "flipped": int(flipped.sum()),
                    "auc": float(roc_auc_score(flipped, score)),
                    "auc_dp": float(roc_auc_score(flipped, score_dp)),
                    "recall_at_10pct": recall_at(score, flipped, 0.1),
                    "recall_at_20pct": recall_at(score, flipped, 0.2),
                    "loss_auc": float(roc_auc_score(flipped, loss)),
                    "loss_recall_at_10pct": recall_at(loss, flipped, 0.1),
                    "loss_recall_at_20pct": recall_at(loss, flipped, 0.2),
                }
            )

    def mean(key: str) -> float:
        return float(np.mean([t[key] for t in trials]))

    return {
        "mislabel_auc": mean("auc"),
        "mislabel_auc_min": float(np.min([t["auc"] for t in trials])),
        "mislabel_auc_dp": mean("auc_dp"),
        "recall_at_10pct": mean("recall_at_10pct"),
        "recall_at_20pct": mean("recall_at_20pct"),
        "loss_auc": mean("loss_auc"),
        "loss_recall_at_10pct": mean("loss_recall_at_10pct"),
        "loss_recall_at_20pct": mean("loss_recall_at_20pct"),
        "flip_fraction": fraction,
        "trials": trials,
    }


def valuation_experiment(
    num_sites: int, alpha: float, mu: float, *, corrupted: Sequence[int], seed: int
) -> dict[str, Any]:
    """Exact Shapley values of sites against their summed loss influence.

    For each site in ``corrupted`` in turn, all of that site's labels are flipped. The
    game's value is minus the validation (test split) log-loss of the exact fit on a
    coalition's records (the empty coalition's fit is ``theta = 0``).
    """
    val_x, val_y = _test()
    clean = shards(num_sites, alpha, seed)
    runs = []
    for bad in corrupted:
        sites = [(f, 1.0 - lab if i == bad else lab) for i, (f, lab) in enumerate(clean)]

        def value(members: Sequence[int], sites: Shards = sites) -> float:
            if not members:
                return -math.log(2.0)
            x = np.vstack([sites[i][0] for i in members])
            y = np.concatenate([sites[i][1] for i in members])
            return -log_loss(fit_logistic(x, y, mu), val_x, val_y)

        shapley = exact_shapley(coalition_values(num_sites, value))
        x = np.vstack([f for f, _ in sites])
        theta = fit_logistic(x, np.concatenate([lab for _, lab in sites]), mu)
        model = logistic_model(theta)
        second = _solver(model, _hessian(model, sites, seed=seed, round_id=f"valuation-{bad}"), mu)
        target = per_record_gradients(model, val_x, val_y).mean(axis=0)
        influence = np.array(
            [loss_influence(model, second, f, lab, target).sum() for f, lab in sites]
        )
        runs.append(
            {
                "corrupted_site": bad,
                "spearman": float(spearmanr(shapley, influence).statistic),
                "corrupted_ranked_last": bool(np.argmin(influence) == bad),
                "shapley_ranks_corrupted_last": bool(np.argmin(shapley) == bad),
                "shapley": shapley.tolist(),
                "influence": influence.tolist(),
            }
        )
    return {
        "valuation_spearman": float(np.mean([r["spearman"] for r in runs])),
        "valuation_spearman_min": float(np.min([r["spearman"] for r in runs])),
        "corrupted_ranked_last": all(r["corrupted_ranked_last"] for r in runs),
        "sites": num_sites,
        "alpha": alpha,
        "site_rows": [int(lab.size) for _, lab in clean],
        "runs": runs,
    }
