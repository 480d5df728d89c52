"""Figures of releases: every kind from its real post-processor; valid, escaped SVG."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from explain import get_kind
from explain.figures import (
    STYLESHEET,
    Figure,
    budget_figure,
    release_figures,
    release_section_html,
)
from fedlens.types import PrivacyCost, Release, ReleasedValue, SiteLedger
from privacy import LedgerEvent, PrivacyLedger

NAMES = ("age", "hours-per-week", "sex=Female", "sex=Male")
GROUPS = {"age": [0], "hours-per-week": [1], "sex": [2, 3]}
LAYOUT = {"feature_names": json.dumps(NAMES), "groups": json.dumps(GROUPS)}
QUERY = {"query": json.dumps([0.3, 0.5, 1.0, 0.0])}
KIND_PARAMS: dict[str, dict[str, str]] = {
    "global_attribution": {**LAYOUT, "method": "integrated_gradients"},
    "feature_stats": LAYOUT,
    "fairness": {
        **LAYOUT,
        "sensitive": json.dumps({"sex": ["Female", "Male"], "race": ["A", "B"]}),
        "min_group_size": "5",
    },
    "group_influence": {**LAYOUT, **QUERY, "group_by": "sex"},
    "site_contribution": {"sites": json.dumps(["hospital-a", "hospital-b"])},
    "influence_prototypes": {**LAYOUT, **QUERY},
    "self_influence": LAYOUT,
    "loo_unfairness": {**LAYOUT, **QUERY},
    "hessian": {**LAYOUT, "model": "logistic"},
}
PLOTTED = sorted(set(KIND_PARAMS) - {"hessian"})


def real_release(
    kind: str,
    params: Mapping[str, str] | None = None,
    *,
    seed: int = 0,
    noise_std: float = 2.0,
    count: float = 500.0,
    release_id: str = "",
) -> Release:
    """A release as the coordinator stores it: the kind's own post-processor on a noised sum."""
    params = dict(KIND_PARAMS[kind] if params is None else params)
    k = get_kind(kind)
    labels = k.coordinate_labels(NAMES, GROUPS, params)
    clip = 1.0
    noised = np.random.default_rng(seed).uniform(0.0, 0.3 * count * clip, len(labels) + 1)
    noised[-1] = count * clip
    post = k.postprocess(noised, noise_std, clip, tuple(labels), params)
    return Release(
        release_id=release_id or f"rel-{kind}",
        round_id="round-1",
        kind=kind,
        created_at="2026-12-06T10:00:00+00:00",
        noised_count=post.noised_count,
        values=post.values,
        grouped=post.grouped,
        costs=(
            PrivacyCost("hospital-a", 0.5, 1e-5, 1.25),
            PrivacyCost("hospital-b", 0.5, 1e-5, 2.0),
        ),
        params=params,
    )


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == "svg"
    assert root.get("role") == "img"
    assert root.get("aria-label")
    assert root.find("title") is not None
    return root


GEOMETRY = frozenset(
    {"x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "r", "d", "width", "height", "fill-opacity"}
)


def attribute_values(root: ET.Element) -> list[str]:
    """Every coordinate, size and opacity in the figure, lower-cased."""
    return [v.lower() for el in root.iter() for k, v in el.attrib.items() if k in GEOMETRY]


@pytest.mark.parametrize("kind", PLOTTED)
def test_each_kind_has_figures_that_parse_and_show_intervals(kind: str) -> None:
    figures = release_figures(real_release(kind))
    assert figures, kind
    for figure in figures:
        assert isinstance(figure, Figure)
        assert figure.title and figure.caption
        root = parse(figure.svg)
        texts = " ".join(t.text or "" for t in root.iter("text"))
        assert figure.title in texts
        assert "95%" in figure.caption or kind == "influence_prototypes"
        # Noised values carry whiskers (prototypes print their interval in each cell).
        intervals = [el for el in root.iter("path") if el.get("class") == "interval"]
        assert intervals or "\u00b1" in texts, (kind, figure.title)
        assert not any("nan" in v or "inf" in v for v in attribute_values(root))


def test_second_order_kinds_have_no_plot_but_a_sentence() -> None:
    release = real_release("hessian")
    assert release_figures(release) == []
    section = release_section_html(release)
    assert "<svg" not in section
    assert "second-order factors" in section
    assert "influence jobs" in section


def test_fairness_figures_show_rates_gaps_and_what_explains_them() -> None:
    figures = release_figures(real_release("fairness"))
    titles = [f.title for f in figures]
    assert titles[0] == "Selection rate per group"
    assert "Largest differences between groups" in titles
    assert "What explains the selection-rate gap" in titles
    rates = parse(figures[0].svg)
    labels = {t.text for t in rates.iter("text")}
    assert {"sex=Female", "sex=Male", "race=A", "race=B"} <= labels
    gaps = parse(figures[titles.index("Largest differences between groups")].svg)
    assert "sex: selection rate" in {t.text for t in gaps.iter("text")}


def test_attribution_bars_are_sorted_by_magnitude_and_limited_to_top() -> None:
    values = tuple(ReleasedValue(f"f{i}", (-1) ** i * i / 10, 0.01) for i in range(30))
    release = Release("r", "round", "global_attribution", "", 100.0, values, (), ())
    (figure,) = release_figures(release, top=5)
    root = parse(figure.svg)
    labels = [t.text for t in root.iter("text") if t.get("text-anchor") == "end"]
    assert labels == ["f29", "f28", "f27", "f26", "f25"]
    assert "5 largest of 30" in figure.caption


def test_attribution_for_both_classes_draws_class_one_once() -> None:
    release = real_release(
        "global_attribution", {**KIND_PARAMS["global_attribution"], "target": "both"}
    )
    assert any(v.name == "age|class=0" for v in release.grouped)
    (figure,) = release_figures(release)
    labels = {t.text for t in parse(figure.svg).iter("text") if t.get("text-anchor") == "end"}
    assert labels == {"age", "hours-per-week", "sex"}


def test_unknown_kind_falls_back_to_bars_of_its_values() -> None:
    release = Release(
        "r", "round", "something_new", "", 10.0, (ReleasedValue("a", 1.0, 0.1),), (), ()
    )
    (figure,) = release_figures(release)
    assert "something_new" in figure.title
    parse(figure.svg)


HOSTILE = '<script>alert("x")</script> & \' " \x00'


def test_hostile_names_are_escaped_everywhere() -> None:
    values = (ReleasedValue(HOSTILE, 0.5, 0.01), ReleasedValue("ok", -0.2, 0.01))
    release = Release(
        f"id{HOSTILE}",
        "round",
        "global_attribution",
        HOSTILE,
        100.0,
        values,
        values,
        (PrivacyCost(HOSTILE, 0.1, 1e-5, 0.2),),
    )
    (figure,) = release_figures(release)
    root = parse(figure.svg)
    assert "<script" not in figure.svg
    assert any("<script>" in (t.text or "") for t in root.iter("text"))
    section = release_section_html(release)
    assert "<script" not in section
    ET.fromstring(f"<div>{section}</div>")  # well-formed: every name became text


def test_non_finite_values_are_a_note_not_a_crash() -> None:
    values = (
        ReleasedValue("a", math.nan, 0.1),
        ReleasedValue("b", math.inf, 0.1),
        ReleasedValue("c", 0.3, math.inf),
        ReleasedValue("d", 0.2, 0.01),
    )
    for kind in ("global_attribution", "something_new"):
        release = Release("r", "round", kind, "", math.nan, values, (), ())
        (figure,) = release_figures(release)
        root = parse(figure.svg)
        assert "not finite" in figure.caption
        assert any("not drawn" in (t.text or "") for t in root.iter("text"))
        assert not any("nan" in v or "inf" in v for v in attribute_values(root))
        ET.fromstring(f"<div>{release_section_html(release)}</div>")


@pytest.mark.parametrize("kind", PLOTTED)
def test_non_finite_values_in_every_kind(kind: str) -> None:
    release = real_release(kind)
    broken = tuple(
        ReleasedValue(v.name, math.nan if i % 3 == 0 else v.value, v.noise_std)
        for i, v in enumerate(release.values)
    )
    release = Release(
        release.release_id, "round", kind, "", release.noised_count, broken, release.grouped, ()
    )
    for figure in release_figures(release):
        root = parse(figure.svg)
        assert not any("nan" in v or "inf" in v for v in attribute_values(root))


def test_empty_release_has_no_figure_and_says_so() -> None:
    release = Release("r", "round", "global_attribution", "", 0.0, (), (), ())
    assert release_figures(release) == []
    assert "no values to plot" in release_section_html(release)


@pytest.mark.parametrize("kind", sorted(KIND_PARAMS))
def test_section_has_card_figures_values_and_costs(kind: str) -> None:
    release = real_release(kind)
    section = release_section_html(release)
    root = ET.fromstring(f"<div>{section}</div>")
    (sec,) = root.iter("section")
    assert sec.get("id") == f"release-rel-{kind}"
    assert len(list(root.iter("svg"))) == len(release_figures(release))
    assert any(p.get("class") == "card" for p in root.iter("p"))
    tables = {t.get("class"): t for t in root.iter("table")}
    assert {"values", "costs"} <= set(tables)
    cost_text = " ".join(tables["costs"].itertext())
    assert "hospital-a" in cost_text and "hospital-b" in cost_text
    assert "\u00b1" in " ".join(tables["values"].itertext())
    for needle in ("http://", "https://", "<script", "javascript:"):
        assert needle not in section


def test_figures_are_deterministic() -> None:
    a = release_figures(real_release("fairness"))
    b = release_figures(real_release("fairness"))
    assert a == b


def test_stylesheet_needs_nothing_external() -> None:
    assert "url(" not in STYLESHEET and "@import" not in STYLESHEET and "http" not in STYLESHEET


T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def ledger(site: str, budget: float, hours: list[int], *, z: float = 2.0) -> SiteLedger:
    events = tuple(
        LedgerEvent("gaussian", z, label=f"round {h}", created_at=T0 + timedelta(hours=h))
        for h in hours
    )
    spent = PrivacyLedger(budget, 1e-5, events).epsilon_spent() if events else 0.0
    return SiteLedger(site, budget, 1e-5, events, epsilon_spent=spent, accountant="pld")


def test_budget_figure_climbs_to_each_sites_composed_spend() -> None:
    ledgers = [ledger("hospital-a", 4.0, [3, 0, 1]), ledger("<b>b</b>", 2.0, [2])]
    figure = budget_figure(ledgers)
    root = parse(figure.svg)
    assert "<b>" not in figure.svg
    curves = [p for p in root.iter("path") if p.get("stroke-width") == "2.5"]
    assert len(curves) == 2
    budgets = [line for line in root.iter("line") if line.get("class") == "budget"]
    assert len(budgets) == 2
    # The tooltips carry the composed ε after the last event, as the coordinator reports it.
    tips = [p.find("title").text or "" for p in curves]  # type: ignore[union-attr]
    assert f"{ledgers[0].epsilon_spent:.3g}" in tips[0]
    assert f"{ledgers[1].epsilon_spent:.3g}" in tips[1]
    assert "budget" in figure.caption


def test_budget_figure_steps_are_monotone_and_survive_an_overspent_ledger() -> None:
    over = ledger("hospital-a", 1.0, [0, 1, 2, 3], z=1.0)  # past its budget (a mirror allows it)
    assert over.epsilon_spent > 1.0
    root = parse(budget_figure([over]).svg)
    (curve,) = [p for p in root.iter("path") if p.get("stroke-width") == "2.5"]
    heights = [float(seg.split("H")[0]) for seg in curve.get("d", "").split("V")[1:]]
    assert heights == sorted(heights, reverse=True)  # SVG y grows downwards
    assert len(heights) == 4


def test_budget_figure_without_events_says_nothing_was_spent() -> None:
    figure = budget_figure([ledger("hospital-a", 4.0, [])])
    parse(figure.svg)
    assert "No site has spent" in figure.caption
    assert budget_figure([]).caption == figure.caption


def test_budget_figure_keeps_the_dozen_sites_that_spent_most() -> None:
    ledgers = [ledger(f"site-{i:02d}", 10.0, list(range(i % 5 + 1))) for i in range(15)]
    figure = budget_figure(ledgers)
    root = parse(figure.svg)
    curves = [p for p in root.iter("path") if p.get("stroke-width") == "2.5"]
    assert len(curves) == 12
    assert "Only the 12 of 15 sites that spent most are shown." in figure.caption
    shown = {(p.find("title").text or "").split(":")[0] for p in curves}  # type: ignore[union-attr]
    assert "site-00" not in shown and "site-04" in shown  # one event against five
