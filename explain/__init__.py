"""Explanation methods as pure functions: model + local data + spec -> clipped contribution."""

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
    "GLOBAL_ATTRIBUTION",
    "Contribution",
    "ExplanationKind",
    "PostProcessed",
    "available_kinds",
    "get_kind",
    "integrated_gradients",
    "l2_sensitivity",
    "register_kind",
]
