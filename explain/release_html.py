"""A release as an HTML fragment: heading, card, figures, values and privacy costs.

The fragment uses the classes of :data:`STYLESHEET`, holds no script and no link, and
escapes every name (they come from configuration and the wire).
"""

from __future__ import annotations

import math
import re

from explain.cards import release_card
from explain.kind_figures import SECOND_ORDER_KINDS, release_figures
from explain.svg_charts import (
    Figure,
    escape,
    format_number,
    interval_text,
    is_finite,
    noise_half_width,
)
from fedlens.types import Release

__all__ = [
    "STYLESHEET",
    "anchor_id",
    "figure_html",
    "kind_title",
    "release_section_html",
]

STYLESHEET = """\
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  margin: 0 auto; max-width: 60rem; padding: 1rem 1.5rem 3rem; color: #1b1b1b;
  background: #fff; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 0.4rem; }
.meta { color: #555; font-size: 0.9rem; }
.release-id { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85rem;
  color: #555; font-weight: normal; }
.card { background: #f3f6fa; border-left: 4px solid #2b6cb0; padding: 0.6rem 0.9rem;
  font-size: 1.02rem; }
.note { color: #6b4e00; background: #fff8e1; padding: 0.4rem 0.7rem; }
figure { margin: 1rem 0; }
figure svg { max-width: 100%; height: auto; }
figcaption { color: #333; font-size: 0.92rem; margin-top: 0.2rem; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #e2e2e2; padding: 0.25rem 0.6rem; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
nav.toc ol { padding-left: 1.3rem; }
details summary { cursor: pointer; color: #2b6cb0; }
"""
_TABLE_ROWS = 200

_KIND_TITLES = {
    "global_attribution": "Which features matter",
    "fairness": "Fairness across groups",
    "group_influence": "Which training data drove a prediction",
    "site_contribution": "How much each site's data helps",
    "influence_prototypes": "What influential training records look like",
    "feature_stats": "What the data looks like",
    "self_influence": "Unusual or mislabelled records",
    "loo_unfairness": "Predictions that hinge on single records",
    "hessian": "Second-order factors",
    "kfac": "Second-order factors",
    "ekfac": "Second-order factors",
}


def kind_title(kind: str) -> str:
    """A plain-language heading for a kind (the kind's own name for unknown kinds)."""
    return _KIND_TITLES.get(kind, kind.replace("_", " ").capitalize() or "Release")


def anchor_id(release_id: str) -> str:
    """An HTML id for a release's section."""
    return "release-" + re.sub(r"[^A-Za-z0-9_-]", "-", release_id)


def figure_html(figure: Figure) -> str:
    """``<figure>`` with the SVG and its caption."""
    return f"<figure>{figure.svg}<figcaption>{escape(figure.caption)}</figcaption></figure>"


def _values_table(release: Release) -> str:
    rows = list(release.grouped or release.values)
    what = "per feature" if release.grouped else ""
    head = (
        f'<table class="values"><caption>Released values {what}</caption>'
        '<thead><tr><th>name</th><th class="num">value</th>'
        '<th class="num">95% interval</th></tr></thead><tbody>'
    )
    body = []
    for v in rows[:_TABLE_ROWS]:
        if is_finite(v) and v.noise_std > 0:
            half = noise_half_width(v)
            interval = f"{format_number(v.value - half)} to {format_number(v.value + half)}"
        elif is_finite(v):
            interval = "exact (no noise)"
        else:
            interval = "unknown"
        body.append(
            f'<tr><td>{escape(v.name)}</td><td class="num">{escape(interval_text(v))}</td>'
            f'<td class="num">{escape(interval)}</td></tr>'
        )
    more = len(rows) - _TABLE_ROWS
    tail = "</tbody></table>"
    if more > 0:
        tail += f'<p class="meta">{more} further values are not listed.</p>'
    return head + "".join(body) + tail


def _costs_table(release: Release) -> str:
    if not release.costs:
        return '<p class="meta">No privacy cost is recorded for this release.</p>'
    rows = "".join(
        f'<tr><td>{escape(c.site_id)}</td><td class="num">{escape(format_number(c.epsilon))}</td>'
        f'<td class="num">{c.delta:.1e}</td>'
        f'<td class="num">{escape(format_number(c.epsilon_total))}</td></tr>'
        for c in release.costs
    )
    return (
        '<table class="costs"><caption>Privacy cost per site</caption><thead><tr><th>site</th>'
        '<th class="num">\u03b5 of this release</th><th class="num">\u03b4</th>'
        '<th class="num">\u03b5 spent in all after it</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def release_section_html(release: Release) -> str:
    """One release as an HTML fragment: heading, card, figures, values and privacy costs.

    The fragment is a ``<section>`` whose id is :func:`anchor_id` of the release; it uses
    the classes of :data:`STYLESHEET` and holds no script and no link.
    """
    parts = [
        f'<section class="release" id="{escape(anchor_id(release.release_id))}">',
        f"<h2>{escape(kind_title(release.kind))} "
        f'<span class="release-id">{escape(release.kind)} \u00b7 '
        f"{escape(release.release_id)}</span></h2>",
        f'<p class="meta">Created {escape(release.created_at or "at an unknown time")}; '
        f"about {max(release.noised_count, 0.0):.0f} records from "
        f"{len(release.costs)} site{'s' if len(release.costs) != 1 else ''}.</p>"
        if math.isfinite(release.noised_count)
        else f'<p class="meta">Created {escape(release.created_at)}.</p>',
        f'<p class="card">{escape(release_card(release))}</p>',
    ]
    if release.kind in SECOND_ORDER_KINDS:
        parts.append(
            '<p class="note">No plot: second-order factors are an input to influence jobs, '
            "not a result to read.</p>"
        )
    else:
        figures = release_figures(release)
        parts.extend(figure_html(f) for f in figures)
        if not figures:
            parts.append('<p class="note">This release holds no values to plot.</p>')
    parts.append("<details><summary>All released values</summary>")
    parts.append(_values_table(release))
    parts.append("</details>")
    parts.append(_costs_table(release))
    parts.append("</section>")
    return "\n".join(parts)
