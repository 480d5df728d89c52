"""Plain-language cards: two or three sentences that say what an explanation means.

The text is a deterministic function of its inputs (fixed wording, fixed number
formats, ties broken by schema order), so cards can be tested, cached and compared.
"""

from __future__ import annotations

import statistics

from explain.counterfactual import Counterfactual
from explain.local import LocalExplanation, format_raw
from fedlens.types import Release, ReleasedValue

__all__ = ["prediction_card", "release_card"]


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
    """Describe a release: what it covers, its largest values and the noise they carry.

    Parameters
    ----------
    release
        A stored release.
    top
        Most values named.

    Returns
    -------
    str
        E.g. ``"Release 1f2e (global_attribution) averages over about 30162 records. The
        features with the largest values are marital-status (+0.41), ... . Each value
        carries privacy noise with standard deviation about 0.0021."``
    """
    values: tuple[ReleasedValue, ...] = release.grouped or release.values
    sentences = [
        f"Release {release.release_id} ({release.kind}) averages over about "
        f"{max(release.noised_count, 0.0):.0f} records."
    ]
    ranked = sorted(enumerate(values), key=lambda iv: (-abs(iv[1].value), iv[0]))[: max(top, 0)]
    if ranked:
        named = [f"{v.name} ({_signed(v.value)})" for _, v in ranked]
        what = "features" if release.grouped else "entries"
        sentences.append(f"The {what} with the largest values are {_join(named)}.")
    if values:
        noise = statistics.median(v.noise_std for v in values)
        if noise > 0:
            sentences.append(
                f"Each value carries privacy noise with standard deviation about {noise:.2g}."
            )
        else:
            sentences.append("The values carry no privacy noise.")
    return " ".join(sentences)
