"""DP-SGD noise drawn from the site's noise source, and the sampling rate the ledger uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.training import GRAD_SAMPLE_MODES, planned_steps, train_dp
from fedlens.models import build_model
from privacy import SeededRandom


class CountingSource(SeededRandom):
    """A seeded source that remembers every draw of Gaussian noise."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws: list[tuple[int, float]] = []

    def normal(self, size: int, std: float) -> np.ndarray:
        self.draws.append((size, std))
        return super().normal(size, std)


def data(n: int = 200, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def train(source: SeededRandom | None, mode: str = "ghost", z: float = 1.3) -> torch.nn.Module:
    x, y = data()
    model = build_model("logistic", x.shape[1], seed=0)
    train_dp(
        model,
        x,
        y,
        epochs=1,
        batch_size=50,
        learning_rate=0.5,
        noise_multiplier=z,
        max_grad_norm=0.7,
        seed=11,
        grad_sample_mode=mode,  # type: ignore[arg-type]
        noise_source=source,
    )
    return model


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_every_step_draws_its_noise_from_the_source(mode: str) -> None:
    source = CountingSource(5)
    train(source, mode)
    _, steps = planned_steps(200, 50, 1)
    parameters = 5 + 1  # logistic: weight (1, 5) and bias (1,)
    assert sum(size for size, _ in source.draws) == steps * parameters
    assert all(std == pytest.approx(1.3 * 0.7) for _, std in source.draws)


def test_the_source_decides_the_noise() -> None:
    same = [train(SeededRandom(1)).state_dict() for _ in range(2)]
    other = train(SeededRandom(2)).state_dict()
    torch_noise = train(None).state_dict()
    for key in same[0]:
        assert torch.equal(same[0][key], same[1][key])
    assert not torch.equal(same[0]["linear.weight"], other["linear.weight"])
    assert not torch.equal(same[0]["linear.weight"], torch_noise["linear.weight"])


def test_sampling_rate_is_the_one_opacus_samples_at() -> None:
    # 32,561 records in batches of 256: 128 batches, so Opacus samples at 1/128.
    assert planned_steps(32561, 256, 2) == (1 / 128, 256)
    assert planned_steps(100, 256, 3) == (1.0, 3)
