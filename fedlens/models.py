"""Model definitions, looked up by name.

Every model maps encoded features ``(n, d)`` to one logit per record ``(n, 1)`` for a
binary task; explanations target that logit. The layers are ones Opacus computes
per-sample gradients for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedlens.errors import ConfigurationError

__all__ = ["MLP", "LogisticRegression", "available_models", "build_model"]


class LogisticRegression(nn.Module):
    """``logit = x @ w + b``; shape ``(n, d) -> (n, 1)``."""

    def __init__(self, dimension: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dimension, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


class MLP(nn.Module):
    """A small two-layer perceptron, ``(n, d) -> (n, 1)``."""

    def __init__(self, dimension: int, hidden: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dimension, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "logistic": LogisticRegression,
    "mlp": MLP,
}


def available_models() -> tuple[str, ...]:
    return tuple(sorted(_MODELS))


def build_model(name: str, dimension: int, *, seed: int = 0) -> nn.Module:
    """Build model ``name`` for ``dimension`` input features, initialised from ``seed``.

    Every site and the coordinator build the same initial weights from the same seed;
    after the first round the weights come from the federation anyway.
    """
    try:
        factory = _MODELS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown model {name!r}; available: {', '.join(available_models())}"
        ) from None
    if dimension < 1:
        raise ConfigurationError(f"model dimension must be >= 1, got {dimension}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(dimension)
