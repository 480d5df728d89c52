"""Releases stored as the aggregator stores them: behind a completed round of their own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from fedlens.types import PrivacyCost, Release, ReleasedValue, RoundSpec
from server.storage import Store

__all__ = ["save_release", "store_release"]


def store_release(store: Store, release: Release, *, now: datetime) -> None:
    """Save ``release`` behind a completed round ``round-<release id>`` over its costs' sites."""
    spec = RoundSpec(
        round_id=f"round-{release.release_id}",
        kind=release.kind,
        site_ids=tuple(c.site_id for c in release.costs),
        length=2,
        bits=32,
        scale=1000.0,
        clip_bound=1.0,
        labels=("x",),
    )
    store.save_round(spec, "complete", now=now)
    store.save_release(replace(release, round_id=spec.round_id), created_at=now)


def save_release(
    store: Store,
    release_id: str,
    kind: str,
    sites: Sequence[str],
    *,
    now: datetime,
    values: Sequence[ReleasedValue] = (ReleasedValue("x", 1.0, 0.1),),
    grouped: Sequence[ReleasedValue] = (),
    epsilon: float = 1.0,
    delta: float = 1e-6,
    noised_count: float = 100.0,
) -> None:
    """A small release of ``kind`` that cost every site ``epsilon``."""
    store_release(
        store,
        Release(
            release_id=release_id,
            round_id="",
            kind=kind,
            created_at="",
            noised_count=noised_count,
            values=tuple(values),
            grouped=tuple(grouped),
            costs=tuple(PrivacyCost(s, epsilon, delta, epsilon) for s in sites),
        ),
        now=now,
    )
