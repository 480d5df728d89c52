"""A site's own most suspicious records, ranked locally: ``fedlens client review``.

Self-influence (how much a record's own loss would rise without it; Koh & Liang 2017)
is large for mislabelled and atypical records. The ``self_influence`` kind releases only
DP histograms of it; this module ranks the site's records by it for the site's own
operator. Nothing here leaves the site, so no noise and no budget are involved.

It reads what the site keeps in its state directory (:mod:`client.site_state`). The
released factors are used when they belong to the saved model; otherwise the site
computes the curvature from its own records (exact Hessian for logistic models, K-FAC
for MLPs) — local data, local use.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.site import Site
from client.site_config import SiteConfig
from client.site_state import FACTORS_FILE, FACTORS_META, MODEL_FILE, SITE_FILE
from explain.influence_setup import InfluenceScorer
from explain.second_order import (
    SecondOrder,
    hessian_terms_sum,
    kfac_terms_sum,
    model_fingerprint,
)
from explain.self_influence import RankedRecord, rank_records
from fedlens.errors import ConfigurationError
from fedlens.runconfig import RunConfig

__all__ = ["Review", "review_site"]


@dataclass(frozen=True)
class Review:
    """The ranked records and how they were scored.

    ``curvature`` is ``"released"`` (the federation's factors) or ``"local"`` (the
    site's own records); ``rows`` holds each ranked record's raw features.
    """

    site: str
    method: str
    curvature: str
    records: int
    ranked: tuple[RankedRecord, ...]
    rows: tuple[Mapping[str, object], ...]


def _load_site(state_dir: Path) -> Site:
    path = state_dir / SITE_FILE
    if not path.exists():
        raise ConfigurationError(
            f"{state_dir} holds no {SITE_FILE}: this site has not taken part in a run yet"
        )
    saved = json.loads(path.read_text())
    node = {**saved["node"], "state-dir": str(state_dir)}
    return Site(RunConfig.from_flower(saved["run"]), SiteConfig.from_flower(node))


def _released(state_dir: Path, model: nn.Module) -> SecondOrder | None:
    meta_path, npz_path = state_dir / FACTORS_META, state_dir / FACTORS_FILE
    if not (meta_path.exists() and npz_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("second_order_fingerprint") != model_fingerprint(model):
        return None  # factors of an older model: stale
    with np.load(npz_path) as saved:
        mean = saved["second_order"]
    count = float(meta["second_order_count"])
    return SecondOrder.from_packed(
        model, meta["method"], mean * count, count, float(meta["damping"])
    )


def review_site(state_dir: Path, top: int = 20) -> Review:
    """Rank the site's records by self-influence, most suspicious first.

    Raises
    ------
    ConfigurationError
        The state directory holds no site configuration or no global model yet, or
        ``top`` < 1.
    """
    if top < 1:
        raise ConfigurationError(f"top must be >= 1, got {top}")
    site = _load_site(state_dir)
    model_path = state_dir / MODEL_FILE
    if not model_path.exists():
        raise ConfigurationError(
            f"{state_dir} holds no global model yet: the site has not taken part in a round"
        )
    data = site.data()
    model = site.model(data.features.shape[1], torch.load(model_path, weights_only=True))
    x = np.asarray(data.features, dtype=np.float64)
    second = _released(state_dir, model)
    curvature = "released"
    if second is None:
        curvature = "local"
        method = "hessian" if site.run.model == "logistic" else "kfac"
        terms = hessian_terms_sum if method == "hessian" else kfac_terms_sum
        packed, n = terms(model, x, math.inf)
        second = SecondOrder.from_packed(model, method, packed, n, site.run.influence_damping)
    scorer = InfluenceScorer(model, second.form, second=second)
    scores = scorer.self_scores(x, data.labels)
    with torch.no_grad():
        logits = model(torch.as_tensor(data.features)).double().numpy().reshape(-1)
    losses = np.logaddexp(0.0, logits) - data.labels * logits
    ranked = rank_records(scores, losses, data.labels, min(top, data.size))
    frame = data.frame
    rows = tuple(
        {"row": int(frame.index[r.position]), **frame.iloc[r.position].to_dict()} for r in ranked
    )
    return Review(site.name, second.form, curvature, data.size, tuple(ranked), rows)
