"""Ground truth for the influence benchmark: exact refits of L2 logistic regression.

Influence functions predict what retraining without some records would do; for an L2
logistic regression that retraining can be carried out exactly, so the prediction can be
checked against it. The objective, over ``N`` records ``(x_i, y_i)`` with ``x`` extended
by a 1 for the bias, is

    J(theta) = sum_i l(x_i, y_i; theta) + (mu / 2) ||theta||^2,
    l = log(1 + exp(f)) - y f,   f = theta^T x,

strictly convex for ``mu > 0``; :func:`fit_logistic` minimises it with Newton's method
in float64 to a step below ``1e-10``. This matches what :mod:`explain.influence` assumes
(``damping = mu / N``). The parameter vector is laid out like ``LogisticRegression``'s
``named_parameters()``: the weights, then the bias.

Also here: leave-one-out and subset refits (:func:`leave_one_out_effects`,
:func:`subset_logits`), the linear datamodeling score of Park et al. 2023
(:func:`linear_datamodeling_score`), exact Shapley values of a game given on all
coalitions (:func:`exact_shapley`, Ghorbani & Zou 2019 for data), and the small
statistics of the mislabel-detection experiment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

from fedlens.errors import ConfigurationError
from fedlens.models import build_model

__all__ = [
    "coalition_values",
    "exact_shapley",
    "fit_logistic",
    "flip_labels",
    "half_subsets",
    "leave_one_out_effects",
    "linear_datamodeling_score",
    "log_loss",
    "logistic_logits",
    "logistic_model",
    "mean_pearson",
    "predicted_subset_logits",
    "recall_at",
    "subset_logits",
]

_TOL = 1e-10
_MAX_NEWTON = 100


def _with_bias(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    return np.hstack([x, np.ones((x.shape[0], 1))])


def logistic_logits(theta: np.ndarray, features: np.ndarray) -> np.ndarray:
    """``(n, d) -> (n,)``: the logits ``theta^T [x, 1]``."""
    out: np.ndarray = _with_bias(features) @ theta
    return out


def log_loss(theta: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of the logistic model ``theta`` on ``(n, d)`` records."""
    z = logistic_logits(theta, features)
    return float(np.mean(np.logaddexp(0.0, z) - labels * z))


def fit_logistic(
    features: np.ndarray,
    labels: np.ndarray,
    mu: float,
    *,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Minimise ``sum_i l_i + (mu / 2) ||theta||^2`` exactly, by Newton's method.

    Parameters
    ----------
    features, labels
        ``(n, d)`` and ``(n,)`` in ``{0, 1}``; ``n = 0`` gives ``theta = 0``.
    mu
        L2 strength, > 0, on every parameter including the bias.
    start
        ``(d + 1,)`` warm start (the full-data fit, for leave-one-out refits).

    Returns
    -------
    numpy.ndarray
        ``(d + 1,)`` float64: the weights, then the bias.
    """
    if not mu > 0:
        raise ConfigurationError(f"mu must be > 0, got {mu}")
    x = _with_bias(features)
    y = np.asarray(labels, dtype=np.float64)
    theta = np.zeros(x.shape[1]) if start is None else np.array(start, dtype=np.float64)
    eye = mu * np.eye(x.shape[1])
    for _ in range(_MAX_NEWTON):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        gradient = x.T @ (p - y) + mu * theta
        hessian = (x * (p * (1.0 - p))[:, None]).T @ x + eye
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.max(np.abs(step)) < _TOL:
            return theta
    raise ConfigurationError(f"Newton's method did not converge in {_MAX_NEWTON} steps")


def logistic_model(theta: np.ndarray) -> nn.Module:
    """A float64 ``LogisticRegression`` holding ``theta`` (weights, then bias)."""
    model = build_model("logistic", theta.size - 1).double()
    weight, bias = (p for _, p in model.named_parameters())
    with torch.no_grad():
        weight.copy_(torch.as_tensor(theta[:-1]).reshape(weight.shape))
        bias.copy_(torch.as_tensor(theta[-1:]))
    return model.eval()


def leave_one_out_effects(
    features: np.ndarray, labels: np.ndarray, mu: float, theta: np.ndarray, queries: np.ndarray
) -> np.ndarray:
    """How much each record's presence raises each query's logit, by exact refits.

    Returns
    -------
    numpy.ndarray
        ``(n, k)``: ``f(x_q; theta) - f(x_q; theta_{-i})``, each ``theta_{-i}`` refit
        from ``theta`` without record ``i``. This is what
        :func:`explain.influence.influence_on_predictions` predicts.
    """
    n = features.shape[0]
    full = logistic_logits(theta, queries)
    out = np.empty((n, queries.shape[0]))
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        keep[i] = False
        out[i] = full - logistic_logits(
            fit_logistic(features[keep], labels[keep], mu, start=theta), queries
        )
        keep[i] = True
    return out


def half_subsets(n: int, count: int, rng: np.random.Generator, fraction: float = 0.5) -> np.ndarray:
    """``(count, n)`` boolean masks, each keeping ``round(fraction * n)`` random records."""
    if not 0.0 < fraction < 1.0:
        raise ConfigurationError(f"fraction must lie in (0, 1), got {fraction}")
    size = round(fraction * n)
    masks = np.zeros((count, n), dtype=bool)
    for row in masks:
        row[rng.choice(n, size=size, replace=False)] = True
    return masks


def subset_logits(
    features: np.ndarray,
    labels: np.ndarray,
    mu: float,
    theta: np.ndarray,
    masks: np.ndarray,
    queries: np.ndarray,
) -> np.ndarray:
    """``(m, k)``: the queries' logits after an exact refit on each subset ``masks[j]``."""
    return np.stack(
        [
            logistic_logits(fit_logistic(features[m], labels[m], mu, start=theta), queries)
            for m in masks
        ]
    )


def predicted_subset_logits(
    full_logits: np.ndarray, presence: np.ndarray, masks: np.ndarray
) -> np.ndarray:
    """Influence-predicted logits after training on each subset.

    Parameters
    ----------
    full_logits
        ``(k,)`` the queries' logits under the model trained on every record.
    presence
        ``(n, k)`` how much each record pushed each query's logit up.
    masks
        ``(m, n)`` the records each subset keeps.

    Returns
    -------
    numpy.ndarray
        ``(m, k)``: the full logit minus the presence effects of the records left out.
    """
    out: np.ndarray = full_logits[None, :] - (~masks).astype(np.float64) @ presence
    return out


def linear_datamodeling_score(actual: np.ndarray, predicted: np.ndarray) -> float:
    """LDS (Park et al., ICML 2023): Spearman over subsets, averaged over queries.

    Parameters
    ----------
    actual, predicted
        ``(m, k)``: each query's logit after retraining on each subset, and its
        prediction from attribution scores.
    """
    rhos = [
        float(spearmanr(actual[:, j], predicted[:, j]).statistic) for j in range(actual.shape[1])
    ]
    return float(np.mean(rhos))


def mean_pearson(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Pearson correlation over records of ``(n, k)`` effects, averaged over the queries."""
    return float(
        np.mean(
            [
                float(pearsonr(actual[:, j], predicted[:, j]).statistic)
                for j in range(actual.shape[1])
            ]
        )
    )


def coalition_values(players: int, value: Callable[[Sequence[int]], float]) -> np.ndarray:
    """``(2 ** players,)``: entry ``mask`` is ``value`` of the players whose bits are set."""
    return np.array(
        [value([i for i in range(players) if mask >> i & 1]) for mask in range(1 << players)]
    )


def exact_shapley(values: np.ndarray) -> np.ndarray:
    """Shapley values from a game given on every coalition.

    ``phi_i = sum_{S not containing i} |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S))``.

    Parameters
    ----------
    values
        ``(2 ** n,)`` as :func:`coalition_values` returns.

    Returns
    -------
    numpy.ndarray
        ``(n,)``; they sum to ``v(all) - v(empty)`` (efficiency).
    """
    n = values.size.bit_length() - 1
    if 1 << n != values.size:
        raise ConfigurationError(f"expected 2 ** n coalition values, got {values.size}")
    weights = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    phi = np.zeros(n)
    for mask in range(1 << n):
        size = mask.bit_count()
        for i in range(n):
            if not mask >> i & 1:
                phi[i] += weights[size] * (values[mask | 1 << i] - values[mask])
    return phi


def flip_labels(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``round(fraction * n)`` random labels; returns the new labels and a ``(n,)``
    boolean mask of the flipped ones."""
    n = labels.shape[0]
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=max(1, round(fraction * n)), replace=False)] = True
    return np.where(flipped, 1 - labels, labels), flipped


def recall_at(scores: np.ndarray, truth: np.ndarray, fraction: float) -> float:
    """Share of the ``truth`` records among the top ``ceil(fraction * n)`` scores."""
    top = np.argsort(-scores, kind="stable")[: math.ceil(fraction * scores.size)]
    return float(truth[top].sum() / truth.sum())
