"""DP-SGD at a site with Opacus (Abadi et al. 2016).

Poisson sampling (each record joins each batch independently with probability
``q = batch_size / n``), per-record gradient clipping to ``max_grad_norm`` and Gaussian
noise of std ``noise_multiplier * max_grad_norm``. The privacy of the ``steps`` taken is
that of the Poisson-subsampled Gaussian mechanism composed ``steps`` times, which the
site ledger accounts (:class:`privacy.LedgerEvent` of kind ``dpsgd``).

Opacus draws its noise from torch's default generator; its ``secure_mode`` needs
``torchcsprng``, which has no build for current torch releases, so the DP-SGD noise is
not from a cryptographically secure source. Explanation releases are (see
:mod:`privacy.randomness`).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlens.errors import ConfigurationError

__all__ = ["TrainResult", "evaluate", "planned_steps", "train_dp"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    sampling_rate: float
    mean_loss: float
    records: int


def planned_steps(records: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """``(sampling_rate, steps)`` of ``epochs`` passes with Poisson batches of expected size."""
    if records < 1:
        raise ConfigurationError("a site needs at least one record to train")
    q = min(1.0, batch_size / records)
    return q, epochs * math.ceil(1.0 / q)


def train_dp(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None = None,
) -> TrainResult:
    """Train ``model`` in place with DP-SGD for ``epochs`` expected passes.

    Parameters
    ----------
    features, labels
        ``(n, d)`` float32 and ``(n,)`` int64 in {0, 1}.
    seed
        Seeds the Poisson sampler and the noise; ``None`` in production.
    """
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ConfigurationError(
            f"noise_multiplier must be finite and >= 0, got {noise_multiplier}"
        )
    if max_grad_norm <= 0:
        raise ConfigurationError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    n = features.shape[0]
    q, steps = planned_steps(n, batch_size, epochs)
    data = TensorDataset(
        torch.tensor(features, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.float32),
    )
    loader = DataLoader(data, batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    # Imported here: opacus is slow to import and only training needs it.
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off; the module docstring says so.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        private_model, private_opt, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=generator,
        )
    loss_fn = nn.BCEWithLogitsLoss()
    private_model.train()
    total, batches, taken = 0.0, 0, 0
    # The first layer's inputs need no gradient, which torch reports on every backward.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        for _ in range(epochs):
            for x, y in private_loader:
                if taken >= steps:
                    break
                private_opt.zero_grad()
                if x.shape[0] == 0:
                    # An empty Poisson batch still counts as a step (and gets noise).
                    out = private_model(torch.zeros(0, features.shape[1]))
                    loss = loss_fn(out.squeeze(-1), y)
                else:
                    loss = loss_fn(private_model(x).squeeze(-1), y)
                    total += float(loss.detach())
                    batches += 1
                loss.backward()
                private_opt.step()
                taken += 1
    finally:
        private_model._close()
    return TrainResult(steps=taken, sampling_rate=q, mean_loss=total / max(batches, 1), records=n)


@torch.no_grad()
def evaluate(model: nn.Module, features: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(accuracy, mean BCE loss)`` of ``model`` on encoded records."""
    was_training = model.training
    model.eval()
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    logits = model(x).squeeze(-1)
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, y))
    acc = float(((logits > 0).float() == y).float().mean())
    model.train(was_training)
    return acc, loss
