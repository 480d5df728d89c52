"""A real logistic model trained on a slice of adult, and a noiseless feature_stats release.

Shared by the local-explanation, counterfactual and ExplainInput tests; cached, so each
test process trains once (about a second).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import torch
from torch import nn

from explain import get_kind
from fedlens.datasets import Preprocessor, load_dataset
from fedlens.models import build_model
from fedlens.types import ReleasedValue

ROWS = 4000
STEPS = 250
CLIP = 1.0


@functools.lru_cache(maxsize=1)
def adult_preprocessor() -> Preprocessor:
    return load_dataset("adult").preprocessor


@functools.lru_cache(maxsize=1)
def adult_features() -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: the first ``ROWS`` training rows encoded, and their labels."""
    dataset = load_dataset("adult")
    frame = dataset.train.iloc[:ROWS]
    x = adult_preprocessor().transform(frame).astype(np.float64)
    return x, frame["income"].to_numpy()


def trained_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _trained().state_dict().items()}


def trained_logistic() -> nn.Module:
    model = build_model("logistic", adult_preprocessor().dimension)
    model.load_state_dict(trained_state())
    return model


@functools.lru_cache(maxsize=1)
def _trained() -> nn.Module:
    x, y = adult_features()
    features = torch.tensor(x, dtype=torch.float32)
    labels = torch.tensor(y, dtype=torch.float32)
    model = build_model("logistic", features.shape[1])
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        rows = torch.randint(0, len(features), (256,), generator=generator)
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(features[rows]).squeeze(1), labels[rows]
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model


def stats_params(pre: Preprocessor) -> dict[str, str]:
    return {
        "feature_names": json.dumps(list(pre.encoded_names)),
        "groups": json.dumps({k: list(v) for k, v in pre.groups.items()}),
        "dataset": "adult",
    }


@functools.lru_cache(maxsize=1)
def feature_stats_values() -> tuple[tuple[ReleasedValue, ...], tuple[str, ...], float]:
    """The feature_stats release of the pooled slice without noise: values, labels, count."""
    pre = adult_preprocessor()
    x, _ = adult_features()
    kind = get_kind("feature_stats")
    params = stats_params(pre)
    contribution = kind.contribute(nn.Identity(), x, np.zeros(0), params, CLIP)
    post = kind.postprocess(contribution.vector, 0.0, CLIP, contribution.labels, params)
    return post.values, contribution.labels, post.noised_count


def record_of(row: int, *, test: bool = True) -> dict[str, object]:
    """One adult record as raw Python values (ints, floats, strings)."""
    dataset = load_dataset("adult")
    frame = dataset.test if test else dataset.train
    raw = frame.iloc[row]
    out: dict[str, object] = {}
    for spec in dataset.schema.features:
        value = raw[spec.name]
        out[spec.name] = value if isinstance(value, str) else float(value)
    return out


def complete_records(count: int) -> list[dict[str, object]]:
    """The first ``count`` test records without a missing value."""
    frame = load_dataset("adult").test
    names = list(adult_preprocessor().schema.names)
    rows = frame.index[frame[names].notna().all(axis=1)][:count]
    return [record_of(int(i)) for i in rows]
