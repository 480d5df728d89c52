"""The figures that show a release, chosen by its explanation kind.

One builder per kind turns a release's values into :class:`~explain.svg_charts.Figure`
objects drawn with :mod:`explain.svg_charts`; unknown kinds get bars of their largest
values, second-order factors get none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from explain.cards import prototype_sides
from explain.svg_charts import (
    Figure,
    bar_chart,
    interval_text,
    is_finite,
    range_chart,
    strip_chart,
)
from fedlens.types import Release, ReleasedValue

__all__ = ["SECOND_ORDER_KINDS", "release_figures"]

SECOND_ORDER_KINDS = frozenset({"hessian", "kfac", "ekfac"})
"""Kinds whose releases are factors for influence jobs, not something to look at."""


def _top(values: Sequence[ReleasedValue], top: int) -> list[ReleasedValue]:
    """The ``top`` largest by magnitude (non-finite first: they need attention), stable."""

    def key(iv: tuple[int, ReleasedValue]) -> tuple[float, int]:
        i, v = iv
        return (-math.inf if not math.isfinite(v.value) else -abs(v.value), i)

    return [v for _, v in sorted(enumerate(values), key=key)[: max(top, 1)]]


def _more(shown: int, total: int) -> str:
    return f" Only the {shown} largest of {total} are shown." if total > shown else ""


def _nonfinite_note(values: Iterable[ReleasedValue]) -> str:
    bad = [v.name for v in values if not is_finite(v)]
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
    svg = bar_chart(title, shown, axis_label, labels=[labels(v.name) for v in shown])
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
                    bar_chart(title, shown, axis, zero=True),
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
    pro, con = prototype_sides(release)
    columns = [c for c in pro if c in con]
    if not columns:
        return _generic_figures(release, top)

    def spread(c: str) -> float:
        d = pro[c].value - con[c].value
        return -abs(d) if math.isfinite(d) else -math.inf

    chosen = sorted(columns, key=lambda c: (spread(c), columns.index(c)))[: max(top, 1)]
    title = "What the most influential training records look like"
    svg = strip_chart(
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
                range_chart(title, rows),
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
    svg = bar_chart(title, rows, axis)
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
    if release.kind in SECOND_ORDER_KINDS:
        return []
    return _BY_KIND.get(release.kind, _generic_figures)(release, top)
