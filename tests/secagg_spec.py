"""The round spec the secure-aggregation tests share: a three-coordinate attribution."""

from __future__ import annotations

import json

from fedlens.types import RoundSpec

LABELS = ("age", "sex=Female", "sex=Male")
CLIP = 0.5


def attribution_round(
    round_id: str,
    site_ids: tuple[str, ...],
    *,
    threshold: int = 0,
    phase_timeout_s: float = 10.0,
) -> RoundSpec:
    """A ``global_attribution`` round over ``LABELS`` (age, and sex one-hot)."""
    return RoundSpec(
        round_id=round_id,
        kind="global_attribution",
        site_ids=site_ids,
        length=len(LABELS) + 1,
        bits=40,
        scale=2.0**16,
        clip_bound=CLIP,
        labels=LABELS,
        phase_timeout_s=phase_timeout_s,
        params={"groups": json.dumps({"age": [0], "sex": [1, 2]})},
        threshold=threshold,
    )
