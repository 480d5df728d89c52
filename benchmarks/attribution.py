"""Fidelity of the released global attribution to the non-private pooled one, against ε.

    python -m benchmarks.attribution --dataset adult --json OUT [--seeds 3] [--sites 4]
        [--epsilons 0.25,0.5,1,2,inf]

One logistic model is trained first, without privacy, on the pooled training set (full
batch Adam, `Settings.train_steps` steps): this benchmark measures the explanation
release, not training, and a plain model keeps the two apart. The reference is the
**non-private pooled attribution**: the mean Integrated Gradients of every training
record of every site together, unclipped and noiseless, summed over the encoded columns
of each original feature.

For every seed the training set is split over the sites (Dirichlet label skew, α = 1,
split seeded by the seed) and every site does its real work of a ``global_attribution``
release, as ``client.explanation`` does it: the registered kind's ``contribute`` (IG of
every record, clipped to L2 norm ``RunConfig().attribution_clip``, plus the count
coordinate), Gaussian noise of standard deviation
``gaussian_noise_multiplier(ε, δ) * l2_sensitivity(clip)`` drawn at the site (local
noise: each site's release is (ε, δ)-DP on its own, δ = ``RunConfig().explain_delta``),
clamping to the per-site range and fixed-point encoding with the codec
``server.round_specs.explanation_round_spec`` picks, and pairwise masking against every
other site of the round. ``ε = inf`` means clipping and encoding without noise: it
isolates the bias that clipping alone introduces. The masked vectors are summed modulo
``2**bits`` and decoded, which is exactly what the aggregator decodes (the masks cancel
exactly); the aggregator's state machine and gRPC are left out, as they change no value.
The decoded sum differs from the float64 sum of the noised vectors by the stochastic
rounding alone, at most ``sites * 1e-5`` per coordinate (``fixed_point_max_error`` in
the output). The kind's ``postprocess`` then divides by the noised count. Noise and
rounding come from seeded generators (`privacy.SeededRandom`, reproducible) rather than
the CSPRNG of a site; that changes no distribution.

Figures, per ε averaged over seeds:

* ``top5_agreement``: share of the five features with the largest ``|released value|``
  that are among the five largest of the pooled attribution;
* ``spearman``: Spearman rank correlation of ``|value|`` over the original features.

Faithfulness of the released ranking (at ``ε = 1``) is checked with a deletion curve
(Samek et al., "Evaluating the visualization of what a deep neural network has learned",
IEEE TNNLS 2017): for ``k = 0..F`` the top ``k`` features of every test record are
replaced by the **zero baseline** (every encoded column 0: the low end of each scaled
range and no category), the baseline the released IG is measured from, and the model's
mean predicted probability of each record's originally predicted class is tracked. The
area under that curve, over ``k / F`` in ``[0, 1]``, lies in ``[0, 1]``; lower means the
ranking removes what the model relies on sooner. ``deletion_auc_random`` is the same
for random orders (mean of `Settings.random_orders` seeded permutations) and
``deletion_auc_pooled`` for the ranking of the pooled attribution and
``deletion_auc_reversed`` for the released ranking read backwards (least important
first), a check that the curve can tell a ranking from its opposite.

``site_s`` is the median over seeds and sites of one site's seconds to contribute, noise,
encode and mask (the contribution is computed once per seed and site and reused for
every ε, since it does not depend on ε; the noise, encoding and masking time is the
median over the ε values).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from explain import get_kind, integrated_gradients, l2_sensitivity
from fedlens.datasets import Partition, load_dataset
from fedlens.errors import ConfigurationError
from fedlens.models import build_model
from fedlens.runconfig import RunConfig
from privacy import FixedPointCodec, SeededRandom, gaussian_noise_multiplier
from privacy.secagg_local import run_round
from privacy.secagg_params import SecAggParams
from server.round_specs import MAX_RECORDS_PER_SITE, PRECISION

__all__ = [
    "Settings",
    "deletion_curve",
    "eps_key",
    "format_table",
    "main",
    "rank_agreement",
    "run_benchmark",
    "train_model",
]

logger = logging.getLogger(__name__)

KIND = "global_attribution"
TOP_K = 5
TARGET_EPSILON = 1.0
TARGET_TOP5 = 0.8
TARGET_SPEARMAN = 0.9
_DEFAULTS = RunConfig()


@dataclass(frozen=True)
class Settings:
    """Release and model settings, the same for every ε.

    Parameters
    ----------
    sites
        Number of sites; each masks against the other ``sites - 1``.
    clip_bound, delta, n_steps
        Per-record L2 clip, per-release δ and IG steps (``RunConfig`` defaults).
    partition, alpha
        Site split (see ``Dataset.site``); its seed is the run's seed.
    train_steps, learning_rate
        Full-batch Adam steps of the non-private model, and their step size.
    ranking_epsilon
        ε of the release whose ranking the deletion curve follows.
    random_orders
        Random feature orders averaged into ``deletion_auc_random``.
    fraction
        Share of every site's rows and of the test rows kept (``1.0`` for the real
        benchmark; smaller for quick checks).
    """

    sites: int = 4
    clip_bound: float = _DEFAULTS.attribution_clip
    delta: float = _DEFAULTS.explain_delta
    n_steps: int = _DEFAULTS.ig_steps
    partition: Partition = "dirichlet"
    alpha: float = 1.0
    train_steps: int = 300
    learning_rate: float = 0.05
    ranking_epsilon: float = TARGET_EPSILON
    random_orders: int = 5
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.sites < 2:
            raise ConfigurationError(f"sites must be >= 2, got {self.sites}")
        for name in ("clip_bound", "n_steps", "train_steps", "learning_rate", "random_orders"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigurationError(f"fraction must lie in (0, 1], got {self.fraction}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigurationError(f"delta must lie in (0, 1), got {self.delta}")
        if not (math.isfinite(self.ranking_epsilon) and self.ranking_epsilon > 0):
            raise ConfigurationError(
                f"ranking_epsilon must be finite and > 0, got {self.ranking_epsilon}"
            )


def eps_key(epsilon: float) -> str:
    """JSON key of a release ε: ``"0.25"``, ``"1"``, ..., ``"inf"``."""
    return f"{epsilon:g}"


def _keep(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a random ``fraction`` of ``n`` rows (all of them at 1)."""
    if fraction >= 1.0:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max(1, round(fraction * n)), replace=False))


def train_model(
    features: np.ndarray, labels: np.ndarray, settings: Settings, *, seed: int = 0
) -> nn.Module:
    """A logistic model fit without privacy by full-batch Adam on ``(n, d)`` features."""
    model = build_model("logistic", features.shape[1], seed=seed)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(settings.train_steps):
        optimizer.zero_grad()
        loss_fn(model(x).squeeze(-1), y).backward()
        optimizer.step()
    model.eval()
    return model


def _probabilities(model: nn.Module, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor(features, dtype=torch.float32)).squeeze(-1)
    return torch.sigmoid(logits).to(torch.float64).numpy()


def deletion_curve(
    model: nn.Module,
    features: np.ndarray,
    order: Sequence[str],
    groups: Mapping[str, Sequence[int]],
) -> np.ndarray:
    """Mean probability of each record's predicted class as features are zeroed in ``order``.

    Returns
    -------
    numpy.ndarray
        ``(len(order) + 1,)``: entry ``k`` with the first ``k`` features of ``order`` (all
        their encoded columns) set to the zero baseline in every record.
    """
    x = np.array(features, dtype=np.float32)
    predicted = _probabilities(model, x) >= 0.5
    curve = []
    for k in range(len(order) + 1):
        if k:
            x[:, list(groups[order[k - 1]])] = 0.0
        p = _probabilities(model, x)
        curve.append(float(np.mean(np.where(predicted, p, 1.0 - p))))
    return np.asarray(curve)


def _auc(curve: np.ndarray) -> float:
    """Trapezoidal area under ``curve`` over ``[0, 1]``, its points evenly spaced."""
    return float(np.sum((curve[1:] + curve[:-1]) / 2.0) / (curve.size - 1))


def rank_agreement(
    released: Mapping[str, float], pooled: Mapping[str, float], k: int = TOP_K
) -> tuple[float, float]:
    """Top-``k`` overlap share and Spearman correlation of ``|value|`` over the features."""
    names = list(pooled)
    top = set(sorted(names, key=lambda n: -abs(released[n]))[:k])
    top_pooled = set(sorted(names, key=lambda n: -abs(pooled[n]))[:k])
    rho = spearmanr([abs(released[n]) for n in names], [abs(pooled[n]) for n in names])
    return len(top & top_pooled) / k, float(rho.statistic)


def _release(
    contributions: Sequence[np.ndarray],
    epsilon: float,
    settings: Settings,
    codec: FixedPointCodec,
    seed: int,
    stream: int,
) -> tuple[np.ndarray, float, float, list[float]]:
    """Every site's noise, clamp, encoding and masks, then the decoded masked sum.

    Returns the decoded sum, the per-site noise std, the largest distance of the decoded
    sum from the float64 sum of the noised vectors, and each site's seconds. ``stream``
    separates the draws of the releases of one seed.
    """
    std = (
        gaussian_noise_multiplier(epsilon, settings.delta) * l2_sensitivity(settings.clip_bound)
        if math.isfinite(epsilon)
        else 0.0
    )
    ids = tuple(f"site-{i}" for i in range(len(contributions)))
    limit = codec.site_limit(len(ids))
    round_id = f"attribution-{seed}-{eps_key(epsilon)}"
    encoded, noised, seconds = {}, [], []
    for index, (vector, site) in enumerate(zip(contributions, ids, strict=True)):
        began = time.perf_counter()
        rng = SeededRandom(int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0]))
        value = vector + rng.normal(vector.size, std) if std > 0 else vector.copy()
        encoded[site] = codec.encode(np.clip(value, -limit, limit), rng)
        seconds.append(time.perf_counter() - began)
        noised.append(value)
    # The whole secure-aggregation round in this process; each site is charged an equal
    # share of its time (keys, shares, masks, unmasking).
    began = time.perf_counter()
    params = SecAggParams(round_id, ids, len(ids), contributions[0].size, codec.bits)
    server, _ = run_round(params, encoded)
    protocol = (time.perf_counter() - began) / len(ids)
    seconds = [s + protocol for s in seconds]
    total = codec.decode(server.result())
    error = float(np.max(np.abs(total - np.sum(noised, axis=0))))
    return total, std, error, seconds


def run_benchmark(
    dataset_name: str,
    epsilons: Sequence[float],
    seeds: Sequence[int],
    settings: Settings,
    *,
    on_seed: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Release at every ``(ε, seed)`` and summarise; the result is the JSON document."""
    start = time.perf_counter()
    dataset = load_dataset(dataset_name, seed=0)
    pre = dataset.preprocessor
    groups = {name: list(cols) for name, cols in pre.groups.items()}
    params = {
        "feature_names": json.dumps(list(pre.encoded_names)),
        "groups": json.dumps(groups),
        "n_steps": str(settings.n_steps),
    }
    kind = get_kind(KIND)
    codec = FixedPointCodec.choose(
        num_sites=settings.sites,
        max_abs=MAX_RECORDS_PER_SITE * settings.clip_bound,
        precision=PRECISION,
    )
    train = dataset.site(0, 1)
    rows = _keep(train.size, settings.fraction, np.random.default_rng(0))
    model = train_model(train.features[rows], train.labels[rows], settings)
    test = dataset.test_data()
    test_rows = _keep(test.size, settings.fraction, np.random.default_rng(1))
    test_x, test_y = test.features[test_rows], test.labels[test_rows]
    accuracy = float(np.mean((_probabilities(model, test_x) >= 0.5) == test_y))

    # The split changes with the seed, not the pooled records: one reference for all.
    pooled_ig = integrated_gradients(model, train.features[rows], n_steps=settings.n_steps)
    pooled_mean = pooled_ig.mean(axis=0)
    pooled = {name: float(pooled_mean[cols].sum()) for name, cols in groups.items()}
    clipped_share = float(np.mean(np.linalg.norm(pooled_ig, axis=1) > settings.clip_bound))
    pooled_order = sorted(pooled, key=lambda n: -abs(pooled[n]))
    deletion_pooled = _auc(deletion_curve(model, test_x, pooled_order, groups))

    released_eps = list(dict.fromkeys([*epsilons, settings.ranking_epsilon]))
    runs: list[dict[str, Any]] = []
    per_seed: list[dict[str, Any]] = []
    site_runs: list[dict[str, float]] = []
    for seed in seeds:
        began = time.perf_counter()
        split = np.random.default_rng(seed)
        contributions = []
        contribute_s = []
        for i in range(settings.sites):
            shard = dataset.site(
                i, settings.sites, partition=settings.partition, alpha=settings.alpha, seed=seed
            )
            keep = _keep(shard.size, settings.fraction, split)
            t0 = time.perf_counter()
            contribution = kind.contribute(
                model, shard.features[keep], shard.labels[keep], params, settings.clip_bound
            )
            contribute_s.append(time.perf_counter() - t0)
            contributions.append(contribution.vector)
        labels = tuple(pre.encoded_names)
        release_s: list[list[float]] = [[] for _ in contributions]
        released: dict[str, dict[str, float]] = {}
        for stream, epsilon in enumerate(released_eps):
            total, std, error, seconds = _release(
                contributions, epsilon, settings, codec, seed, stream
            )
            for i, s in enumerate(seconds):
                release_s[i].append(s)
            out = kind.postprocess(
                total, math.sqrt(settings.sites) * std, settings.clip_bound, labels, params
            )
            released[eps_key(epsilon)] = {v.name: v.value for v in out.grouped}
            if epsilon not in epsilons:
                continue
            top5, rho = rank_agreement(released[eps_key(epsilon)], pooled)
            runs.append(
                {
                    "epsilon": eps_key(epsilon),
                    "seed": seed,
                    "top5_agreement": top5,
                    "spearman": rho,
                    "site_noise_std": std,
                    "noised_count": out.noised_count,
                    "fixed_point_max_error": error,
                    "released_top5": [v.name for v in out.grouped[:TOP_K]],
                }
            )
        for i in range(settings.sites):
            site_runs.append(
                {
                    "seed": seed,
                    "site": i,
                    "contribute_s": contribute_s[i],
                    "noise_encode_mask_s": statistics.median(release_s[i]),
                }
            )
        ranking = released[eps_key(settings.ranking_epsilon)]
        order = sorted(ranking, key=lambda n: -abs(ranking[n]))
        shuffle = np.random.default_rng([seed, 1])
        curve = deletion_curve(model, test_x, order, groups)
        random_aucs = [
            _auc(deletion_curve(model, test_x, list(shuffle.permutation(order)), groups))
            for _ in range(settings.random_orders)
        ]
        per_seed.append(
            {
                "seed": seed,
                "deletion_auc": _auc(curve),
                "deletion_auc_random": float(np.mean(random_aucs)),
                "deletion_auc_reversed": _auc(deletion_curve(model, test_x, order[::-1], groups)),
                "deletion_curve": curve.tolist(),
                "ranking": order,
                "site_records": [round(v[-1] / settings.clip_bound) for v in contributions],
                "seconds": time.perf_counter() - began,
            }
        )
        if on_seed is not None:
            on_seed(seed, time.perf_counter() - began)

    def mean_of(field: str) -> dict[str, float]:
        return {
            eps_key(e): float(np.mean([r[field] for r in runs if r["epsilon"] == eps_key(e)]))
            for e in epsilons
        }

    mean_top5, mean_spearman = mean_of("top5_agreement"), mean_of("spearman")
    key = eps_key(TARGET_EPSILON)
    target = None
    if key in mean_top5:
        target = {
            "epsilon": key,
            "min_top5_agreement": TARGET_TOP5,
            "min_spearman": TARGET_SPEARMAN,
            "met": mean_top5[key] >= TARGET_TOP5 and mean_spearman[key] >= TARGET_SPEARMAN,
        }
    site_s = [r["contribute_s"] + r["noise_encode_mask_s"] for r in site_runs]
    return {
        "benchmark": "attribution",
        "dataset": dataset_name,
        "kind": KIND,
        "top5_agreement": mean_top5,
        "spearman": mean_spearman,
        "top5_agreement_std": {
            eps_key(e): float(
                np.std([r["top5_agreement"] for r in runs if r["epsilon"] == eps_key(e)])
            )
            for e in epsilons
        },
        "deletion_auc": float(np.mean([s["deletion_auc"] for s in per_seed])),
        "deletion_auc_random": float(np.mean([s["deletion_auc_random"] for s in per_seed])),
        "deletion_auc_reversed": float(np.mean([s["deletion_auc_reversed"] for s in per_seed])),
        "deletion_auc_pooled": deletion_pooled,
        "site_s": statistics.median(site_s),
        "target": target,
        "pooled": pooled,
        "pooled_ranking": pooled_order,
        "pooled_clipped_share": clipped_share,
        "model_test_accuracy": accuracy,
        "train_rows": int(rows.size),
        "test_rows": int(test_rows.size),
        "codec": {"bits": codec.bits, "scale": codec.scale},
        "settings": {
            **asdict(settings),
            "seeds": list(seeds),
            "epsilons": [eps_key(e) for e in epsilons],
            "model": "logistic, non-private, full-batch Adam on the pooled training set",
            "noise": "local Gaussian per site, std = z(ε, δ) · sqrt(2) · clip; none at inf",
            "deletion_baseline": "zero (the IG baseline)",
            "deletion_score": "mean probability of each record's originally predicted class",
            "accountant": "pld",
        },
        "runs": runs,
        "per_seed": per_seed,
        "site_runs": site_runs,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "seconds": time.perf_counter() - start,
    }


def format_table(results: Mapping[str, Any]) -> str:
    """The per-ε figures and the deletion AUCs as a short text table."""
    lines = [f"{'ε':>6}{'top-5':>8}{'Spearman':>10}"]
    for key, top5 in results["top5_agreement"].items():
        lines.append(f"{key:>6}{top5:>8.2f}{results['spearman'][key]:>10.3f}")
    ranking = eps_key(results["settings"]["ranking_epsilon"])
    lines.append(
        f"deletion AUC (ranking at ε = {ranking}): {results['deletion_auc']:.4f}; "
        f"random: {results['deletion_auc_random']:.4f}; "
        f"reversed: {results['deletion_auc_reversed']:.4f}; "
        f"pooled ranking: {results['deletion_auc_pooled']:.4f}"
    )
    lines.append(
        f"site: {results['site_s']:.2f} s (median); {results['seconds']:.0f} s on "
        f"{results['cores']} cores"
    )
    return "\n".join(lines)


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every ε must be > 0 (or inf), got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dataset", default="adult")
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--epsilons", type=_epsilons, default=_epsilons("0.25,0.5,1,2,inf"))
    parser.add_argument("--sites", type=int, default=defaults.sites)
    parser.add_argument("--n-steps", type=int, default=defaults.n_steps, help="IG steps")
    parser.add_argument(
        "--fraction", type=float, default=1.0, help="share of rows kept (quick checks)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        settings = replace(defaults, sites=args.sites, n_steps=args.n_steps, fraction=args.fraction)
    except ConfigurationError as exc:
        parser.error(str(exc))

    def progress(seed: int, seconds: float) -> None:
        logger.info("seed %d done (%.1f s)", seed, seconds)

    results = run_benchmark(
        args.dataset, args.epsilons, list(range(args.seeds)), settings, on_seed=progress
    )
    args.json.write_text(json.dumps(results, indent=2))
    print(format_table(results))
    target = results["target"]
    if target is not None:
        verdict = "met" if target["met"] else "MISSED"
        print(
            f"target at ε = {target['epsilon']}: top-5 ≥ {target['min_top5_agreement']} and "
            f"Spearman ≥ {target['min_spearman']}: {verdict}"
        )


if __name__ == "__main__":
    main()
