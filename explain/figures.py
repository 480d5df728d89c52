"""Figures of releases and budgets: self-contained inline SVG for reports and the dashboard.

Every figure is one ``<svg>`` element with ``role="img"``, a ``<title>`` and an
``aria-label``; it needs no JavaScript, no fonts and no external URL, and every piece of
text in it (feature, group and site names come from configuration and the wire) is
escaped. Values carry their 95% intervals of privacy noise, ``value ± 1.96 noise_std``,
drawn as whiskers. A value that is not a finite number is not drawn: the figure says so
in words instead.

The functions are deterministic and pure: the same release gives the same bytes.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from explain.cards import release_card
from fedlens.errors import BudgetExceededError
from fedlens.types import Release, ReleasedValue, SiteLedger
from privacy.ledger import LedgerEvent, PrivacyLedger

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

Z95 = 1.96
"""Multiplier of ``noise_std`` for a 95% interval of Gaussian noise."""

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

# Colour-blind-safe pair (blue / orange) and a palette for several sites.
_POSITIVE = "#2b6cb0"
_NEGATIVE = "#dd6b20"
_NEUTRAL = "#4a5568"
_PALETTE = (
    *("#2b6cb0", "#dd6b20", "#2f855a", "#805ad5", "#b7791f", "#c53030"),
    *("#319795", "#d53f8c", "#4a5568", "#975a16", "#63b3ed", "#68d391"),
)
_WIDTH = 680
_FONT = 13
_ROW = 24
_MAX_LABEL = 40
_TABLE_ROWS = 200
_MAX_SITES = 12
_SECOND_ORDER = frozenset({"hessian", "kfac", "ekfac"})
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class Figure:
    """One figure: a title, one complete ``<svg>`` element and a plain-language caption."""

    title: str
    svg: str
    caption: str


# -- text --------------------------------------------------------------------------------


def _esc(text: object) -> str:
    """Escape for XML/HTML text and attributes; characters XML forbids become U+FFFD."""
    return html.escape(_XML_INVALID.sub("\ufffd", str(text)), quote=True)


def _num(x: float) -> str:
    """Three significant digits, a real minus sign; words for non-finite numbers."""
    if math.isnan(x):
        return "not a number"
    if math.isinf(x):
        return "infinite" if x > 0 else "\u2212infinite"
    if 1000 <= abs(x) < 1e9:
        return f"{x:,.0f}".replace("-", "\u2212")
    text = f"{x:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}\u00d710^{int(exponent)}"
    return text.replace("-", "\u2212")


def _short(label: str, limit: int = _MAX_LABEL) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "\u2026"


def _finite(v: ReleasedValue) -> bool:
    return math.isfinite(v.value) and math.isfinite(v.noise_std)


def _half(v: ReleasedValue) -> float:
    return Z95 * max(v.noise_std, 0.0)


def interval_text(v: ReleasedValue) -> str:
    """``0.41 ± 0.006`` (95%), or the value alone when it carries no noise."""
    if not math.isfinite(v.value):
        return _num(v.value)
    if not math.isfinite(v.noise_std):
        return f"{_num(v.value)} (noise unknown)"
    if v.noise_std <= 0:
        return _num(v.value)
    return f"{_num(v.value)} \u00b1 {_num(_half(v))}"


# -- SVG primitives ----------------------------------------------------------------------


def _svg(title: str, width: int, height: int, body: Iterable[str]) -> str:
    # Inline SVG in HTML needs no namespace declaration, and a report holds no URL at all.
    t = _esc(title)
    return (
        f'<svg role="img" aria-label="{t}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="system-ui, sans-serif" font-size="{_FONT}">'
        f"<title>{t}</title>" + "".join(body) + "</svg>"
    )


def _text(x: float, y: float, text: str, *, anchor: str = "start", **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{_esc(v)}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{_esc(text)}</text>'


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick positions covering ``[lo, hi]``."""
    span = hi - lo
    raw = span / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + 1e-9 * step:
        ticks.append(k * step if abs(k * step) > 1e-12 * step else 0.0)
        k += 1
    return ticks


def _domain(rows: Sequence[ReleasedValue], *, zero: bool = True) -> tuple[float, float]:
    ends = [e for v in rows if _finite(v) for e in (v.value - _half(v), v.value + _half(v))]
    if zero:
        ends.append(0.0)
    if not ends:
        return 0.0, 1.0
    lo, hi = min(ends), max(ends)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _label_width(labels: Iterable[str]) -> int:
    longest = max((len(_short(s)) for s in labels), default=4)
    return int(min(max(longest * 8.0 + 14, 80), 340))


def _bar_chart(
    title: str,
    rows: Sequence[ReleasedValue],
    axis_label: str,
    *,
    labels: Sequence[str] | None = None,
    zero: bool = True,
) -> str:
    """Horizontal bars from zero with 95% whiskers; one row per value, in the given order."""
    names = list(labels) if labels is not None else [v.name for v in rows]
    left = _label_width(names)
    right = _WIDTH - 90
    top = 34
    height = top + _ROW * max(len(rows), 1) + 58
    lo, hi = _domain(rows, zero=zero)

    def x(value: float) -> float:
        return left + (value - lo) / (hi - lo) * (right - left)

    body = [_text(_WIDTH / 2, 20, title, anchor="middle", font_weight="600")]
    base = x(0.0) if lo <= 0.0 <= hi else x(lo)
    for tick in _ticks(lo, hi):
        xt = x(tick)
        body.append(
            f'<line x1="{xt:.1f}" y1="{top - 4}" x2="{xt:.1f}" y2="{height - 50}" '
            f'stroke="#e2e2e2"/>'
        )
        body.append(_text(xt, height - 34, _num(tick), anchor="middle", font_size="11"))
    body.append(_text((left + right) / 2, height - 12, axis_label, anchor="middle"))
    for i, (v, name) in enumerate(zip(rows, names, strict=True)):
        y = top + i * _ROW
        mid = y + _ROW / 2
        body.append(
            f"<g><title>{_esc(name)}: {_esc(interval_text(v))}</title>"
            + _text(left - 8, mid + 4, _short(name), anchor="end")
        )
        if not _finite(v):
            body.append(_text(left + 4, mid + 4, f"{_num(v.value)}: not drawn", fill="#9c4221"))
            body.append("</g>")
            continue
        xv = x(v.value)
        colour = _POSITIVE if v.value >= 0 else _NEGATIVE
        body.append(
            f'<rect x="{min(base, xv):.1f}" y="{y + 4}" width="{max(abs(xv - base), 1.0):.1f}" '
            f'height="{_ROW - 8}" fill="{colour}" fill-opacity="0.75"/>'
        )
        half = _half(v)
        if half > 0:
            a, b = x(v.value - half), x(v.value + half)
            body.append(
                f'<path d="M{a:.1f},{mid:.1f}H{b:.1f}M{a:.1f},{mid - 5:.1f}V{mid + 5:.1f}'
                f'M{b:.1f},{mid - 5:.1f}V{mid + 5:.1f}" stroke="#1a202c" stroke-width="1.4" '
                f'fill="none" class="interval"/>'
            )
        body.append(_text(right + 6, mid + 4, _num(v.value), font_size="11"))
        body.append("</g>")
    if lo <= 0.0 <= hi:
        body.append(
            f'<line x1="{base:.1f}" y1="{top - 4}" x2="{base:.1f}" y2="{height - 50}" '
            f'stroke="#1a202c"/>'
        )
    return _svg(title, _WIDTH, height, body)


def _strip_chart(title: str, columns: Sequence[str], series: dict[str, list[ReleasedValue]]) -> str:
    """A heat strip: one row per column name, one shaded cell per series (values in [0, 1])."""
    left = _label_width(columns)
    cell = 110
    top = 48
    height = top + _ROW * max(len(columns), 1) + 34
    width = max(_WIDTH, left + cell * len(series) + 20)
    body = [_text(width / 2, 20, title, anchor="middle", font_weight="600")]
    for j, name in enumerate(series):
        body.append(_text(left + j * cell + cell / 2, top - 8, name, anchor="middle"))
    for i, column in enumerate(columns):
        y = top + i * _ROW
        body.append(_text(left - 8, y + _ROW / 2 + 4, _short(column), anchor="end"))
        for j, values in enumerate(series.values()):
            v = values[i]
            xc = left + j * cell
            if _finite(v):
                shade = min(max(v.value, 0.0), 1.0)
                ink = "#fff" if shade > 0.55 else "#1a202c"
                body.append(
                    f'<rect x="{xc + 2}" y="{y + 2}" width="{cell - 4}" height="{_ROW - 4}" '
                    f'fill="{_POSITIVE}" fill-opacity="{0.08 + 0.85 * shade:.3f}">'
                    f"<title>{_esc(column)}: {_esc(interval_text(v))}</title></rect>"
                )
                body.append(
                    _text(
                        xc + cell / 2,
                        y + _ROW / 2 + 4,
                        interval_text(v),
                        anchor="middle",
                        fill=ink,
                        font_size="11",
                    )
                )
            else:
                body.append(
                    _text(
                        xc + cell / 2,
                        y + _ROW / 2 + 4,
                        _num(v.value),
                        anchor="middle",
                        fill="#9c4221",
                        font_size="11",
                    )
                )
    body.append(
        _text(
            width / 2,
            height - 10,
            "average value in encoded units (0 to 1; darker is higher)",
            anchor="middle",
            font_size="11",
        )
    )
    return _svg(title, width, height, body)


def _range_chart(title: str, rows: Sequence[tuple[str, ReleasedValue, float, float]]) -> str:
    """Per feature: the typical range (low to high) as a band and the mean with its whisker."""
    left = _label_width(name for name, *_ in rows)
    right = _WIDTH - 30
    top = 34
    height = top + _ROW * max(len(rows), 1) + 58

    def x(value: float) -> float:
        return left + min(max(value, 0.0), 1.0) * (right - left)

    body = [_text(_WIDTH / 2, 20, title, anchor="middle", font_weight="600")]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        xt = x(tick)
        body.append(
            f'<line x1="{xt:.1f}" y1="{top - 4}" x2="{xt:.1f}" y2="{height - 50}" '
            f'stroke="#e2e2e2"/>'
        )
        body.append(_text(xt, height - 34, _num(tick), anchor="middle", font_size="11"))
    body.append(
        _text(
            (left + right) / 2,
            height - 12,
            "encoded value (0 = low end of the public range, 1 = high end)",
            anchor="middle",
        )
    )
    for i, (name, mean, low, high) in enumerate(rows):
        mid = top + i * _ROW + _ROW / 2
        body.append(_text(left - 8, mid + 4, _short(name), anchor="end"))
        if not (_finite(mean) and math.isfinite(low) and math.isfinite(high)):
            body.append(_text(left + 4, mid + 4, "not a finite number: not drawn", fill="#9c4221"))
            continue
        body.append(
            f'<rect x="{x(low):.1f}" y="{mid - 5:.1f}" width="{max(x(high) - x(low), 1.0):.1f}" '
            f'height="10" fill="{_POSITIVE}" fill-opacity="0.25">'
            f"<title>{_esc(name)}: typical range {_esc(_num(low))} to {_esc(_num(high))}"
            "</title></rect>"
        )
        half = _half(mean)
        if half > 0:
            a, b = x(mean.value - half), x(mean.value + half)
            body.append(
                f'<path d="M{a:.1f},{mid:.1f}H{b:.1f}M{a:.1f},{mid - 6:.1f}V{mid + 6:.1f}'
                f'M{b:.1f},{mid - 6:.1f}V{mid + 6:.1f}" stroke="#1a202c" stroke-width="1.4" '
                f'fill="none" class="interval"/>'
            )
        body.append(
            f'<circle cx="{x(mean.value):.1f}" cy="{mid:.1f}" r="4" fill="{_POSITIVE}">'
            f"<title>{_esc(name)} mean: {_esc(interval_text(mean))}</title></circle>"
        )
    return _svg(title, _WIDTH, height, body)


# -- per kind ----------------------------------------------------------------------------


def _top(values: Sequence[ReleasedValue], top: int) -> list[ReleasedValue]:
    """The ``top`` largest by magnitude (non-finite first: they need attention), stable."""

    def key(iv: tuple[int, ReleasedValue]) -> tuple[float, int]:
        i, v = iv
        return (-math.inf if not math.isfinite(v.value) else -abs(v.value), i)

    return [v for _, v in sorted(enumerate(values), key=key)[: max(top, 1)]]


def _more(shown: int, total: int) -> str:
    return f" Only the {shown} largest of {total} are shown." if total > shown else ""


def _nonfinite_note(values: Iterable[ReleasedValue]) -> str:
    bad = [v.name for v in values if not _finite(v)]
    if not bad:
        return ""
    named = ", ".join(bad[:3]) + (" and others" if len(bad) > 3 else "")
    return f" Some values are not finite numbers and are not drawn ({named})."


def _bars_figure(
    title: str,
    values: Sequence[ReleasedValue],
    axis_label: str,
    caption: str,
    top: int,
    *,
    labels: Callable[[str], str] = lambda s: s,
) -> Figure:
    shown = _top(values, top)
    svg = _bar_chart(title, shown, axis_label, labels=[labels(v.name) for v in shown])
    caption += " Whiskers show 95% intervals of the privacy noise."
    return Figure(title, svg, caption + _more(len(shown), len(values)) + _nonfinite_note(shown))


def _attribution_figures(release: Release, top: int) -> list[Figure]:
    values = release.grouped or release.values
    if any(v.name.endswith("|class=1") for v in values):
        # With target "both" the class-0 block mirrors the class-1 block: draw class 1 once.
        values = tuple(
            ReleasedValue(v.name.removesuffix("|class=1"), v.value, v.noise_std)
            for v in values
            if v.name.endswith("|class=1")
        )
    if not values:
        return []
    return [
        _bars_figure(
            "Average attribution per feature",
            values,
            "average attribution (towards the positive class)",
            "Each bar is how much a feature moved the model's predictions on average; bars to "
            "the right push towards the positive class, bars to the left away from it.",
            top,
        )
    ]


_RATE_TITLES = {
    "selection_rate": ("Selection rate per group", "share of records predicted positive"),
    "accuracy": ("Accuracy per group", "share of correct predictions"),
    "tpr": ("True-positive rate per group", "share of positives predicted positive"),
    "fpr": ("False-positive rate per group", "share of negatives predicted positive"),
}
_GAP_WORDS = {
    "demographic_parity": "selection rate",
    "equalised_odds": "equalised odds (larger of TPR and FPR gaps)",
    "equalised_odds_tpr": "true-positive rate",
    "equalised_odds_fpr": "false-positive rate",
    "accuracy": "accuracy",
}


def _fairness_parts(
    release: Release,
) -> tuple[dict[str, list[ReleasedValue]], list[ReleasedValue], list[ReleasedValue]]:
    """Split a fairness release: ``rate -> per-group values``, the gaps, attribution gaps."""
    rates: dict[str, list[ReleasedValue]] = {}
    gaps: list[ReleasedValue] = []
    for v in release.values:
        if v.name.startswith("gap:"):
            gaps.append(v)
        elif v.name.startswith("attribution_gap:"):
            continue
        else:
            group, _, rate = v.name.rpartition(":")
            if group and rate in _RATE_TITLES:
                rates.setdefault(rate, []).append(ReleasedValue(group, v.value, v.noise_std))
    attribution = [v for v in release.grouped if v.name.startswith("attribution_gap:")]
    return rates, gaps, attribution


def _gap_label(name: str) -> str:
    """``gap:demographic_parity:sex`` → ``sex: selection rate``."""
    _, gap, partition = [*name.split(":", 2), "", ""][:3]
    return f"{partition}: {_GAP_WORDS.get(gap, gap.replace('_', ' '))}"


def _fairness_figures(release: Release, top: int) -> list[Figure]:
    rates, gaps, attribution = _fairness_parts(release)
    figures: list[Figure] = []
    for rate in ("selection_rate", "accuracy", "tpr", "fpr"):
        if rate in rates:
            title, axis = _RATE_TITLES[rate]
            shown = rates[rate][: max(top, 1)]
            figures.append(
                Figure(
                    title,
                    _bar_chart(title, shown, axis, zero=True),
                    f"The {axis} in each group, with 95% intervals of the privacy noise. "
                    "Groups whose intervals do not overlap differ beyond the noise."
                    + _more(len(shown), len(rates[rate]))
                    + _nonfinite_note(shown),
                )
            )
    if gaps:
        figures.append(
            _bars_figure(
                "Largest differences between groups",
                gaps,
                "difference between the highest and lowest group",
                "Each bar is the gap between the best- and worst-treated group of a sensitive "
                "attribute; zero means equal treatment.",
                top,
                labels=_gap_label,
            )
        )
    if attribution:
        figures.append(
            _bars_figure(
                "What explains the selection-rate gap",
                attribution,
                "difference in average attribution (higher group minus lower group)",
                "Features whose attributions differ most between the groups with the highest "
                "and the lowest selection rate.",
                top,
                labels=lambda s: s.removeprefix("attribution_gap:"),
            )
        )
    return figures


def _suffix_values(values: Iterable[ReleasedValue], suffix: str) -> list[ReleasedValue]:
    return [
        ReleasedValue(v.name.removesuffix(suffix), v.value, v.noise_std)
        for v in values
        if v.name.endswith(suffix)
    ]


def _group_influence_figures(release: Release, top: int) -> list[Figure]:
    if release.kind == "site_contribution":
        rows = _suffix_values(release.values, "/value")
        return (
            [
                _bars_figure(
                    "Contribution of each site",
                    rows,
                    "rise of the validation loss without the site",
                    "How much worse the model would do on validation data without each site's "
                    "records; larger bars mark more useful data.",
                    top,
                )
            ]
            if rows
            else _generic_figures(release, top)
        )
    rows = _suffix_values(release.values, "/influence")
    if not rows:
        return _generic_figures(release, top)
    return [
        _bars_figure(
            "Influence of each group of training data",
            rows,
            "push on the prediction's logit",
            "How much each group of training records pushed this prediction up (right) or "
            "down (left); without a group the prediction would move back by about its bar.",
            top,
        )
    ]


def _prototype_figures(release: Release, top: int) -> list[Figure]:
    pro = {
        v.name.removeprefix("proponents/"): v
        for v in release.values
        if v.name.startswith("proponents/")
    }
    con = {
        v.name.removeprefix("opponents/"): v
        for v in release.values
        if v.name.startswith("opponents/")
    }
    columns = [c for c in pro if c in con]
    if not columns:
        return _generic_figures(release, top)

    def spread(c: str) -> float:
        d = pro[c].value - con[c].value
        return -abs(d) if math.isfinite(d) else -math.inf

    chosen = sorted(columns, key=lambda c: (spread(c), columns.index(c)))[: max(top, 1)]
    title = "What the most influential training records look like"
    svg = _strip_chart(
        title,
        chosen,
        {
            "supporting": [pro[c] for c in chosen],
            "opposing": [con[c] for c in chosen],
        },
    )
    caption = (
        "Average feature values of the training records that most supported the prediction "
        "and of those that most opposed it (no real record is shown). Features are ordered "
        "by how much the two groups differ."
        + _more(len(chosen), len(columns))
        + _nonfinite_note([*pro.values(), *con.values()])
    )
    return [Figure(title, svg, caption)]


def _feature_stats_figures(release: Release, top: int) -> list[Figure]:
    by_name = {v.name: v for v in release.values}
    numeric = [v.name.removesuffix(":mean") for v in release.values if v.name.endswith(":mean")]
    figures: list[Figure] = []
    if numeric:
        rows = [
            (
                f,
                by_name[f"{f}:mean"],
                by_name[f"{f}:low"].value if f"{f}:low" in by_name else by_name[f"{f}:mean"].value,
                by_name[f"{f}:high"].value
                if f"{f}:high" in by_name
                else by_name[f"{f}:mean"].value,
            )
            for f in numeric
        ][: max(top, 1)]
        title = "Average and typical range of each numeric feature"
        figures.append(
            Figure(
                title,
                _range_chart(title, rows),
                "Dots are averages (with 95% intervals of the privacy noise); the shaded band "
                "is the typical range, the average plus or minus two standard deviations."
                + _more(len(rows), len(numeric))
                + _nonfinite_note(by_name[f"{f}:mean"] for f in numeric),
            )
        )
    freqs = [v for v in release.values if v.name.endswith(":freq")]
    if freqs:
        figures.append(
            _bars_figure(
                "How often each category occurs",
                freqs,
                "share of records",
                "The share of records in each category of the categorical features.",
                top,
                labels=lambda s: s.removesuffix(":freq"),
            )
        )
    return figures or _generic_figures(release, top)


def _histogram_figure(title: str, rows: Sequence[ReleasedValue], axis: str, caption: str) -> Figure:
    svg = _bar_chart(title, rows, axis)
    return Figure(
        title,
        svg,
        caption + " Whiskers show 95% intervals of the privacy noise; a noised count can be "
        "slightly negative." + _nonfinite_note(rows),
    )


def _self_influence_figures(release: Release, top: int) -> list[Figure]:
    groups: dict[str, list[ReleasedValue]] = {}
    for v in release.values:
        group, sep, bin_name = v.name.rpartition("/")
        if sep:
            groups.setdefault(group, []).append(ReleasedValue(bin_name, v.value, v.noise_std))
    figures = [
        _histogram_figure(
            f"Self-influence of records in group {group}",
            rows,
            "number of records (noised)",
            "How many training records fall in each range of self-influence: how much a "
            "record shapes its own prediction. Records in the highest ranges are often "
            "mislabelled or unusual.",
        )
        for group, rows in list(groups.items())[: max(top, 1)]
    ]
    shares = [v for v in release.grouped if "/share>=" in v.name]
    if shares:
        figures.append(
            _bars_figure(
                "Share of suspicious records per group",
                shares,
                "share of records with high self-influence",
                "The share of each group's records whose self-influence is high enough to "
                "deserve a look at their site.",
                top,
                labels=lambda s: s.partition("/share>=")[0],
            )
        )
    return figures or _generic_figures(release, top)


def _loo_figures(release: Release, top: int) -> list[Figure]:
    bins = [
        ReleasedValue(v.name.removeprefix("change in "), v.value, v.noise_std)
        for v in release.values
        if v.name.startswith("change in ")
    ]
    if not bins:
        return _generic_figures(release, top)
    flips = next((v for v in release.values if v.name == "flips"), None)
    caption = (
        "How many training records would change the predicted probability by each amount "
        "if they alone were left out of training."
    )
    if flips is not None:
        caption += (
            f" About {interval_text(flips)} records would each flip a prediction on their own."
        )
    return [
        _histogram_figure(
            "How much single records change predictions",
            bins,
            "number of records (noised)",
            caption,
        )
    ]


def _generic_figures(release: Release, top: int) -> list[Figure]:
    values = release.grouped or release.values
    if not values:
        return []
    return [
        _bars_figure(
            f"Largest values of {release.kind}",
            values,
            "released value",
            "The released values with the largest magnitude.",
            top,
        )
    ]


_BY_KIND: dict[str, Callable[[Release, int], list[Figure]]] = {
    "global_attribution": _attribution_figures,
    "fairness": _fairness_figures,
    "group_influence": _group_influence_figures,
    "site_contribution": _group_influence_figures,
    "influence_prototypes": _prototype_figures,
    "feature_stats": _feature_stats_figures,
    "self_influence": _self_influence_figures,
    "loo_unfairness": _loo_figures,
}


def release_figures(release: Release, *, top: int = 20) -> list[Figure]:
    """The figures that show a release, by its kind; none for second-order factors.

    Parameters
    ----------
    release
        A stored release.
    top
        Most bars (features, groups) per figure.

    Returns
    -------
    list of Figure
        Empty for ``hessian``, ``kfac`` and ``ekfac`` (factors, not something to look at)
        and for a release without values. Unknown kinds get bars of their largest values.
    """
    if release.kind in _SECOND_ORDER:
        return []
    return _BY_KIND.get(release.kind, _generic_figures)(release, top)


# -- budgets -----------------------------------------------------------------------------


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
        svg = _svg(
            title,
            _WIDTH,
            80,
            [
                _text(_WIDTH / 2, 20, title, anchor="middle", font_weight="600"),
                _text(_WIDTH / 2, 52, "No privacy has been spent yet.", anchor="middle"),
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
    left, right, top, bottom = 64, _WIDTH - 150, 34, 250
    height = bottom + 58

    def x(t: datetime) -> float:
        return left + (t - start).total_seconds() / span * (right - left)

    def y(eps: float) -> float:
        return bottom - min(eps, top_eps) / top_eps * (bottom - top)

    body = [_text(_WIDTH / 2, 20, title, anchor="middle", font_weight="600")]
    for tick in _ticks(0.0, top_eps):
        yt = y(tick)
        body.append(
            f'<line x1="{left}" y1="{yt:.1f}" x2="{right}" y2="{yt:.1f}" stroke="#e2e2e2"/>'
        )
        body.append(_text(left - 6, yt + 4, _num(tick), anchor="end", font_size="11"))
    body.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#1a202c"/>')
    body.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#1a202c"/>')
    fmt = "%Y-%m-%d %H:%M"
    body.append(_text(left, bottom + 16, start.strftime(fmt), anchor="start", font_size="11"))
    if end > start:
        body.append(_text(right, bottom + 16, end.strftime(fmt), anchor="end", font_size="11"))
    body.append(_text((left + right) / 2, bottom + 36, "time (UTC)", anchor="middle"))
    body.append(
        _text(
            16,
            (top + bottom) / 2,
            "privacy spent (\u03b5)",
            anchor="middle",
            transform=f"rotate(-90 16 {(top + bottom) / 2:.1f})",
        )
    )
    notes: list[str] = []
    for i, (ledger, points) in enumerate(series):
        colour = _PALETTE[i % len(_PALETTE)]
        ly = top + 4 + i * 18
        body.append(
            f'<line x1="{right + 12}" y1="{ly:.1f}" x2="{right + 30}" y2="{ly:.1f}" '
            f'stroke="{colour}" stroke-width="2.5"/>'
        )
        body.append(_text(right + 36, ly + 4, _short(ledger.site_id, 14), font_size="11"))
        budget = ledger.budget_epsilon
        if math.isfinite(budget) and budget > 0:
            body.append(
                f'<line x1="{left}" y1="{y(budget):.1f}" x2="{right}" y2="{y(budget):.1f}" '
                f'stroke="{colour}" stroke-dasharray="6 4" class="budget">'
                f"<title>{_esc(ledger.site_id)} budget \u03b5 = {_esc(_num(budget))}</title></line>"
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
            f"<title>{_esc(ledger.site_id)}: \u03b5 spent {_esc(_num(points[-1][1]))}"
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
    return Figure(title, _svg(title, _WIDTH, height, body), caption)


# -- HTML --------------------------------------------------------------------------------

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
    return f"<figure>{figure.svg}<figcaption>{_esc(figure.caption)}</figcaption></figure>"


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
        if _finite(v) and v.noise_std > 0:
            interval = f"{_num(v.value - _half(v))} to {_num(v.value + _half(v))}"
        elif _finite(v):
            interval = "exact (no noise)"
        else:
            interval = "unknown"
        body.append(
            f'<tr><td>{_esc(v.name)}</td><td class="num">{_esc(interval_text(v))}</td>'
            f'<td class="num">{_esc(interval)}</td></tr>'
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
        f'<tr><td>{_esc(c.site_id)}</td><td class="num">{_esc(_num(c.epsilon))}</td>'
        f'<td class="num">{c.delta:.1e}</td><td class="num">{_esc(_num(c.epsilon_total))}</td></tr>'
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
        f'<section class="release" id="{_esc(anchor_id(release.release_id))}">',
        f"<h2>{_esc(kind_title(release.kind))} "
        f'<span class="release-id">{_esc(release.kind)} \u00b7 '
        f"{_esc(release.release_id)}</span></h2>",
        f'<p class="meta">Created {_esc(release.created_at or "at an unknown time")}; '
        f"about {max(release.noised_count, 0.0):.0f} records from "
        f"{len(release.costs)} site{'s' if len(release.costs) != 1 else ''}.</p>"
        if math.isfinite(release.noised_count)
        else f'<p class="meta">Created {_esc(release.created_at)}.</p>',
        f'<p class="card">{_esc(release_card(release))}</p>',
    ]
    if release.kind in _SECOND_ORDER:
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
