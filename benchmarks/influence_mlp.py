"""The MLP half of the influence benchmark: one training recipe, its checkpoints, Captum.

The recipe is deterministic, so that retraining on a subset differs from the full model
only by the data: the MLP of :mod:`fedlens.models` built from a fixed seed, in float64,
trained by full-batch Adam on

    (1 / N) sum_i l_i + (lambda / 2) ||theta||^2,

that is ``sum_i l_i + (mu / 2) ||theta||^2`` with ``mu = N lambda``; the influence
damping that matches it is ``mu / N = lambda``. Checkpoints are taken at evenly spaced
steps, each after its step, with TracIn's step size ``eta = lr * interval / N``: the
learning rate per record of the mean loss, times the steps the checkpoint stands for.
Adam rescales its steps, so ``eta`` is nominal; TracIn (Pruthi et al. 2020) is derived
for SGD and is commonly run on Adam-trained models this way.

:func:`captum_tracin` runs Captum's ``TracInCP`` on the same model, checkpoints and data,
with the query's logit as its test "loss", and returns its scores in the convention of
:func:`explain.per_record.tracin_scores` (a positive score pushed the logit up; Captum's
proponents, which lower the test loss, have the opposite sign).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from explain.per_record import tracin_scores
from fedlens.errors import ConfigurationError
from fedlens.models import build_model

__all__ = [
    "Checkpoint",
    "Recipe",
    "TrainedMLP",
    "captum_tracin",
    "fastest",
    "mlp_logits",
    "subset_logits_mlp",
    "tracin_presence",
    "train_mlp",
]


T = TypeVar("T")
Checkpoint = tuple[Mapping[str, torch.Tensor], float]


@dataclass(frozen=True)
class Recipe:
    """How every MLP of the benchmark is trained.

    Parameters
    ----------
    steps, learning_rate
        Full-batch Adam steps and step size.
    weight_decay
        ``lambda`` of the objective above (every parameter, biases too).
    checkpoints
        Number of evenly spaced checkpoints kept for TracIn (the last is the model).
    init_seed
        Seed of the initial weights, the same for every retraining.
    """

    steps: int = 400
    learning_rate: float = 0.01
    weight_decay: float = 1e-3
    checkpoints: int = 5
    init_seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.checkpoints <= self.steps:
            raise ConfigurationError(
                f"checkpoints must lie in [1, steps={self.steps}], got {self.checkpoints}"
            )
        if not (self.learning_rate > 0 and self.weight_decay > 0):
            raise ConfigurationError("learning_rate and weight_decay must be > 0")


@dataclass(frozen=True)
class TrainedMLP:
    """A trained float64 MLP, its checkpoints ``(state, eta)`` and its final objective."""

    model: nn.Module
    checkpoints: list[Checkpoint]
    objective: float


def train_mlp(
    features: np.ndarray, labels: np.ndarray, recipe: Recipe, *, keep_checkpoints: bool = True
) -> TrainedMLP:
    """Train the recipe's MLP on ``(n, d)`` features and ``(n,)`` labels."""
    model = build_model("mlp", features.shape[1], seed=recipe.init_seed).double()
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=recipe.learning_rate)
    interval = recipe.steps // recipe.checkpoints
    eta = recipe.learning_rate * interval / x.shape[0]
    marks = {recipe.steps - i * interval for i in range(recipe.checkpoints)}
    checkpoints: list[Checkpoint] = []
    model.train()
    objective = torch.zeros(())
    for step in range(1, recipe.steps + 1):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x).reshape(-1), y)
        penalty = torch.stack([p.pow(2).sum() for p in params]).sum()
        objective = loss + recipe.weight_decay / 2 * penalty
        torch.autograd.backward(objective)
        optimizer.step()
        if keep_checkpoints and step in marks:
            checkpoints.append((copy.deepcopy(model.state_dict()), eta))
    model.eval()
    return TrainedMLP(model, checkpoints, float(objective.detach()))


def mlp_logits(model: nn.Module, features: np.ndarray) -> np.ndarray:
    """``(k, d) -> (k,)`` float64 logits."""
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(features, dtype=np.float64)))
    result: np.ndarray = out.reshape(-1).numpy()
    return result


def subset_logits_mlp(
    features: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    queries: np.ndarray,
    recipe: Recipe,
    *,
    on_subset: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``(m, k)``: the queries' logits after retraining with the recipe on each subset."""
    out = np.empty((masks.shape[0], queries.shape[0]))
    for j, mask in enumerate(masks):
        trained = train_mlp(features[mask], labels[mask], recipe, keep_checkpoints=False)
        out[j] = mlp_logits(trained.model, queries)
        if on_subset is not None:
            on_subset(j)
    return out


def tracin_presence(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    features: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
) -> np.ndarray:
    """``(n, k)``: :func:`explain.per_record.tracin_scores` of every record on each query."""
    return np.stack(
        [tracin_scores(model, checkpoints, features, labels, q) for q in queries], axis=1
    )


class _Logit(nn.Module):
    """Captum "loss" that is the model's logit, one per example."""

    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return out.sum() if self.reduction == "sum" else out.reshape(-1)


def captum_tracin(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    features: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
    *,
    sample_wise: bool = False,
    batch_size: int = 500,
) -> np.ndarray:
    """Captum ``TracInCP`` scores of every record on each query's logit, ``(n, k)``.

    Parameters
    ----------
    sample_wise
        Captum's ``sample_wise_grads_per_batch`` (per-example gradients from layer hooks
        on a summed loss); its default, ``False``, takes one backward pass per example.
    """
    from captum.influence import TracInCP

    reduction = "sum" if sample_wise else "none"
    data = TensorDataset(
        torch.as_tensor(np.asarray(features, dtype=np.float64)),
        torch.as_tensor(np.asarray(labels, dtype=np.float64)).reshape(-1, 1),
    )

    def load(target: nn.Module, index: int) -> float:
        state, eta = checkpoints[index]
        target.load_state_dict(dict(state))
        return eta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns about requires_grad on inputs
        tracer = TracInCP(
            copy.deepcopy(model),
            data,
            list(range(len(checkpoints))),
            checkpoints_load_func=load,
            loss_fn=nn.BCEWithLogitsLoss(reduction=reduction),
            test_loss_fn=_Logit(reduction),
            batch_size=batch_size,
            sample_wise_grads_per_batch=sample_wise,
        )
        query = torch.as_tensor(np.asarray(queries, dtype=np.float64))
        scores = tracer.influence((query, torch.zeros(query.shape[0], 1, dtype=torch.float64)))
    result: np.ndarray = -scores.detach().numpy().T
    return result


def fastest(fn: Callable[[], T], repeats: int) -> tuple[float, float, T]:
    """Run ``fn`` ``repeats`` times; the least wall-clock and process seconds, and its
    last result."""
    walls, cpus = [], []
    result = fn()  # warm-up: first calls compile vmap and fill caches
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result
