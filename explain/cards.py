"""Plain-language cards: two or three sentences that say what an explanation means.

The text is a deterministic function of its inputs (fixed wording, fixed number
formats, ties broken by schema order), so cards can be tested, cached and compared.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

from explain.counterfactual import Counterfactual
from explain.local import LocalExplanation, format_raw
from fedlens.types import Release, ReleasedValue

Z95 = 1.96  # a 95% interval of Gaussian noise is value ± Z95 * noise_std

__all__ = ["prediction_card", "prototype_sides", "release_card"]


def _join(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "\u2212")


def prediction_card(
    explanation: LocalExplanation,
    counterfactual: Counterfactual | None = None,
    *,
    top: int = 3,
    no_counterfactual: str = "",
    reference: str = "an average record",
) -> str:
    """Describe one prediction, its main reasons and, if given, what would change it.

    Parameters
    ----------
    explanation
        The prediction and its attributions (:func:`explain.local.explain_input`).
    counterfactual
        A change that flips the prediction, if one was found.
    top
        Most reasons named.
    no_counterfactual
        Said instead of the counterfactual sentence when there is none (nothing if empty).
    reference
        What the baseline of the attributions is, in words.

    Returns
    -------
    str
        E.g. ``"The model predicts >50K with probability 0.73. The main reasons are
        marital-status = Married-civ-spouse (+1.10) and education-num = 14 (+0.62),
        compared with an average record. Changing occupation to Exec-managerial would
        change the outcome to <=50K (probability 0.58)."``
    """
    sentences = [
        f"The model predicts {explanation.predicted_label} "
        f"with probability {explanation.probability:.2f}."
    ]
    # Reasons are the features that push towards the predicted class.
    toward = 1.0 if explanation.predicted_class == 1 else -1.0
    reasons = [a for a in explanation.attributions if toward * a.attribution > 0][: max(top, 0)]
    if reasons:
        named = [f"{a.feature} = {format_raw(a.value)} ({_signed(a.attribution)})" for a in reasons]
        noun = "reason is" if len(named) == 1 else "reasons are"
        sentences.append(f"The main {noun} {_join(named)}, compared with {reference}.")
    else:
        sentences.append(f"No feature pushes the prediction away from {reference}.")
    if counterfactual is not None and counterfactual.changes:
        changes = [f"{c.feature} to {format_raw(c.proposed)}" for c in counterfactual.changes]
        sentences.append(
            f"Changing {_join(changes)} would change the outcome to "
            f"{counterfactual.predicted_label} (probability {counterfactual.probability:.2f})."
        )
    elif no_counterfactual:
        sentences.append(no_counterfactual)
    return " ".join(sentences)


def release_card(release: Release, *, top: int = 3) -> str:
    """Describe a release in plain words: what it covers, what stands out, how sure it is.

    The wording depends on the kind: a fairness release names the groups whose rates
    differ most and by how much, an attribution release the features that mattered most,
    a group-influence release the groups that pushed the prediction up and down, and so
    on. Kinds without their own wording, and releases whose values do not follow their
    kind's layout, get a generic description of their largest values. Intervals are 95%
    ranges of the privacy noise (``value ± 1.96 noise_std``).

    Parameters
    ----------
    release
        A stored release.
    top
        Most values (features, groups) named.

    Returns
    -------
    str
        E.g. ``"Release 1f2e (global_attribution) averages over about 30162 records. The
        features with the largest values are marital-status (+0.41), ... . Each value
        carries privacy noise with standard deviation about 0.0021."``
    """
    describe = _CARDS.get(release.kind)
    text = describe(release, max(top, 0)) if describe is not None else None
    return text if text is not None else _generic_card(release, top)


def _records(release: Release) -> str:
    return (
        f"about {max(release.noised_count, 0.0):.0f}"
        if math.isfinite(release.noised_count)
        else "an unknown number of"
    )


def _generic_card(release: Release, top: int) -> str:
    values: tuple[ReleasedValue, ...] = release.grouped or release.values
    sentences = [
        f"Release {release.release_id} ({release.kind}) averages over {_records(release)} records."
    ]
    ranked = _largest(values, top)
    if ranked:
        named = [f"{v.name} ({_signed(v.value)})" for v in ranked]
        what = "features" if release.grouped else "entries"
        sentences.append(f"The {what} with the largest values are {_join(named)}.")
    noise = _noise_sentence(values)
    if noise:
        sentences.append(noise)
    return " ".join(sentences)


def _largest(values: Sequence[ReleasedValue], top: int) -> list[ReleasedValue]:
    """The ``top`` finite values of largest magnitude, ties in order."""
    finite = [(i, v) for i, v in enumerate(values) if math.isfinite(v.value)]
    return [v for _, v in sorted(finite, key=lambda iv: (-abs(iv[1].value), iv[0]))[: max(top, 0)]]


def _noise_sentence(values: Sequence[ReleasedValue]) -> str:
    stds = [v.noise_std for v in values if math.isfinite(v.noise_std)]
    if not stds:
        return ""
    noise = statistics.median(stds)
    if noise > 0:
        return f"Each value carries privacy noise with standard deviation about {noise:.2g}."
    return "The values carry no privacy noise."


def _half(v: ReleasedValue) -> float:
    return Z95 * max(v.noise_std, 0.0) if math.isfinite(v.noise_std) else math.inf


def _pm(v: ReleasedValue, digits: int = 2) -> str:
    """``0.31 ± 0.04`` (a 95% interval), or the value alone without noise."""
    value = f"{v.value:.{digits}f}".replace("-", "\u2212")
    half = _half(v)
    if half == 0:
        return value
    if not math.isfinite(half):
        return f"{value} (noise unknown)"
    return f"{value} \u00b1 {half:.{digits}f}"


def _spm(v: ReleasedValue) -> str:
    """Signed, with its 95% interval: ``+0.31 ± 0.04``."""
    text = f"{v.value:+.{_digits(v.value)}f}".replace("-", "\u2212")
    half = _half(v)
    return text + (f" \u00b1 {half:.{_digits(v.value)}f}" if half > 0 else "")


def _digits(x: float) -> int:
    return 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2 if abs(x) >= 0.01 else 4


def _clear_of_zero(v: ReleasedValue) -> bool:
    return abs(v.value) > _half(v)


def _percent(v: ReleasedValue) -> str:
    half = _half(v)
    text = f"{100 * v.value:.0f}%".replace("-", "\u2212")
    return text if half == 0 or not math.isfinite(half) else f"{text} \u00b1 {100 * half:.0f}"


def _points(v: ReleasedValue) -> str:
    """A difference of rates in percentage points, with its 95% interval."""
    half = _half(v)
    noise = f" \u00b1 {100 * half:.0f}" if 0 < half < math.inf else ""
    return f"{100 * v.value:.0f}{noise} percentage points".replace("-", "\u2212")


_NOISE_NOTE = "Intervals (\u00b1) are 95% ranges of the privacy noise."


def _attribution_card(release: Release, top: int) -> str | None:
    values = release.grouped or release.values
    # With target "both" the class-0 block mirrors the class-1 block: name class 1 only.
    if any(v.name.endswith("|class=1") for v in values):
        values = tuple(
            ReleasedValue(v.name.removesuffix("|class=1"), v.value, v.noise_std)
            for v in values
            if v.name.endswith("|class=1")
        )
    ranked = _largest(values, top)
    if not ranked:
        return None
    sentences = [
        f"Release {release.release_id} ({release.kind}) averages over {_records(release)} records.",
        "The features with the largest values are "
        f"{_join([f'{v.name} ({_signed(v.value)})' for v in ranked])}.",
    ]
    if "method" in release.params:
        sentences.append(
            "A positive value means the feature pushed the model's predictions towards the "
            "positive class on average, a negative value away from it."
        )
    unclear = [v.name for v in ranked if not _clear_of_zero(v)]
    if unclear:
        verb = "is" if len(unclear) == 1 else "are"
        noun = "effect" if len(unclear) == 1 else "effects"
        sentences.append(
            f"The {noun} of {_join(unclear)} {verb} too small to tell apart from the noise."
        )
    noise = _noise_sentence(values)
    if noise:
        sentences.append(noise)
    return " ".join(sentences)


def _partition_of(group: str) -> str:
    return "&".join(part.partition("=")[0] for part in group.split("&"))


def _fairness_card(release: Release, top: int) -> str | None:
    rates: dict[str, dict[str, ReleasedValue]] = {}  # partition -> group -> selection rate
    gaps: dict[str, ReleasedValue] = {}
    for v in release.values:
        if v.name.startswith("gap:demographic_parity:"):
            gaps[v.name.removeprefix("gap:demographic_parity:")] = v
        elif v.name.endswith(":selection_rate") and not v.name.startswith("gap:"):
            group = v.name.removesuffix(":selection_rate")
            rates.setdefault(_partition_of(group), {})[group] = v
    sentences = [
        f"Release {release.release_id} ({release.kind}) compares how the model treats groups "
        f"of {_records(release)} records."
    ]
    ranked = sorted(
        (p for p in gaps if math.isfinite(gaps[p].value) and len(rates.get(p, {})) >= 2),
        key=lambda p: -gaps[p].value,
    )[: max(top, 1)]
    if not ranked:
        if not gaps and not rates:
            return None
        sentences.append("Too few records were in each group to compare their rates.")
    pairs: list[tuple[str, str]] = []
    for i, p in enumerate(ranked):
        groups = rates[p]
        high = max(groups, key=lambda g: groups[g].value)
        low = min(groups, key=lambda g: groups[g].value)
        pairs.append((high, low))
        gap = gaps[p]
        if i == 0:
            sentences.append(
                f"By {p}, the share of records the model predicts positive is highest for "
                f"{high} ({_percent(groups[high])}) and lowest for {low} "
                f"({_percent(groups[low])}): a difference of {_points(gap)}."
            )
        else:
            sentences.append(f"By {p}, it differs by {_points(gap)} between {high} and {low}.")
        if not _clear_of_zero(gap):
            sentences.append("That difference could be due to the privacy noise alone.")
    if pairs:
        # The release explains the gap of each partition's highest and lowest groups.
        high, low = pairs[0]
        prefix = f"attribution_gap:{high} vs {low}:"
        explained = [
            v for v in release.grouped if v.name.startswith(prefix) and math.isfinite(v.value)
        ]
        if explained:
            v = max(explained, key=lambda r: abs(r.value))
            sentences.append(
                f"The feature whose effect on predictions differs most between {high} and "
                f"{low} is {v.name.removeprefix(prefix)}."
            )
    sentences.append(_NOISE_NOTE)
    return " ".join(sentences)


def _influence_card(release: Release, top: int) -> str | None:
    site = release.kind == "site_contribution"
    suffix = "/value" if site else "/influence"
    rows = [
        ReleasedValue(v.name.removesuffix(suffix), v.value, v.noise_std)
        for v in release.values
        if v.name.endswith(suffix) and math.isfinite(v.value)
    ]
    if not rows:
        return None
    up = [v for v in sorted(rows, key=lambda r: -r.value) if v.value > 0][:top]
    down = [v for v in sorted(rows, key=lambda r: r.value) if v.value < 0][:top]
    if site:
        sentences = [
            f"Release {release.release_id} ({release.kind}) values each site's data by how "
            f"much it improves the model on validation data ({_records(release)} records)."
        ]
        if up:
            sentences.append(f"Most helpful: {_join([f'{v.name} ({_spm(v)})' for v in up])}.")
        if down:
            sentences.append(
                f"Data that made the model worse: {_join([f'{v.name} ({_spm(v)})' for v in down])}."
            )
    else:
        sentences = [
            f"Release {release.release_id} ({release.kind}) shows which groups of "
            f"{_records(release)} training records pushed one prediction, in units of the "
            "prediction's score (log-odds)."
        ]
        if up:
            sentences.append(
                f"Pushed the prediction up most: {_join([f'{v.name} ({_spm(v)})' for v in up])}."
            )
        if down:
            sentences.append(
                f"Pushed it down most: {_join([f'{v.name} ({_spm(v)})' for v in down])}."
            )
    unclear = [v.name for v in (*up, *down) if not _clear_of_zero(v)]
    if unclear:
        sentences.append(f"The effect of {_join(unclear)} could be due to the privacy noise alone.")
    if not up and not down:
        sentences.append("No group had any measurable effect.")
    sentences.append(_NOISE_NOTE)
    return " ".join(sentences)


def prototype_sides(
    release: Release,
) -> tuple[dict[str, ReleasedValue], dict[str, ReleasedValue]]:
    """An ``influence_prototypes`` release's proponent and opponent averages, by column."""
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
    return pro, con


def _prototype_card(release: Release, top: int) -> str | None:
    pro, con = prototype_sides(release)
    both = [c for c in pro if c in con and math.isfinite(pro[c].value - con[c].value)]
    if not both:
        return None
    ranked = sorted(both, key=lambda c: (-abs(pro[c].value - con[c].value), both.index(c)))[:top]
    named = [f"{c} ({pro[c].value:.2f} against {con[c].value:.2f})" for c in ranked]
    return " ".join(
        [
            f"Release {release.release_id} ({release.kind}) describes the training records that "
            "most supported and most opposed one prediction, as averages: no real record is shown.",
            f"They differ most in {_join(named)}, on a scale from 0 to 1 (for a category, the "
            "share of records in it).",
            _noise_sentence([*pro.values(), *con.values()]),
        ]
    ).strip()


def _feature_stats_card(release: Release, top: int) -> str | None:
    by_name = {v.name: v for v in release.values}
    numeric = [v.name.removesuffix(":mean") for v in release.values if v.name.endswith(":mean")]
    if any(f"{f}:low" not in by_name or f"{f}:high" not in by_name for f in numeric):
        return None  # not the layout feature_stats releases: describe it generically
    freqs = [v for v in release.values if v.name.endswith(":freq") and math.isfinite(v.value)]
    if not numeric and not freqs:
        return None
    sentences = [
        f"Release {release.release_id} ({release.kind}) describes {_records(release)} "
        "records, on a scale from 0 (the low end of each feature's public range) to 1 (the "
        "high end)."
    ]
    if numeric:
        named = [
            f"{f} {by_name[f + ':mean'].value:.2f} (typically {by_name[f + ':low'].value:.2f} "
            f"to {by_name[f + ':high'].value:.2f})"
            for f in numeric[: max(top, 1)]
        ]
        more = f", and {len(numeric) - top} more" if len(numeric) > top else ""
        sentences.append(f"Averages: {_join(named)}{more}.")
    if freqs:
        common = sorted(freqs, key=lambda v: -v.value)[: max(top, 1)]
        sentences.append(
            "The most common categories are "
            f"{_join([f'{_category(v)} ({_percent(v)})' for v in common])}."
        )
    noise = _noise_sentence(release.values)
    if noise:
        sentences.append(noise)
    return " ".join(sentences)


def _category(v: ReleasedValue) -> str:
    return v.name.removesuffix(":freq")


def _self_influence_card(release: Release, top: int) -> str | None:
    shares = [v for v in release.grouped if "/share>=" in v.name and math.isfinite(v.value)]
    if not shares:
        return None
    ranked = sorted(shares, key=lambda v: -v.value)[: max(top, 1)]
    threshold = ranked[0].name.partition("/share>=")[2]
    named = [f"{v.name.partition('/share>=')[0]} ({_percent(v)})" for v in ranked]
    return " ".join(
        [
            f"Release {release.release_id} ({release.kind}) counts how strongly "
            f"{_records(release)} training records shape their own predictions; records "
            "that do so a lot are often mislabelled or unusual.",
            f"The groups with the largest share of such records (self-influence of {threshold} "
            f"or more) are {_join(named)}.",
            "Each site can review its own flagged records locally; no record leaves its site.",
            _NOISE_NOTE,
        ]
    )


def _loo_card(release: Release, top: int) -> str | None:
    del top
    by_name = {v.name: v for v in release.values}
    flips = by_name.get("flips")
    bins = [v for v in release.values if v.name.startswith("change in ")]
    if flips is None or not bins or not math.isfinite(flips.value):
        return None
    share = next((v for v in release.grouped if v.name == "flip_share"), None)
    sentences = [
        f"Release {release.release_id} ({release.kind}) asks how much the predictions would "
        f"change if any single one of {_records(release)} training records were left out."
    ]
    flipped = f"About {max(flips.value, 0.0):.0f} (\u00b1 {_half(flips):.0f}) records"
    if share is not None and math.isfinite(share.value):
        flipped += f", {_percent(share)} of all,"
    sentences.append(f"{flipped} would each flip a prediction on their own.")
    largest = max(bins, key=lambda v: v.value if math.isfinite(v.value) else -math.inf)
    low, _, high = largest.name.removeprefix("change in ").strip("[)").partition(", ")
    sentences.append(
        f"The largest number of records (about {max(largest.value, 0.0):.0f}) change the "
        f"predicted probability by between {low} and {high}."
    )
    sentences.append(_NOISE_NOTE)
    return " ".join(sentences)


def _second_order_card(release: Release, top: int) -> str | None:
    del top
    return (
        f"Release {release.release_id} ({release.kind}) holds second-order factors of the model "
        f"(how its loss curves), averaged over {_records(release)} records. They are not read "
        "directly: influence jobs use them to estimate which training data matters."
    )


_CARDS: dict[str, Callable[[Release, int], str | None]] = {
    "global_attribution": _attribution_card,
    "fairness": _fairness_card,
    "group_influence": _influence_card,
    "site_contribution": _influence_card,
    "influence_prototypes": _prototype_card,
    "feature_stats": _feature_stats_card,
    "self_influence": _self_influence_card,
    "loo_unfairness": _loo_card,
    "hessian": _second_order_card,
    "kfac": _second_order_card,
    "ekfac": _second_order_card,
}
