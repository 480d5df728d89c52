"""``fedlens report``: releases and budgets fetched over gRPC from a real coordinator, written
as one self-contained HTML page."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from explain.figures import release_figures
from fedlens.cli import main
from fedlens.types import Release, RoundSpec, SiteLedger
from privacy import LedgerEvent
from server.aggregation import Aggregator, QueryHandler
from server.grpc_server import serve
from server.storage import Store
from tests.explain.test_figures import real_release

T0 = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
KINDS = ("fairness", "global_attribution", "group_influence", "hessian", "self_influence")


@dataclass
class Coordinator:
    address: str
    store: Store
    releases: list[Release]


def _ledger(site: str, hours: list[int]) -> SiteLedger:
    events = tuple(
        LedgerEvent("gaussian", 3.0, label=f"round {h}", created_at=T0 + timedelta(hours=h))
        for h in hours
    )
    return SiteLedger(site, 4.0, 1e-5, events)


def _start(tmp_path: Path, kinds: tuple[str, ...]) -> Iterator[Coordinator]:
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    running = serve(Aggregator(store), QueryHandler(store))
    releases = [
        replace(real_release(kind, release_id=f"{i:02d}{kind}", seed=i), round_id=f"round-{i}")
        for i, kind in enumerate(kinds)
    ]
    try:
        for i, release in enumerate(releases):
            spec = RoundSpec(
                round_id=release.round_id,
                kind=release.kind,
                site_ids=("hospital-a", "hospital-b"),
                length=3,
                bits=32,
                scale=1000.0,
                clip_bound=1.0,
                labels=("a", "b"),
            )
            store.save_round(spec, "complete", now=T0)
            store.save_release(release, created_at=T0 + timedelta(minutes=i))
        store.mirror_ledger(_ledger("hospital-a", [0, 1, 2]), now=T0)
        store.mirror_ledger(_ledger("hospital-b", [1]), now=T0)
        yield Coordinator(running.address, store, releases)
    finally:
        running.stop(grace=None)
        store.close()


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    yield from _start(tmp_path, KINDS)


@pytest.fixture
def empty_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    yield from _start(tmp_path, ())


class _Tags(HTMLParser):
    """Collects start tags; fails on nothing, so the XML parse below is the strict check."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _read(path: Path) -> tuple[str, ET.Element]:
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # The page is also well-formed XML: every name and value was escaped.
    root = ET.fromstring(page.removeprefix("<!DOCTYPE html>"))
    return page, root


def _report(args: list[str], address: str) -> int:
    return main(["report", "--address", address, "--token", "", *args])


def test_report_of_the_newest_releases(
    coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    assert _report(["--out", str(out)], coordinator.address) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed.replace("\n", "")
    assert "5 releases (1 fairness, 1 global_attribution, 1 group_influence" in printed
    assert "2 site budgets" in printed

    page, root = _read(out)
    for needle in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert needle not in page
    parser = _Tags()
    parser.feed(page)
    assert not [t for t, attrs in parser.tags if t in ("img", "iframe", "object", "embed")]
    assert all(
        not (attrs.get("href") or "#").startswith(("http", "//", "javascript"))
        for _, attrs in parser.tags
    )

    assert coordinator.address in page
    assert "Generated 20" in page and "UTC" in page
    sections = {s.get("id"): s for s in root.iter("section")}
    toc = [a.get("href") for nav in root.iter("nav") for a in nav.iter("a")]
    for release in coordinator.releases:
        anchor = f"release-{release.release_id}"
        assert f"#{anchor}" in toc
        section = sections[anchor]
        assert release.release_id in "".join(section.itertext())
        svgs = list(section.iter("svg"))
        assert len(svgs) == len(release_figures(release))
        if release.kind != "hessian":
            assert svgs, release.kind
        assert any(p.get("class") == "card" for p in section.iter("p"))
    # Newest first, as the Query service lists them.
    order = [s.get("id") for s in root.iter("section") if s.get("id", "").startswith("release-")]
    assert order == [f"release-{r.release_id}" for r in reversed(coordinator.releases)]
    budgets = sections["budgets"]
    assert len(list(budgets.iter("svg"))) == 1
    (table,) = budgets.iter("table")
    assert [row[0].text for row in table.iter("tr")][1:] == ["hospital-a", "hospital-b"]


def test_report_of_chosen_releases_and_a_kind(
    coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fairness, attribution = coordinator.releases[0], coordinator.releases[1]
    out = tmp_path / "chosen.html"
    args = ["--out", str(out), "--release", attribution.release_id]
    assert _report([*args, "--release", fairness.release_id], coordinator.address) == 0
    _, root = _read(out)
    ids = [s.get("id") for s in root.iter("section") if s.get("id", "").startswith("release-")]
    assert ids == [f"release-{attribution.release_id}", f"release-{fairness.release_id}"]

    out = tmp_path / "kind.html"
    assert _report(["--out", str(out), "--kind", "fairness"], coordinator.address) == 0
    _, root = _read(out)
    ids = [s.get("id") for s in root.iter("section") if s.get("id", "").startswith("release-")]
    assert ids == [f"release-{fairness.release_id}"]
    assert "1 release (1 fairness)" in capsys.readouterr().out


def test_no_releases_is_a_clear_error(
    empty_coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    assert _report(["--out", str(out)], empty_coordinator.address) == 2
    assert "has no releases to report" in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_out_names_the_path(
    coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "missing-dir" / "report.html"
    assert _report(["--out", str(out)], coordinator.address) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "cannot write the report to" in err and "report.html" in err


def test_unknown_release_is_an_error(
    coordinator: Coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    assert _report(["--out", str(out), "--release", "nope"], coordinator.address) == 2
    assert "nope" in capsys.readouterr().err
    assert not out.exists()
