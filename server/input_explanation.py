"""Explaining one analyst's input with the stored global model and released statistics.

The coordinator side of the ``ExplainInput`` query: it reads the model and the latest
fitting ``feature_stats`` release from the store and calls the pure explanation code of
:mod:`explain.local`, :mod:`explain.counterfactual` and :mod:`explain.cards`. Only the
model and DP releases are used, so the answer costs no privacy.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Mapping
from datetime import datetime

import numpy as np
import torch

from explain.cards import prediction_card
from explain.counterfactual import Counterfactual, SearchLimits, find_counterfactual
from explain.local import RawValue, baseline_from_feature_stats, explain_input, schema_baseline
from fedlens.datasets import Preprocessor, load_dataset
from fedlens.errors import ExplanationError, IntegrityError, StorageError
from fedlens.models import build_model
from fedlens.types import FeatureAttribution, FeatureChange, InputExplanation, Release
from server.storage import Store, StoredModel

__all__ = ["explain_stored_input"]

logger = logging.getLogger(__name__)

# How many recent feature_stats releases to consider when looking for one that fits.
_RELEASES_SEARCHED = 20


@functools.lru_cache(maxsize=8)
def _preprocessor(dataset: str, seed: int) -> Preprocessor:
    return load_dataset(dataset, seed=seed).preprocessor


def _feature_stats(
    store: Store, stored: StoredModel, preprocessor: Preprocessor
) -> tuple[Release, np.ndarray] | None:
    """The newest ``feature_stats`` release that fits the model's encoding, with its baseline."""
    for summary in store.list_releases(limit=_RELEASES_SEARCHED, kind="feature_stats"):
        release = store.get_release(summary.release_id)
        if release.params.get("dataset", stored.dataset) != stored.dataset:
            continue
        try:
            return release, baseline_from_feature_stats(preprocessor, release.values)
        except ExplanationError as exc:
            logger.info("release %s does not fit: %s", release.release_id, exc)
    return None


def _exact(value: RawValue) -> str:
    """A raw value as text that parses back to the same value (the card rounds instead)."""
    if isinstance(value, str):
        return value
    return str(int(value)) if value.is_integer() else repr(value)


def explain_stored_input(
    store: Store, record: Mapping[str, str], *, model_id: str = "", top: int = 0
) -> InputExplanation:
    """Explain ``record`` with the stored model ``model_id`` (the latest if empty).

    Parameters
    ----------
    store
        Holds the trained models and the releases.
    record
        Raw feature values by name, numbers as decimal text.
    model_id
        A stored model's id, or empty for the latest.
    top
        Attributions returned, most important first; 0 returns all.

    Raises
    ------
    NotFoundError
        No such model, or no model stored yet.
    ConfigurationError
        The record does not fit the model's schema; the message names the feature.
    StorageError
        The stored weights do not fit the model's architecture.
    """
    stored = store.get_model(model_id) if model_id else store.latest_model()
    preprocessor = _preprocessor(stored.dataset, int(stored.params.get("seed", "0") or 0))
    model = build_model(stored.model, preprocessor.dimension)
    try:
        model.load_state_dict(dict(stored.state))
    except RuntimeError as exc:
        raise StorageError(f"model {stored.model_id} does not load: {exc}") from None
    found = _feature_stats(store, stored, preprocessor)
    if found is None:
        baseline, source = schema_baseline(preprocessor), "schema"
        limits = SearchLimits.from_schema(preprocessor)
        reference = "the middle of every schema range"
    else:
        release, baseline = found
        source = f"feature_stats release {release.release_id}"
        limits = SearchLimits.from_feature_stats(preprocessor, release.values, source=source)
        reference = "an average record"
    local = explain_input(model, preprocessor, record, baseline)
    counterfactual: Counterfactual | None = None
    note = ""
    try:
        counterfactual = find_counterfactual(model, preprocessor, local.record, limits)
    except ExplanationError as exc:
        note = str(exc)
    card = prediction_card(
        local,
        counterfactual,
        reference=reference,
        no_counterfactual=(
            "" if counterfactual else f"No small change within the {source} limits flips it."
        ),
    )
    attributions = local.attributions[:top] if top > 0 else local.attributions
    return InputExplanation(
        model_id=stored.model_id,
        predicted_label=local.predicted_label,
        probability=local.probability,
        attributions=tuple(
            FeatureAttribution(a.feature, _exact(a.value), a.attribution) for a in attributions
        ),
        changes=tuple(
            FeatureChange(c.feature, _exact(c.original), _exact(c.proposed))
            for c in (counterfactual.changes if counterfactual else ())
        ),
        counterfactual_label=counterfactual.predicted_label if counterfactual else "",
        counterfactual_probability=counterfactual.probability if counterfactual else 0.0,
        counterfactual_note=note,
        card=card,
        baseline=source,
        method=local.method,
    )


def publish_model(
    store: Store,
    *,
    dataset: str,
    model: str,
    state: bytes,
    params: Mapping[str, str],
    now: datetime,
) -> str:
    """Check and store a trained global model sent by the coordinator's training run.

    The weights must load (``torch.load`` with ``weights_only``) into
    ``build_model(model, dimension)`` for the dataset's public encoding, strictly, and be
    finite. Returns the new model id.

    Raises
    ------
    IntegrityError
        The bytes are not a state dict of tensors, do not fit the model, or hold NaN or
        infinite values; nothing is stored.
    ConfigurationError
        Unknown dataset or model name.
    """
    pre = _preprocessor(dataset, int(params.get("seed", "0") or 0))
    try:
        loaded = torch.load(io.BytesIO(state), weights_only=True)
    except Exception as exc:
        raise IntegrityError(f"model weights do not load: {exc}") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise IntegrityError("model weights must be a state dict of named tensors")
    net = build_model(model, pre.dimension)
    try:
        net.load_state_dict(loaded, strict=True)
    except RuntimeError as exc:
        raise IntegrityError(f"weights do not fit {model} for {dataset}: {exc}") from None
    bad = [k for k, v in loaded.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise IntegrityError(f"model weights hold NaN or infinite values in {', '.join(bad)}")
    return store.save_model(dataset=dataset, model=model, state=loaded, now=now, params=params)
