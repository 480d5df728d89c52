"""global_attribution: known answers, the clip bound, and post-processing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from explain import get_kind, integrated_gradients, l2_sensitivity
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.models import build_model


def logistic(d: int, seed: int) -> tuple[torch.nn.Module, np.ndarray, float]:
    model = build_model("logistic", d, seed=seed)
    w = model.linear.weight.detach().numpy()[0].astype(np.float64)
    b = float(model.linear.bias.detach())
    return model, w, b


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 12), st.integers(0, 1000))
def test_ig_of_a_logistic_model_is_w_times_x_minus_baseline(d: int, seed: int) -> None:
    model, w, _ = logistic(d, seed)
    rng = np.random.default_rng(seed)
    x = rng.random((7, d)).astype(np.float32)
    base = rng.random(d)
    attr = integrated_gradients(model, x, baseline=base, n_steps=8)
    # The logit is linear, so every integration rule is exact.
    np.testing.assert_allclose(attr, w * (x - base), rtol=1e-5, atol=1e-6)


def test_ig_of_an_mlp_satisfies_completeness() -> None:
    model = build_model("mlp", 5, seed=3)
    x = np.random.default_rng(0).random((20, 5)).astype(np.float32)
    attr = integrated_gradients(model, x, n_steps=64)
    with torch.no_grad():
        gap = (model(torch.as_tensor(x)) - model(torch.zeros(1, 5))).numpy()[:, 0]
    np.testing.assert_allclose(attr.sum(axis=1), gap, atol=2e-3)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 5.0), st.integers(0, 10_000))
def test_every_record_term_respects_the_clip_bound(clip: float, seed: int) -> None:
    model, _, _ = logistic(6, seed)
    with torch.no_grad():
        model.linear.weight.mul_(50.0)  # large attributions, so clipping bites
    x = np.random.default_rng(seed).random((30, 6)).astype(np.float32)
    kind = get_kind("global_attribution")
    total = kind.contribute(model, x, np.zeros(30, dtype=np.int64), {}, clip).vector
    assert total.shape == (7,)
    assert total[-1] == pytest.approx(30 * clip)
    # Removing any one record moves the sum by at most the declared sensitivity.
    for i in range(30):
        rest = np.delete(x, i, axis=0)
        without = kind.contribute(model, rest, np.zeros(29, dtype=np.int64), {}, clip).vector
        # Float sums of different subsets differ by rounding only.
        assert np.linalg.norm(total - without) <= l2_sensitivity(clip) * (1 + 1e-6)


def test_postprocess_divides_by_the_noised_count_and_groups_columns() -> None:
    kind = get_kind("global_attribution")
    labels = ("age", "sex=Male", "sex=Female")
    params = {"groups": json.dumps({"age": [0], "sex": [1, 2]})}
    noised = np.array([10.0, -4.0, 2.0, 20.0 * 0.5])  # 20 records at clip 0.5
    post = kind.postprocess(noised, 1.0, 0.5, labels, params)
    assert post.noised_count == pytest.approx(20.0)
    assert [v.value for v in post.values] == pytest.approx([0.5, -0.2, 0.1])
    assert post.values[0].noise_std == pytest.approx(1.0 / 20)
    assert [g.name for g in post.grouped] == ["age", "sex"]
    assert post.grouped[1].value == pytest.approx(-0.1)


def test_bad_input_is_refused_with_a_named_problem() -> None:
    model, _, _ = logistic(3, 0)
    with pytest.raises(ExplanationError, match="NaN"):
        integrated_gradients(model, np.array([[0.0, np.nan, 1.0]], dtype=np.float32))
    with pytest.raises(ExplanationError, match="shape"):
        integrated_gradients(model, np.zeros(3, dtype=np.float32))
    with pytest.raises(ExplanationError, match="baseline"):
        integrated_gradients(model, np.zeros((2, 3), dtype=np.float32), baseline=np.zeros(4))
    with pytest.raises(ConfigurationError, match="unknown explanation kind 'nope'"):
        get_kind("nope")
