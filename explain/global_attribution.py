"""``global_attribution``: mean Integrated Gradients per feature, summed across sites.

Each record's attribution vector (Sundararajan et al. 2017, through Captum) on the
global model's logit is clipped to L2 norm ``clip_bound`` before summing, so one record
moves a site's contribution by at most ``sqrt(2) * clip_bound`` (attribution plus count
coordinate; see :func:`explain.registry.l2_sensitivity`). The released value is the
noised sum divided by the noised count: a post-processing of DP sums, so it costs no
further privacy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from explain.registry import Contribution, ExplanationKind, PostProcessed, register_kind
from fedlens.errors import ExplanationError
from fedlens.types import ReleasedValue
from privacy import clip_rows

__all__ = ["GLOBAL_ATTRIBUTION", "integrated_gradients"]

DEFAULT_STEPS = 32


def integrated_gradients(
    model: nn.Module,
    features: np.ndarray,
    *,
    baseline: np.ndarray | None = None,
    n_steps: int = DEFAULT_STEPS,
    batch_size: int = 1024,
) -> np.ndarray:
    """Integrated Gradients of the model's logit for every record.

    Parameters
    ----------
    model
        Maps ``(n, d)`` to ``(n, 1)`` logits.
    features
        ``(n, d)`` encoded records.
    baseline
        ``(d,)`` reference point; zeros (the low end of every scaled range, no category)
        by default.
    n_steps
        Riemann steps of the path integral (Gauss–Legendre in Captum).

    Returns
    -------
    numpy.ndarray
        ``(n, d)`` float64 attributions; each row sums to ``f(x) - f(baseline)`` up to
        the integration error.
    """
    if features.ndim != 2:
        raise ExplanationError(f"features must be (n, d), got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ExplanationError("features contain NaN or infinite values")
    d = features.shape[1]
    base = np.zeros(d) if baseline is None else np.asarray(baseline, dtype=np.float64)
    if base.shape != (d,):
        raise ExplanationError(f"baseline must have shape ({d},), got {base.shape}")
    # Imported here: captum is slow to import and only explanation rounds need it.
    from captum.attr import IntegratedGradients

    was_training = model.training
    model.eval()
    ig = IntegratedGradients(model)
    out = []
    try:
        for start in range(0, features.shape[0], batch_size):
            x = torch.tensor(features[start : start + batch_size], dtype=torch.float32)
            b = torch.tensor(base, dtype=torch.float32).expand_as(x)
            attr = ig.attribute(x, baselines=b, target=0, n_steps=n_steps)
            out.append(attr.detach().to(torch.float64).numpy())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, d))
    return np.concatenate(out)


def _contribute(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    params: Mapping[str, str],
    clip_bound: float,
    /,
    sensitive: Mapping[str, np.ndarray] | None = None,
) -> Contribution:
    del labels, sensitive  # attributions explain the prediction, whatever the record's label
    n_steps = int(params.get("n_steps", DEFAULT_STEPS))
    names = (
        tuple(json.loads(params["feature_names"]))
        if "feature_names" in params
        else tuple(f"x{i}" for i in range(features.shape[1]))
    )
    if len(names) != features.shape[1]:
        raise ExplanationError(
            f"{len(names)} feature names for {features.shape[1]} feature columns"
        )
    clipped = clip_rows(integrated_gradients(model, features, n_steps=n_steps), clip_bound)
    count = clipped.shape[0]
    vector = np.concatenate([clipped.sum(axis=0), [count * clip_bound]])
    return Contribution(vector=vector, count=count, labels=names)


def _postprocess(
    noised_sum: np.ndarray,
    noise_std: float,
    clip_bound: float,
    labels: tuple[str, ...],
    params: Mapping[str, str],
) -> PostProcessed:
    noised_count = float(noised_sum[-1] / clip_bound)
    # A noised count can be tiny or negative when few records took part; the mean is
    # then meaningless, so floor the divisor at one record.
    divisor = max(noised_count, 1.0)
    means = noised_sum[:-1] / divisor
    std = noise_std / divisor
    values = tuple(
        ReleasedValue(name=name, value=float(v), noise_std=std)
        for name, v in zip(labels, means, strict=True)
    )
    groups: Mapping[str, list[int]] = json.loads(params.get("groups", "{}"))
    grouped = tuple(
        ReleasedValue(
            name=feature,
            value=float(means[cols].sum()),
            noise_std=float(std * np.sqrt(len(cols))),
        )
        for feature, cols in groups.items()
    )
    grouped = tuple(sorted(grouped, key=lambda v: -abs(v.value)))
    return PostProcessed(noised_count=noised_count, values=values, grouped=grouped)


GLOBAL_ATTRIBUTION = register_kind(
    ExplanationKind(name="global_attribution", contribute=_contribute, postprocess=_postprocess)
)
