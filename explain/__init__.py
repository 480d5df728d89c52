"""Explanation methods as pure functions: model + local data + spec -> clipped contribution."""

from explain.fairness import FAIRNESS, FairnessLayout, FairnessRelease, fairness_release
from explain.feature_stats import FEATURE_STATS, FeatureLayout, feature_stats_terms
from explain.global_attribution import GLOBAL_ATTRIBUTION, integrated_gradients
from explain.registry import (
    Contribution,
    ExplanationKind,
    PostProcessed,
    available_kinds,
    get_kind,
    l2_sensitivity,
    register_kind,
)

__all__ = [
    "FAIRNESS",
    "FEATURE_STATS",
    "GLOBAL_ATTRIBUTION",
    "Contribution",
    "ExplanationKind",
    "FairnessLayout",
    "FairnessRelease",
    "FeatureLayout",
    "PostProcessed",
    "available_kinds",
    "fairness_release",
    "feature_stats_terms",
    "get_kind",
    "integrated_gradients",
    "l2_sensitivity",
    "register_kind",
]
