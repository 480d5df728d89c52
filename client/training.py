"""DP-SGD at a site with Opacus (Abadi et al. 2016).

Poisson sampling (each record joins each batch independently with probability
``q = batch_size / n``), per-record gradient clipping to ``max_grad_norm`` and Gaussian
noise of std ``noise_multiplier * max_grad_norm``. The privacy of the ``steps`` taken is
that of the Poisson-subsampled Gaussian mechanism composed ``steps`` times, which the
site ledger accounts (:class:`privacy.LedgerEvent` of kind ``dpsgd``).

Noise. Opacus draws its noise (and, unless seeded, the Poisson batches) from torch's
default generator; its ``secure_mode`` needs ``torchcsprng``, which cannot be installed
beside torch 2.13 on Python 3.11: its last release on PyPI, 0.2.1 (March 2021), has
wheels for CPython 3.6-3.9 only and no source distribution. Sites therefore pass a
``noise_source`` (:class:`privacy.SecureRandom`, the operating system's CSPRNG), and
:func:`train_dp` replaces the optimizer's noise step with one that draws from it. The
Poisson *sampling* still comes from torch's generator (Opacus offers no hook for it); it
decides which records join a batch, not the noise. Like Opacus without ``secure_mode``,
the Gaussian samples are floating-point (Mironov, CCS 2012, applies).

How per-record gradients are computed is Opacus's ``grad_sample_mode``; every mode gives
the same clipped gradients for :mod:`fedlens.models` (``tests/client/test_training_modes.py``)
and they differ only in speed. `DEFAULT_GRAD_SAMPLE_MODE` is the fastest one measured by
``python -m benchmarks.dpsgd``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Final, Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedlens.errors import ConfigurationError
from privacy import NoiseSource
from privacy.planning import training_schedule

__all__ = [
    "DEFAULT_GRAD_SAMPLE_MODE",
    "GRAD_SAMPLE_MODES",
    "EncodedRecords",
    "GradSampleMode",
    "TrainResult",
    "evaluate",
    "planned_steps",
    "record_loader",
    "train_dp",
]

logger = logging.getLogger(__name__)

GradSampleMode = Literal["hooks", "functorch", "ew", "ghost"]
"""Opacus's ways of computing per-record gradients: its per-layer hooks, functorch's
``vmap``, torch's ExpandedWeights, or ghost clipping (only the gradients' norms, from each
layer's inputs and output gradients, then a second backward pass of the clipped loss)."""

GRAD_SAMPLE_MODES: Final[tuple[GradSampleMode, ...]] = get_args(GradSampleMode)

DEFAULT_GRAD_SAMPLE_MODE: Final[GradSampleMode] = "ew"
"""torch's ExpandedWeights: the fastest mode in six of nine runs of
``python -m benchmarks.dpsgd`` on a machine with 2 cores (1 torch thread; MLP on the
32,561 Adult training records, batch 256, 128 Poisson steps, median of 5 to 7
interleaved epochs). In the last run, on an otherwise idle machine: plain SGD 0.123 s per
epoch; ew 0.329 s (2.68x), ghost clipping 0.343 s (2.79x), hooks 0.351 s (2.86x),
functorch 0.673 s (5.48x). Ghost clipping came first in at least one of the others and is
within run-to-run noise of ew; it never holds per-record gradients, only their norms, so
it is the better choice once models grow.

No mode reaches 1.5x plain SGD for models this small: DP-SGD adds about 1.6 ms of fixed
per-layer work to each step (per-sample gradients, clipping and noise), where a whole
plain step, loading included, takes about 1 ms."""


@dataclass(frozen=True)
class TrainResult:
    steps: int
    sampling_rate: float
    mean_loss: float
    records: int


class EncodedRecords(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Encoded records that a `DataLoader` gathers a whole batch at a time.

    ``DataLoader`` calls ``__getitems__`` with the indices of a batch, so a batch costs
    one indexing per tensor instead of one ``__getitem__`` per record and a
    ``default_collate`` stack. For the small models of :mod:`fedlens.models` that
    collation dominated: one epoch of Adult batches of 256 took 0.245 s record by record
    and 0.058 s gathered, and a whole epoch of plain SGD on the MLP, gathered, 0.123 s
    (``benchmarks.dpsgd``). An empty list of indices gives tensors with zero rows, which
    is the empty Poisson batch.

    Parameters
    ----------
    features
        ``(n, d)`` float32.
    labels
        ``(n,)``, returned as float32 (the target of ``BCEWithLogitsLoss``).
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = torch.tensor(features, dtype=torch.float32)
        self.labels = torch.tensor(labels, dtype=torch.float32)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.features[rows], self.labels[rows]


def _gathered(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collation of a batch that `EncodedRecords.__getitems__` already stacked."""
    return batch


def record_loader(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """A loader of batches ``(x (b, d) float32, y (b,) float32)`` over encoded records.

    Opacus replaces its sampler by Poisson sampling with rate ``1 / len(loader)`` and
    draws the batches from ``generator`` (torch's default generator if ``None``).
    """
    return DataLoader(
        EncodedRecords(features, labels),
        batch_size=batch_size,
        collate_fn=_gathered,  # type: ignore[arg-type]
        generator=generator,
    )


def planned_steps(records: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """``(sampling_rate, steps)`` of ``epochs`` passes with Poisson batches of expected size.

    The rate is the one Opacus samples at, ``1 / ceil(records / batch_size)``
    (:func:`privacy.planning.training_schedule`), so the ledger accounts exactly the
    sampling that happens.
    """
    return training_schedule(records, batch_size, epochs)


def _generators(seed: int | None) -> tuple[torch.Generator | None, torch.Generator | None]:
    """``(sampling, noise)`` generators: independent streams from ``seed``, or torch's default."""
    if seed is None:
        return None, None
    sampling, noise = np.random.SeedSequence(seed).generate_state(2, np.uint64)
    return (
        torch.Generator().manual_seed(int(sampling)),
        torch.Generator().manual_seed(int(noise)),
    )


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
    grad_sample_mode: GradSampleMode = DEFAULT_GRAD_SAMPLE_MODE,
    noise_source: NoiseSource | None = None,
) -> TrainResult:
    """Train ``model`` in place with DP-SGD for ``epochs`` expected passes.

    Parameters
    ----------
    features, labels
        ``(n, d)`` float32 and ``(n,)`` int64 in {0, 1}.
    seed
        Seeds the Poisson sampler and the noise (two independent streams); ``None`` in
        production.
    grad_sample_mode
        How Opacus computes the per-record gradient norms (see `GradSampleMode`); the
        trained weights do not depend on it, only the time taken.
    noise_source
        Where the Gaussian noise of every step comes from. Sites pass
        :class:`privacy.SecureRandom` (the operating system's CSPRNG); ``None`` leaves
        Opacus's own draw from torch's generator (seeded by ``seed``), for tests and
        benchmarks.

    Raises
    ------
    ConfigurationError
        For a negative or infinite ``noise_multiplier``, ``max_grad_norm <= 0``, no
        records, or an unknown ``grad_sample_mode``.
    """
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ConfigurationError(
            f"noise_multiplier must be finite and >= 0, got {noise_multiplier}"
        )
    if max_grad_norm <= 0:
        raise ConfigurationError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigurationError(
            f"unknown grad_sample_mode {grad_sample_mode!r}; "
            f"expected one of {', '.join(GRAD_SAMPLE_MODES)}"
        )
    n = features.shape[0]
    q, steps = planned_steps(n, batch_size, epochs)
    sampling, noise = _generators(seed)
    loader = record_loader(features, labels, batch_size=batch_size, generator=sampling)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    ghost = grad_sample_mode == "ghost"
    # Imported here: opacus is slow to import and only training needs it.
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off; the module docstring says so.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        prepared = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=loss_fn,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise,
            grad_sample_mode=grad_sample_mode,
        )
    if noise_source is not None and noise_multiplier > 0:
        _draw_noise_from(prepared[1], noise_source)
    if ghost:
        # Ghost clipping's criterion runs both backward passes in ``loss.backward()``.
        private_model, private_opt, criterion, private_loader = prepared
    else:
        private_model, private_opt, private_loader = prepared
        criterion = loss_fn
    private_model.train()
    total, batches, taken = 0.0, 0, 0
    try:
        with warnings.catch_warnings():
            # The first layer's inputs need no gradient, which torch reports on every
            # backward.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(epochs):
                for x, y in private_loader:
                    if taken >= steps:
                        break
                    private_opt.zero_grad()
                    if x.shape[0] == 0:
                        # An empty Poisson batch still counts as a step (and gets noise):
                        # its sum of clipped gradients is zero. It is handed to the
                        # optimizer directly, as ExpandedWeights refuses a batch of size 0.
                        _zero_clipped_sum(private_opt.params, ghost=ghost)
                    else:
                        loss = criterion(private_model(x).squeeze(-1), y)
                        total += float(loss.detach())
                        batches += 1
                        loss.backward()
                    private_opt.step()
                    taken += 1
    finally:
        private_model._close()
    return TrainResult(steps=taken, sampling_rate=q, mean_loss=total / max(batches, 1), records=n)


def _draw_noise_from(optimizer: object, source: NoiseSource) -> None:
    """Make an Opacus optimizer draw its noise from ``source`` instead of torch's generator.

    Opacus offers no hook for the noise source short of its ``secure_mode`` (which needs
    torchcsprng), so this replaces the optimizer's ``add_noise`` with the same steps as
    Opacus 1.6's (``DPOptimizer`` and ``DPOptimizerFastGradientClipping`` alike): for
    every parameter, the clipped sum plus Gaussian noise of std
    ``noise_multiplier * max_grad_norm``.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    params: list[nn.Parameter] = optimizer.params  # type: ignore[attr-defined]

    def add_noise() -> None:
        std = float(optimizer.noise_multiplier) * float(optimizer.max_grad_norm)  # type: ignore[attr-defined]
        for p in params:
            summed: torch.Tensor = p.summed_grad  # type: ignore[attr-defined]
            _check_processed_flag(summed)
            draw = torch.from_numpy(source.normal(summed.numel(), std))
            p.grad = (summed + draw.to(summed.dtype).view_as(summed)).view_as(p)
            _mark_as_processed(summed)

    optimizer.add_noise = add_noise  # type: ignore[attr-defined]


def _zero_clipped_sum(params: list[nn.Parameter], *, ghost: bool) -> None:
    """Give the Opacus optimizer an empty batch: no per-record gradients to clip.

    The per-sample modes clip ``p.grad_sample`` (here with no rows); ghost clipping's
    optimizer takes the already-clipped sum from ``p.grad``.
    """
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]


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
