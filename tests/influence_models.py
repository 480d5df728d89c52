"""Models fitted exactly, for tests that compare influence with retraining."""

from __future__ import annotations

import numpy as np
import torch

from fedlens.models import build_model

__all__ = ["fit_logistic_state"]


def fit_logistic_state(
    features: np.ndarray, labels: np.ndarray, mu: float
) -> dict[str, torch.Tensor]:
    """The minimiser of ``sum_z l(z) + (mu / 2) ||theta||^2`` (bias included) by Newton's
    method in float64, as a fedlens logistic model's state dict."""
    x = np.hstack([features, np.ones((features.shape[0], 1))])
    theta = np.zeros(x.shape[1])
    for _ in range(30):
        p = 1.0 / (1.0 + np.exp(-x @ theta))
        gradient = x.T @ (p - labels) + mu * theta
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + mu * np.eye(x.shape[1])
        theta -= np.linalg.solve(hessian, gradient)
    model = build_model("logistic", features.shape[1])
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor(theta[None, :-1]))
        model.linear.bias.copy_(torch.tensor(theta[-1:]))
    return model.state_dict()
