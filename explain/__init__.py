"""Explanation methods as pure functions: model + local data + spec -> clipped contribution."""

from explain.fairness import FAIRNESS, FairnessLayout, FairnessRelease, fairness_release
from explain.feature_stats import FEATURE_STATS, FeatureLayout, feature_stats_terms
from explain.global_attribution import GLOBAL_ATTRIBUTION, integrated_gradients
from explain.group_influence import GROUP_INFLUENCE, SITE_CONTRIBUTION
from explain.influence_prototypes import INFLUENCE_PROTOTYPES
from explain.loo_unfairness import LOO_UNFAIRNESS
from explain.registry import (
    Contribution,
    ExplanationKind,
    PostProcessed,
    SiteContext,
    available_kinds,
    get_kind,
    l2_sensitivity,
    register_kind,
)
from explain.second_order_kinds import EKFAC, HESSIAN, KFAC
from explain.self_influence import SELF_INFLUENCE

__all__ = [
    "EKFAC",
    "FAIRNESS",
    "FEATURE_STATS",
    "GLOBAL_ATTRIBUTION",
    "GROUP_INFLUENCE",
    "HESSIAN",
    "INFLUENCE_PROTOTYPES",
    "KFAC",
    "LOO_UNFAIRNESS",
    "SELF_INFLUENCE",
    "SITE_CONTRIBUTION",
    "Contribution",
    "ExplanationKind",
    "FairnessLayout",
    "FairnessRelease",
    "FeatureLayout",
    "PostProcessed",
    "SiteContext",
    "available_kinds",
    "fairness_release",
    "feature_stats_terms",
    "get_kind",
    "integrated_gradients",
    "l2_sensitivity",
    "register_kind",
]
