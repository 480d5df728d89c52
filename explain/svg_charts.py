"""SVG drawing primitives and generic charts for the figures of :mod:`explain.figures`.

Every chart is one ``<svg>`` element with ``role="img"``, a ``<title>`` and an
``aria-label``; it needs no JavaScript, no fonts and no external URL, and every piece of
text in it is escaped (:func:`escape`). Values carry their 95% intervals of privacy noise,
``value ± 1.96 noise_std``, drawn as whiskers; a value that is not a finite number is not
drawn but named in words.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedlens.types import ReleasedValue

__all__ = [
    "PALETTE",
    "WIDTH",
    "Z95",
    "Figure",
    "bar_chart",
    "escape",
    "format_number",
    "interval_text",
    "is_finite",
    "nice_ticks",
    "noise_half_width",
    "range_chart",
    "shorten",
    "strip_chart",
    "svg_element",
    "svg_text",
]

Z95 = 1.96
"""Multiplier of ``noise_std`` for a 95% interval of Gaussian noise."""

# Colour-blind-safe pair (blue / orange) and a palette for several sites.
_POSITIVE = "#2b6cb0"
_NEGATIVE = "#dd6b20"
_NEUTRAL = "#4a5568"
PALETTE = (
    *("#2b6cb0", "#dd6b20", "#2f855a", "#805ad5", "#b7791f", "#c53030"),
    *("#319795", "#d53f8c", "#4a5568", "#975a16", "#63b3ed", "#68d391"),
)
WIDTH = 680
"""Width of every figure in SVG user units (a wide heat strip grows beyond it)."""
_FONT = 13
_ROW = 24
_MAX_LABEL = 40
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class Figure:
    """One figure: a title, one complete ``<svg>`` element and a plain-language caption."""

    title: str
    svg: str
    caption: str


# -- text --------------------------------------------------------------------------------


def escape(text: object) -> str:
    """Escape for XML/HTML text and attributes; characters XML forbids become U+FFFD."""
    return html.escape(_XML_INVALID.sub("\ufffd", str(text)), quote=True)


def format_number(x: float) -> str:
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


def shorten(label: str, limit: int = _MAX_LABEL) -> str:
    """``label`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return label if len(label) <= limit else label[: limit - 1] + "\u2026"


def is_finite(v: ReleasedValue) -> bool:
    """Whether both the value and its noise are finite numbers, so it can be drawn."""
    return math.isfinite(v.value) and math.isfinite(v.noise_std)


def noise_half_width(v: ReleasedValue) -> float:
    """Half the width of the 95% interval of the privacy noise, ``1.96 noise_std``."""
    return Z95 * max(v.noise_std, 0.0)


def interval_text(v: ReleasedValue) -> str:
    """``0.41 ± 0.006`` (95%), or the value alone when it carries no noise."""
    if not math.isfinite(v.value):
        return format_number(v.value)
    if not math.isfinite(v.noise_std):
        return f"{format_number(v.value)} (noise unknown)"
    if v.noise_std <= 0:
        return format_number(v.value)
    return f"{format_number(v.value)} \u00b1 {format_number(noise_half_width(v))}"


# -- SVG primitives ----------------------------------------------------------------------


def svg_element(title: str, width: int, height: int, body: Iterable[str]) -> str:
    """One complete ``<svg>`` with ``role="img"``, an ``aria-label`` and a ``<title>``."""
    # Inline SVG in HTML needs no namespace declaration, and a report holds no URL at all.
    t = escape(title)
    return (
        f'<svg role="img" aria-label="{t}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="system-ui, sans-serif" font-size="{_FONT}">'
        f"<title>{t}</title>" + "".join(body) + "</svg>"
    )


def svg_text(x: float, y: float, text: str, *, anchor: str = "start", **attrs: str) -> str:
    """An escaped ``<text>``; ``font_size="11"`` becomes the attribute ``font-size``."""
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
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
    ends = [
        e
        for v in rows
        if is_finite(v)
        for e in (v.value - noise_half_width(v), v.value + noise_half_width(v))
    ]
    if zero:
        ends.append(0.0)
    if not ends:
        return 0.0, 1.0
    lo, hi = min(ends), max(ends)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _label_width(labels: Iterable[str]) -> int:
    longest = max((len(shorten(s)) for s in labels), default=4)
    return int(min(max(longest * 8.0 + 14, 80), 340))


def bar_chart(
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
    right = WIDTH - 90
    top = 34
    height = top + _ROW * max(len(rows), 1) + 58
    lo, hi = _domain(rows, zero=zero)

    def x(value: float) -> float:
        return left + (value - lo) / (hi - lo) * (right - left)

    body = [svg_text(WIDTH / 2, 20, title, anchor="middle", font_weight="600")]
    base = x(0.0) if lo <= 0.0 <= hi else x(lo)
    for tick in nice_ticks(lo, hi):
        xt = x(tick)
        body.append(
            f'<line x1="{xt:.1f}" y1="{top - 4}" x2="{xt:.1f}" y2="{height - 50}" '
            f'stroke="#e2e2e2"/>'
        )
        body.append(svg_text(xt, height - 34, format_number(tick), anchor="middle", font_size="11"))
    body.append(svg_text((left + right) / 2, height - 12, axis_label, anchor="middle"))
    for i, (v, name) in enumerate(zip(rows, names, strict=True)):
        y = top + i * _ROW
        mid = y + _ROW / 2
        body.append(
            f"<g><title>{escape(name)}: {escape(interval_text(v))}</title>"
            + svg_text(left - 8, mid + 4, shorten(name), anchor="end")
        )
        if not is_finite(v):
            body.append(
                svg_text(left + 4, mid + 4, f"{format_number(v.value)}: not drawn", fill="#9c4221")
            )
            body.append("</g>")
            continue
        xv = x(v.value)
        colour = _POSITIVE if v.value >= 0 else _NEGATIVE
        body.append(
            f'<rect x="{min(base, xv):.1f}" y="{y + 4}" width="{max(abs(xv - base), 1.0):.1f}" '
            f'height="{_ROW - 8}" fill="{colour}" fill-opacity="0.75"/>'
        )
        half = noise_half_width(v)
        if half > 0:
            a, b = x(v.value - half), x(v.value + half)
            body.append(
                f'<path d="M{a:.1f},{mid:.1f}H{b:.1f}M{a:.1f},{mid - 5:.1f}V{mid + 5:.1f}'
                f'M{b:.1f},{mid - 5:.1f}V{mid + 5:.1f}" stroke="#1a202c" stroke-width="1.4" '
                f'fill="none" class="interval"/>'
            )
        body.append(svg_text(right + 6, mid + 4, format_number(v.value), font_size="11"))
        body.append("</g>")
    if lo <= 0.0 <= hi:
        body.append(
            f'<line x1="{base:.1f}" y1="{top - 4}" x2="{base:.1f}" y2="{height - 50}" '
            f'stroke="#1a202c"/>'
        )
    return svg_element(title, WIDTH, height, body)


def strip_chart(title: str, columns: Sequence[str], series: dict[str, list[ReleasedValue]]) -> str:
    """A heat strip: one row per column name, one shaded cell per series (values in [0, 1])."""
    left = _label_width(columns)
    cell = 110
    top = 48
    height = top + _ROW * max(len(columns), 1) + 34
    width = max(WIDTH, left + cell * len(series) + 20)
    body = [svg_text(width / 2, 20, title, anchor="middle", font_weight="600")]
    for j, name in enumerate(series):
        body.append(svg_text(left + j * cell + cell / 2, top - 8, name, anchor="middle"))
    for i, column in enumerate(columns):
        y = top + i * _ROW
        body.append(svg_text(left - 8, y + _ROW / 2 + 4, shorten(column), anchor="end"))
        for j, values in enumerate(series.values()):
            v = values[i]
            xc = left + j * cell
            if is_finite(v):
                shade = min(max(v.value, 0.0), 1.0)
                ink = "#fff" if shade > 0.55 else "#1a202c"
                body.append(
                    f'<rect x="{xc + 2}" y="{y + 2}" width="{cell - 4}" height="{_ROW - 4}" '
                    f'fill="{_POSITIVE}" fill-opacity="{0.08 + 0.85 * shade:.3f}">'
                    f"<title>{escape(column)}: {escape(interval_text(v))}</title></rect>"
                )
                body.append(
                    svg_text(
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
                    svg_text(
                        xc + cell / 2,
                        y + _ROW / 2 + 4,
                        format_number(v.value),
                        anchor="middle",
                        fill="#9c4221",
                        font_size="11",
                    )
                )
    body.append(
        svg_text(
            width / 2,
            height - 10,
            "average value in encoded units (0 to 1; darker is higher)",
            anchor="middle",
            font_size="11",
        )
    )
    return svg_element(title, width, height, body)


def range_chart(title: str, rows: Sequence[tuple[str, ReleasedValue, float, float]]) -> str:
    """Per feature: the typical range (low to high) as a band and the mean with its whisker."""
    left = _label_width(name for name, *_ in rows)
    right = WIDTH - 30
    top = 34
    height = top + _ROW * max(len(rows), 1) + 58

    def x(value: float) -> float:
        return left + min(max(value, 0.0), 1.0) * (right - left)

    body = [svg_text(WIDTH / 2, 20, title, anchor="middle", font_weight="600")]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        xt = x(tick)
        body.append(
            f'<line x1="{xt:.1f}" y1="{top - 4}" x2="{xt:.1f}" y2="{height - 50}" '
            f'stroke="#e2e2e2"/>'
        )
        body.append(svg_text(xt, height - 34, format_number(tick), anchor="middle", font_size="11"))
    body.append(
        svg_text(
            (left + right) / 2,
            height - 12,
            "encoded value (0 = low end of the public range, 1 = high end)",
            anchor="middle",
        )
    )
    for i, (name, mean, low, high) in enumerate(rows):
        mid = top + i * _ROW + _ROW / 2
        body.append(svg_text(left - 8, mid + 4, shorten(name), anchor="end"))
        if not (is_finite(mean) and math.isfinite(low) and math.isfinite(high)):
            body.append(
                svg_text(left + 4, mid + 4, "not a finite number: not drawn", fill="#9c4221")
            )
            continue
        body.append(
            f'<rect x="{x(low):.1f}" y="{mid - 5:.1f}" width="{max(x(high) - x(low), 1.0):.1f}" '
            f'height="10" fill="{_POSITIVE}" fill-opacity="0.25">'
            f"<title>{escape(name)}: typical range {escape(format_number(low))} "
            f"to {escape(format_number(high))}"
            "</title></rect>"
        )
        half = noise_half_width(mean)
        if half > 0:
            a, b = x(mean.value - half), x(mean.value + half)
            body.append(
                f'<path d="M{a:.1f},{mid:.1f}H{b:.1f}M{a:.1f},{mid - 6:.1f}V{mid + 6:.1f}'
                f'M{b:.1f},{mid - 6:.1f}V{mid + 6:.1f}" stroke="#1a202c" stroke-width="1.4" '
                f'fill="none" class="interval"/>'
            )
        body.append(
            f'<circle cx="{x(mean.value):.1f}" cy="{mid:.1f}" r="4" fill="{_POSITIVE}">'
            f"<title>{escape(name)} mean: {escape(interval_text(mean))}</title></circle>"
        )
    return svg_element(title, WIDTH, height, body)
