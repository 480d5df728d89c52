"""Influence of training records on predictions and losses (Koh & Liang, ICML 2017).

For a model trained to minimise ``sum_z l(z) + (mu / 2) ||theta||^2`` over ``N`` records,
removing one record ``z`` moves the minimiser by, to first order,

    theta_{-z} - theta ~= (H / N + lambda I)^{-1} grad l(z) / N,   lambda = mu / N,

where ``H / N + lambda I`` is what :class:`explain.second_order.SecondOrder` solves. So:

- the record *pushed* a query's logit ``f(x_q)`` up by
  ``-grad f(x_q)^T (H / N + lambda I)^{-1} grad l(z) / N`` (:func:`influence_on_predictions`;
  the logit falls by that much when ``z`` is removed);
- removing it raises its own loss by ``grad l(z)^T (H / N + lambda I)^{-1} grad l(z) / N``
  (:func:`self_influence`; large for mislabelled and atypical records);
- removing it raises a loss ``L`` (a validation loss) by
  ``grad L^T (H / N + lambda I)^{-1} grad l(z) / N`` (:func:`loss_influence`). Influence is
  linear in the records, so a group's or a site's influence is the sum of its records'.

All three take the inverse once, on the query side; the first and the last then need only
one forward-mode pass over the records (:func:`explain.per_record.gradient_dot`), never the
``(n, p)`` matrix of per-record gradients.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from explain.per_record import gradient_dot, per_record_gradients, prediction_gradients
from explain.second_order import SecondOrder

__all__ = ["influence_on_predictions", "loss_influence", "self_influence"]


def influence_on_predictions(
    model: nn.Module,
    second: SecondOrder,
    features: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
    *,
    gradients: np.ndarray | None = None,
) -> np.ndarray:
    """How much each record pushed each query's logit up.

    Parameters
    ----------
    features, labels
        ``(n, d)`` and ``(n,)``: the training records.
    queries
        ``(k, d)`` encoded query inputs.
    gradients
        ``(n, p)`` per-record loss gradients, if already computed.

    Returns
    -------
    numpy.ndarray
        ``(n, k)`` float64.
    """
    directions = second.solve(prediction_gradients(model, np.atleast_2d(queries)).T)  # (p, k)
    if gradients is None:
        return np.asarray(-gradient_dot(model, features, labels, directions.T) / second.count)
    return np.asarray(-(gradients @ directions) / second.count)


def self_influence(
    model: nn.Module,
    second: SecondOrder,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    gradients: np.ndarray | None = None,
) -> np.ndarray:
    """How much each record's own loss would rise if it were left out: ``(n,)`` >= 0."""
    grads = per_record_gradients(model, features, labels) if gradients is None else gradients
    solved = second.solve(grads.T).T
    return np.asarray(np.maximum(np.einsum("ij,ij->i", grads, solved), 0.0) / second.count)


def loss_influence(
    model: nn.Module,
    second: SecondOrder,
    features: np.ndarray,
    labels: np.ndarray,
    target_gradient: np.ndarray,
    *,
    gradients: np.ndarray | None = None,
) -> np.ndarray:
    """How much a loss with gradient ``target_gradient`` ``(p,)`` would rise without each
    record: ``(n,)``; positive for records that help the model on that loss."""
    solved = second.solve(np.asarray(target_gradient, dtype=np.float64))
    if gradients is None:
        return np.asarray(
            gradient_dot(model, features, labels, solved[None, :])[:, 0] / second.count
        )
    return np.asarray(gradients @ solved / second.count)
