"""Every Opacus gradient-sample mode trains the same weights from the same seed.

The seed fixes the Poisson batches and the noise, so the modes can differ only in the
clipped per-record gradients they sum; clipping binds in these runs (a run without it
ends elsewhere), so a mode that clipped differently, or not at all, would disagree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.training import (
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    GradSampleMode,
    TrainResult,
    train_dp,
)
from fedlens.errors import ConfigurationError
from fedlens.models import build_model

DIMENSION = 6
CLIP = 0.05


def records(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    features = rng.normal(size=(n, DIMENSION)).astype(np.float32)
    labels = (features[:, 0] + rng.normal(size=n) > 0).astype(np.int64)
    return features, labels


def train(
    model_name: str, n: int, batch_size: int, mode: GradSampleMode, clip: float = CLIP
) -> tuple[torch.Tensor, TrainResult]:
    model = build_model(model_name, DIMENSION, seed=1)
    features, labels = records(n)
    result = train_dp(
        model,
        features,
        labels,
        epochs=2,
        batch_size=batch_size,
        learning_rate=0.5,
        noise_multiplier=0.3,
        max_grad_norm=clip,
        seed=7,
        grad_sample_mode=mode,
    )
    return torch.cat([p.detach().flatten() for p in model.parameters()]), result


@pytest.mark.parametrize("model_name", ["logistic", "mlp"])
@pytest.mark.parametrize(
    ("n", "batch_size"),
    [
        pytest.param(96, 16, id="full-batches"),
        # q = 1/12: about a third of the Poisson batches are empty.
        pytest.param(12, 1, id="empty-batches"),
    ],
)
def test_every_mode_trains_the_same_weights(model_name: str, n: int, batch_size: int) -> None:
    reference, reference_result = train(model_name, n, batch_size, "hooks")
    unclipped, _ = train(model_name, n, batch_size, "hooks", clip=1e6)
    assert not torch.allclose(reference, unclipped, atol=1e-3), "clipping must bind"
    differences = {}
    for mode in GRAD_SAMPLE_MODES:
        weights, result = train(model_name, n, batch_size, mode)
        differences[mode] = float((weights - reference).abs().max())
        assert result.steps == reference_result.steps == 2 * -(-n // batch_size)
        assert result.mean_loss == pytest.approx(reference_result.mean_loss, abs=1e-5)
    assert all(d <= 1e-5 for d in differences.values()), differences


def test_the_default_mode_is_one_of_the_modes() -> None:
    assert DEFAULT_GRAD_SAMPLE_MODE in GRAD_SAMPLE_MODES


def test_an_unknown_mode_is_refused() -> None:
    features, labels = records(8)
    with pytest.raises(ConfigurationError, match="grad_sample_mode"):
        train_dp(
            build_model("logistic", DIMENSION),
            features,
            labels,
            epochs=1,
            batch_size=4,
            learning_rate=0.1,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="vmap",  # type: ignore[arg-type]
        )
