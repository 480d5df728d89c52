"""Attribution methods of a binary model's logit, one function per method, through Captum.

Every method maps ``(n, d)`` encoded records to ``(n, d)`` float64 attributions of the
model's single output (the class-1 logit), each row a function of that record alone.
That last property is what the ``global_attribution`` kind's sensitivity argument needs:
removing one record from a site removes exactly one term from the site's sum.

* :func:`integrated_gradients` — Sundararajan, Taly, Yan (ICML 2017), against one
  baseline.
* :func:`gradient_shap` — Lundberg & Lee (NeurIPS 2017), the expected-gradients
  estimator of Captum's ``GradientShap`` with ``stdevs=0``: the mean over samples of
  ``grad f(b + a (x - b)) * (x - b)``, with ``b`` drawn uniformly from a public set of
  baselines and ``a ~ U(0, 1)``.
* :func:`feature_ablation` — Captum's ``FeatureAblation``, one encoded column at a
  time: ``f(x) - f(x with column j set to the baseline's)``.

For a logistic model, whose logit is ``w . x + c``, all three equal ``w * (x - b)``:
Integrated Gradients and ablation exactly, GradientSHAP with one baseline in
expectation (every path point has the same gradient ``w``, so it is exact there too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedlens.errors import ExplanationError

__all__ = [
    "DEFAULT_SAMPLES",
    "DEFAULT_STEPS",
    "feature_ablation",
    "gradient_shap",
    "integrated_gradients",
]

DEFAULT_STEPS = 32
DEFAULT_SAMPLES = 64


def _check(features: np.ndarray, baseline: np.ndarray | None) -> np.ndarray:
    """Validate ``(n, d)`` features and return the ``(d,)`` float64 baseline (zeros by default)."""
    if features.ndim != 2:
        raise ExplanationError(f"features must be (n, d), got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ExplanationError("features contain NaN or infinite values")
    d = features.shape[1]
    base = np.zeros(d) if baseline is None else np.asarray(baseline, dtype=np.float64)
    if base.shape != (d,):
        raise ExplanationError(f"baseline must have shape ({d},), got {base.shape}")
    if not np.all(np.isfinite(base)):
        raise ExplanationError("baseline contains NaN or infinite values")
    return base


def _batched(
    model: nn.Module,
    features: np.ndarray,
    batch_size: int,
    attribute: Callable[[torch.Tensor, int], torch.Tensor],
) -> np.ndarray:
    """Run ``attribute(x, start)`` over batches of rows with the model in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, features.shape[0], batch_size):
            x = torch.tensor(features[start : start + batch_size], dtype=torch.float32)
            out.append(attribute(x, start).detach().to(torch.float64).numpy())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, features.shape[1]))
    return np.concatenate(out)


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
    base = _check(features, baseline)
    # Imported here: captum is slow to import and only explanation rounds need it.
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)

    def attribute(x: torch.Tensor, start: int) -> torch.Tensor:
        b = torch.tensor(base, dtype=torch.float32).expand_as(x)
        result: torch.Tensor = ig.attribute(x, baselines=b, target=0, n_steps=n_steps)
        return result

    return _batched(model, features, batch_size, attribute)


def feature_ablation(
    model: nn.Module,
    features: np.ndarray,
    *,
    baseline: np.ndarray | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Feature ablation of the model's logit, one encoded column at a time.

    Parameters
    ----------
    model
        Maps ``(n, d)`` to ``(n, 1)`` logits.
    features
        ``(n, d)`` encoded records.
    baseline
        ``(d,)`` value each ablated column takes; zeros by default.

    Returns
    -------
    numpy.ndarray
        ``(n, d)`` float64: column ``j`` of row ``i`` is ``f(x_i) - f(x_i')``, where
        ``x_i'`` is ``x_i`` with column ``j`` replaced by ``baseline[j]``. Deterministic;
        exact ``w * (x - b)`` for a linear logit.
    """
    base = _check(features, baseline)
    from captum.attr import FeatureAblation

    ablation = FeatureAblation(model)
    d = features.shape[1]

    def attribute(x: torch.Tensor, start: int) -> torch.Tensor:
        b = torch.tensor(base, dtype=torch.float32).expand_as(x)
        result: torch.Tensor = ablation.attribute(
            x, baselines=b, target=0, perturbations_per_eval=max(1, min(d, 16))
        )
        return result

    return _batched(model, features, batch_size, attribute)


def gradient_shap(
    model: nn.Module,
    features: np.ndarray,
    *,
    baselines: np.ndarray | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    batch_size: int = 256,
) -> np.ndarray:
    """GradientSHAP (expected gradients) of the model's logit for every record.

    Captum's ``GradientShap`` draws its path points and baselines from NumPy's global
    generator, which a caller can neither seed per call nor share safely between
    threads (sites may run side by side in one process). This function computes the
    same estimator with Captum's gradients (``Saliency`` without absolute values) and
    its own randomness: record ``x`` draws its ``n_samples`` baselines and path points
    from a ``torch.Generator`` seeded with a hash of ``(seed, x)``. So the result is
    reproducible, and each record's attribution depends on that record alone, not on its
    position or on the other records (which the per-record sensitivity bound needs).

    Parameters
    ----------
    model
        Maps ``(n, d)`` to ``(n, 1)`` logits.
    features
        ``(n, d)`` encoded records.
    baselines
        ``(k, d)`` public reference points drawn from uniformly (zeros, ``k = 1``, by
        default). They must be public (the schema, or released DP statistics), never
        other sites' records.
    n_samples
        Samples per record; the Monte Carlo error shrinks as ``1 / sqrt(n_samples)``.
    seed
        Seed mixed into every record's generator.

    Returns
    -------
    numpy.ndarray
        ``(n, d)`` float64 attributions; each row sums to ``f(x) - E_b f(b)`` in
        expectation.
    """
    if features.ndim != 2:
        raise ExplanationError(f"features must be (n, d), got shape {features.shape}")
    d = features.shape[1]
    refs = np.zeros((1, d)) if baselines is None else np.asarray(baselines, dtype=np.float64)
    if refs.ndim != 2 or refs.shape[0] < 1 or refs.shape[1] != d:
        raise ExplanationError(f"baselines must have shape (k, {d}) with k >= 1, got {refs.shape}")
    _check(features, refs[0])
    if not np.all(np.isfinite(refs)):
        raise ExplanationError("baselines contain NaN or infinite values")
    if n_samples < 1:
        raise ExplanationError(f"n_samples must be at least 1, got {n_samples}")
    from captum.attr import Saliency

    saliency = Saliency(model)
    refs_t = torch.tensor(refs, dtype=torch.float32)
    rows = np.ascontiguousarray(features, dtype=np.float32)

    def attribute(x: torch.Tensor, start: int) -> torch.Tensor:
        m = x.shape[0]
        alphas = torch.empty(m, n_samples)
        picks = torch.empty(m, n_samples, dtype=torch.long)
        for i in range(m):
            gen = torch.Generator().manual_seed(_record_seed(seed, rows[start + i]))
            alphas[i] = torch.rand(n_samples, generator=gen)
            picks[i] = torch.randint(refs_t.shape[0], (n_samples,), generator=gen)
        b = refs_t[picks]  # (m, n_samples, d)
        gap = x[:, None, :] - b
        points = (b + alphas[..., None] * gap).reshape(m * n_samples, d).requires_grad_()
        grads = saliency.attribute(points, target=0, abs=False).reshape(m, n_samples, d)
        result: torch.Tensor = (grads * gap).mean(dim=1)
        return result

    return _batched(model, features, max(1, batch_size), attribute)


def _record_seed(seed: int, row: np.ndarray) -> int:
    """63-bit seed of one record's generator: a hash of the round's seed and the row's bytes."""
    digest = hashlib.blake2b(row.tobytes(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") >> 1
