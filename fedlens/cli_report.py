"""``fedlens report --out report.html``: releases and budgets as one self-contained web page.

The page reads offline and safely anywhere: inline CSS and SVG figures
(:mod:`explain.figures`), no script, no font or image to fetch, no link out of the file.
Everything in it comes through the Query service, so writing it costs no privacy.
"""

from __future__ import annotations

import argparse
import html
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlens.errors import ConfigurationError
from fedlens.settings import Settings
from fedlens.types import Release, SiteLedger

__all__ = ["add_report_commands", "report_html"]

console = Console()
err_console = Console(stderr=True)

DEFAULT_LIMIT = 20


def add_report_commands(sub: Any) -> None:
    """Add ``fedlens report``."""
    report = sub.add_parser(
        "report",
        help="write releases and budgets as one self-contained HTML page",
        description="Fetch releases and site budgets from the coordinator's Query service and "
        "write them, with figures and plain-language summaries, to one HTML file that needs "
        "no network to read.",
    )
    report.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    report.add_argument(
        "--release",
        action="append",
        default=[],
        metavar="ID",
        help="a release to include (repeatable; default: the newest --limit releases)",
    )
    report.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"how many of the newest releases to include (default {DEFAULT_LIMIT})",
    )
    report.add_argument("--kind", default="", help="only releases of this kind")
    report.add_argument("--title", default="Explanation report", help="the page's heading")
    report.add_argument(
        "--address", default="", help="coordinator host:port (default: FEDLENS_AGGREGATOR_ADDRESS)"
    )
    report.add_argument(
        "--tls-ca", type=Path, help="CA certificate of the server's TLS (default: FEDLENS_TLS_CA)"
    )
    report.add_argument(
        "--token", default="", help="your token (default: FEDLENS_TOKEN); see fedlens admin token"
    )
    report.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from fedlens.query_client import QueryClient

    if args.limit < 1:
        raise ConfigurationError(f"--limit must be at least 1, got {args.limit}")
    address = args.address or settings.aggregator_address
    with QueryClient(
        address, tls_ca=args.tls_ca or settings.tls_ca, token=args.token or settings.token_value
    ) as client:
        if args.release:
            releases = [client.get_release(release_id) for release_id in args.release]
            if args.kind:
                releases = [r for r in releases if r.kind == args.kind]
        else:
            summaries = client.list_releases(limit=args.limit, kind=args.kind)
            releases = [client.get_release(s.release_id) for s in summaries]
        if not releases:
            which = f" of kind {args.kind!r}" if args.kind else ""
            err_console.print(
                f"[red]error:[/red] the coordinator at {address} has no releases{which} to "
                "report; run a job first (fedlens query submit KIND)"
            )
            return 2
        ledgers = client.list_budgets()
    page = report_html(
        releases, ledgers, address=address, generated_at=datetime.now(UTC), title=args.title
    )
    out: Path = args.out
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        err_console.print(f"[red]error:[/red] cannot write the report to {out}: {exc.strerror}")
        return 2
    kinds = Counter(r.kind for r in releases)
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    noun = "release" if len(releases) == 1 else "releases"
    sites = f"{len(ledgers)} site budget{'s' if len(ledgers) != 1 else ''}"
    console.print(str(out.resolve()), markup=False, highlight=False, soft_wrap=True)
    console.print(f"{len(releases)} {noun} ({summary}) and {sites}", markup=False)
    return 0


def report_html(
    releases: Sequence[Release],
    ledgers: Sequence[SiteLedger],
    *,
    address: str,
    generated_at: datetime,
    title: str = "Explanation report",
) -> str:
    """The whole page: contents, one section per release, then the sites' budgets.

    Parameters
    ----------
    releases
        In the order to show them.
    ledgers
        Every site's mirrored ledger (:meth:`fedlens.query_client.QueryClient.list_budgets`).
    address
        The coordinator the page was read from, shown in its header.
    generated_at
        When the page was made (shown in UTC).
    title
        The page's heading.
    """
    from explain.figures import (
        STYLESHEET,
        anchor_id,
        budget_figure,
        figure_html,
        kind_title,
        release_section_html,
    )

    esc = html.escape
    when = generated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    toc = "".join(
        f'<li><a href="#{esc(anchor_id(r.release_id))}">{esc(kind_title(r.kind))}</a> '
        f'<span class="release-id">{esc(r.kind)} \u00b7 {esc(r.release_id)}</span></li>'
        for r in releases
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"/>',
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
        f"<title>{esc(title)}</title><style>{STYLESHEET}</style></head><body>",
        f"<header><h1>{esc(title)}</h1>",
        f'<p class="meta">Generated {esc(when)} from the coordinator at {esc(address)}; '
        f"{len(releases)} release{'s' if len(releases) != 1 else ''}.</p>",
        '<p class="card">Every number here was computed by the participating sites on their '
        "own data, which never left them; only noised totals were combined. The noise "
        "protects each person in the data, so every value is approximate: ranges written "
        "\u00b1 and drawn as whiskers are 95% intervals of that noise.</p></header>",
        f'<nav class="toc"><h2>Contents</h2><ol>{toc}'
        '<li><a href="#budgets">Privacy budgets of the sites</a></li></ol></nav>',
        "<main>",
        *(release_section_html(r) for r in releases),
        '<section id="budgets"><h2>Privacy budgets of the sites</h2>',
        '<p class="card">Each site has a privacy budget (\u03b5): the more it spends, the more '
        "could in principle be learnt about its records. A site refuses any work that would "
        "take it past its budget.</p>",
        figure_html(budget_figure(ledgers)),
        _budget_table(ledgers),
        "</section></main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _budget_table(ledgers: Sequence[SiteLedger]) -> str:
    if not ledgers:
        return '<p class="meta">The coordinator knows no site budgets yet.</p>'
    rows = "".join(
        f'<tr><td>{html.escape(s.site_id)}</td><td class="num">{s.budget_epsilon:g}</td>'
        f'<td class="num">{s.delta:.1e}</td><td class="num">{s.epsilon_spent:.3f}</td>'
        f'<td class="num">{s.reserved_epsilon:.3f}</td><td class="num">{len(s.events)}</td></tr>'
        for s in ledgers
    )
    return (
        '<table class="budgets"><caption>Budgets and spend per site</caption><thead><tr>'
        '<th>site</th><th class="num">budget \u03b5</th><th class="num">\u03b4</th>'
        '<th class="num">spent \u03b5</th><th class="num">\u03b5 reserved by pending jobs</th>'
        '<th class="num">events</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )
