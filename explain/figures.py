"""Figures of releases and budgets: self-contained inline SVG for reports and the dashboard.

Every figure is one ``<svg>`` element with ``role="img"``, a ``<title>`` and an
``aria-label``; it needs no JavaScript, no fonts and no external URL, and every piece of
text in it (feature, group and site names come from configuration and the wire) is
escaped. Values carry their 95% intervals of privacy noise, ``value ± 1.96 noise_std``,
drawn as whiskers. A value that is not a finite number is not drawn: the figure says so
in words instead.

The functions are deterministic and pure: the same release gives the same bytes.

This module is the public surface; the implementation lives in

- :mod:`explain.svg_charts`: escaping, number formatting and the generic SVG charts;
- :mod:`explain.kind_figures`: the figures of each explanation kind;
- :mod:`explain.budget_figure`: privacy spent per site over time;
- :mod:`explain.release_html`: a release as an HTML section, and its stylesheet.
"""

from __future__ import annotations

from explain.budget_figure import budget_figure
from explain.kind_figures import release_figures
from explain.release_html import (
    STYLESHEET,
    anchor_id,
    figure_html,
    kind_title,
    release_section_html,
)
from explain.svg_charts import Z95, Figure, interval_text

__all__ = [
    "STYLESHEET",
    "Z95",
    "Figure",
    "anchor_id",
    "budget_figure",
    "figure_html",
    "interval_text",
    "kind_title",
    "release_figures",
    "release_section_html",
]
