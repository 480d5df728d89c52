"""The figure of privacy spent per site over time, against each site's budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from explain.svg_charts import (
    PALETTE,
    WIDTH,
    Figure,
    escape,
    format_number,
    nice_ticks,
    shorten,
    svg_element,
    svg_text,
)
from fedlens.errors import BudgetExceededError
from fedlens.types import SiteLedger
from privacy.ledger import LedgerEvent, PrivacyLedger

__all__ = ["budget_figure"]

_MAX_SITES = 12


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _cumulative(ledger: SiteLedger) -> list[tuple[datetime, float]]:
    """``(time, ε spent so far)`` after each event, oldest first, composed at the site's δ."""
    events = sorted(ledger.events, key=lambda e: _utc(e.created_at))
    budget = ledger.budget_epsilon
    if not (math.isfinite(budget) and budget > 0):
        budget = 1e300  # no usable budget: compose anyway, never refuse
    delta = ledger.delta if 0 < ledger.delta < 1 else 1e-5
    points: list[tuple[datetime, float]] = []
    running = PrivacyLedger(budget, delta)
    prefix: list[LedgerEvent] = []
    for event in events:
        prefix.append(event)
        try:
            spent = running.record(event)
        except BudgetExceededError:
            # Past the budget: a ledger built from the prefix accepts it, as the mirror does.
            running = PrivacyLedger(budget, delta, prefix)
            spent = running.epsilon_spent()
        points.append((_utc(event.created_at), spent))
    return points


def budget_figure(ledgers: Sequence[SiteLedger]) -> Figure:
    """ε spent per site over time, with each site's budget as a dashed line.

    Each point composes the site's events up to then (:class:`privacy.PrivacyLedger`, at
    the site's δ), so the curve is the privacy the site had spent at that moment, not a
    sum of per-event ε.
    """
    title = "Privacy spent per site over time"
    series = [(ledger, _cumulative(ledger)) for ledger in ledgers]
    if len(series) > _MAX_SITES:
        # One line per site stays readable up to a dozen: keep those that spent most.
        def final(item: tuple[SiteLedger, list[tuple[datetime, float]]]) -> float:
            spent = item[1][-1][1] if item[1] else 0.0
            return spent if math.isfinite(spent) else math.inf

        kept = sorted(range(len(series)), key=lambda i: -final(series[i]))[:_MAX_SITES]
        series = [series[i] for i in sorted(kept)]
    times = [t for _, points in series for t, _ in points]
    if not times:
        svg = svg_element(
            title,
            WIDTH,
            80,
            [
                svg_text(WIDTH / 2, 20, title, anchor="middle", font_weight="600"),
                svg_text(WIDTH / 2, 52, "No privacy has been spent yet.", anchor="middle"),
            ],
        )
        return Figure(title, svg, "No site has spent any of its privacy budget yet.")
    budgets = [
        s.budget_epsilon
        for s in ledgers
        if math.isfinite(s.budget_epsilon) and s.budget_epsilon > 0
    ]
    top_eps = (
        max([*(e for _, p in series for _, e in p if math.isfinite(e)), *budgets, 1e-9]) * 1.08
    )
    start, end = min(times), max(times)
    span = max((end - start).total_seconds(), 1.0)
    left, right, top, bottom = 64, WIDTH - 150, 34, 250
    height = bottom + 58

    def x(t: datetime) -> float:
        return left + (t - start).total_seconds() / span * (right - left)

    def y(eps: float) -> float:
        return bottom - min(eps, top_eps) / top_eps * (bottom - top)

    body = [svg_text(WIDTH / 2, 20, title, anchor="middle", font_weight="600")]
    for tick in nice_ticks(0.0, top_eps):
        yt = y(tick)
        body.append(
            f'<line x1="{left}" y1="{yt:.1f}" x2="{right}" y2="{yt:.1f}" stroke="#e2e2e2"/>'
        )
        body.append(svg_text(left - 6, yt + 4, format_number(tick), anchor="end", font_size="11"))
    body.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#1a202c"/>')
    body.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#1a202c"/>')
    fmt = "%Y-%m-%d %H:%M"
    body.append(svg_text(left, bottom + 16, start.strftime(fmt), anchor="start", font_size="11"))
    if end > start:
        body.append(svg_text(right, bottom + 16, end.strftime(fmt), anchor="end", font_size="11"))
    body.append(svg_text((left + right) / 2, bottom + 36, "time (UTC)", anchor="middle"))
    body.append(
        svg_text(
            16,
            (top + bottom) / 2,
            "privacy spent (\u03b5)",
            anchor="middle",
            transform=f"rotate(-90 16 {(top + bottom) / 2:.1f})",
        )
    )
    notes: list[str] = []
    for i, (ledger, points) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        ly = top + 4 + i * 18
        body.append(
            f'<line x1="{right + 12}" y1="{ly:.1f}" x2="{right + 30}" y2="{ly:.1f}" '
            f'stroke="{colour}" stroke-width="2.5"/>'
        )
        body.append(svg_text(right + 36, ly + 4, shorten(ledger.site_id, 14), font_size="11"))
        budget = ledger.budget_epsilon
        if math.isfinite(budget) and budget > 0:
            body.append(
                f'<line x1="{left}" y1="{y(budget):.1f}" x2="{right}" y2="{y(budget):.1f}" '
                f'stroke="{colour}" stroke-dasharray="6 4" class="budget">'
                f"<title>{escape(ledger.site_id)} budget \u03b5 = "
                f"{escape(format_number(budget))}</title></line>"
            )
        if not points:
            continue
        path = [f"M{x(points[0][0]):.1f},{y(0.0):.1f}"]
        for t, eps in points:
            if not math.isfinite(eps):
                notes.append(ledger.site_id)
                break
            path.append(f"H{x(t):.1f}V{y(eps):.1f}")
        path.append(f"H{right:.1f}")
        body.append(
            f'<path d="{"".join(path)}" fill="none" stroke="{colour}" stroke-width="2.5">'
            f"<title>{escape(ledger.site_id)}: \u03b5 spent {escape(format_number(points[-1][1]))}"
            f"</title></path>"
        )
    caption = (
        "Each line climbs as a site spends privacy on training and releases; the dashed line "
        "of the same colour is that site's budget, past which it refuses further work."
    )
    if len(ledgers) > len(series):
        caption += f" Only the {len(series)} of {len(ledgers)} sites that spent most are shown."
    if notes:
        caption += f" The spend of {', '.join(notes)} could not be computed."
    return Figure(title, svg_element(title, WIDTH, height, body), caption)
