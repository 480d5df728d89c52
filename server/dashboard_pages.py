"""The dashboard's HTML: one function per page, plain server-rendered markup.

Pages carry no script and load nothing from elsewhere: the stylesheet is inline and the
plots are inline SVG (:mod:`explain.figures`), so the dashboard works on a machine with
no network and passes a ``default-src 'none'`` content security policy. Every text that
comes from a release, a job, a site or a request is escaped here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from explain.figures import STYLESHEET, budget_figure, release_section_html
from fedlens.jobs import Job, JobState
from fedlens.types import Release, ReleaseSummary, SiteLedger
from server.access import Principal, Role

__all__ = [
    "Viewer",
    "budgets_page",
    "error_page",
    "job_page",
    "jobs_page",
    "login_page",
    "overview_page",
    "release_page",
    "releases_page",
]

_DASHBOARD_CSS = """
nav.top { display: flex; gap: 1.2em; align-items: baseline; padding: .6em 1em;
  background: #1f3a5f; color: #fff; }
nav.top a { color: #fff; text-decoration: none; font-weight: 600; }
nav.top .who { margin-left: auto; font-size: .9em; }
nav.top form { display: inline; }
nav.top button { background: none; border: 1px solid #fff; color: #fff; cursor: pointer; }
main { max-width: 1100px; margin: 1em auto; padding: 0 1em; }
.banner { padding: .6em 1em; margin: .6em 0; border-radius: 4px; }
.banner.error { background: #fde8e8; border: 1px solid #c0392b; }
.banner.warn { background: #fff6dd; border: 1px solid #d4a017; }
.banner.ok { background: #e6f5ea; border: 1px solid #2e8b57; }
table.list { border-collapse: collapse; width: 100%; }
table.list th, table.list td { border-bottom: 1px solid #ddd; padding: .3em .5em;
  text-align: left; }
.state-done { color: #2e7d32; } .state-refused, .state-failed { color: #b71c1c; }
.state-queued, .state-running { color: #8a6d00; }
form.job label { display: block; margin-top: .6em; font-weight: 600; }
form.job textarea, form.job input[type=text], form.job select { width: 100%;
  font-family: monospace; }
.hint { color: #555; font-size: .9em; }
"""

_ACTIVE = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class Viewer:
    """Who a page is rendered for: the principal, its session's CSRF token, and whether
    the server runs with access control off."""

    principal: Principal
    csrf: str = ""
    open_access: bool = False


def _layout(title: str, body: str, viewer: Viewer | None, *, refresh_s: int = 0) -> str:
    principal = viewer.principal if viewer else None
    csrf = viewer.csrf if viewer else ""
    open_access = viewer.open_access if viewer else False
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    nav = ""
    if principal is not None:
        logout = (
            ""
            if open_access
            else f'<form method="post" action="/logout"><input type="hidden" name="csrf" '
            f'value="{escape(csrf)}"><button type="submit" id="logout">Log out</button></form>'
        )
        nav = (
            '<nav class="top"><a href="/">fedlens</a><a href="/releases">Releases</a>'
            '<a href="/jobs">Jobs</a><a href="/budgets">Budgets</a>'
            f'<span class="who" id="who">{escape(principal.name)} · '
            f"{escape(principal.role.name.lower())}</span>{logout}</nav>"
        )
    warn = (
        '<div class="banner warn">Access control is off: anyone who reaches this page can '
        "read every release and submit jobs.</div>"
        if open_access
        else ""
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{refresh}'
        f"<title>{escape(title)} · fedlens</title>"
        f"<style>{STYLESHEET}{_DASHBOARD_CSS}</style></head>"
        f"<body>{nav}<main>{warn}<h1>{escape(title)}</h1>{body}</main></body></html>"
    )


def login_page(*, error: str = "") -> str:
    banner = f'<div class="banner error" id="error">{escape(error)}</div>' if error else ""
    body = (
        f"{banner}<p>Paste the access token your coordinator's administrator issued you "
        "(<code>fedlens admin token issue</code>). It is checked once and never stored "
        "in this browser.</p>"
        '<form method="post" action="/login" class="job">'
        '<label for="token">Token</label>'
        '<input type="password" id="token" name="token" autocomplete="off" required>'
        '<p><button type="submit" id="login">Log in</button></p></form>'
    )
    return _layout("Log in", body, None)


def _when(stamp: str) -> str:
    """An RFC 3339 UTC time to the second, as the releases show theirs."""
    return stamp.split(".")[0].removesuffix("+00:00")


def _releases_table(releases: Sequence[ReleaseSummary]) -> str:
    if not releases:
        return '<p id="no-releases">No releases yet: submit a job to get one.</p>'
    rows = "".join(
        f'<tr><td><a href="/releases/{escape(r.release_id)}">{escape(r.release_id[:12])}</a>'
        f"</td><td>{escape(r.kind)}</td><td>{escape(r.created_at)}</td>"
        f"<td>{r.num_sites}</td></tr>"
        for r in releases
    )
    return (
        '<table class="list" id="releases"><thead><tr><th>Release</th><th>Kind</th>'
        f"<th>Created (UTC)</th><th>Sites</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _jobs_table(jobs: Sequence[Job]) -> str:
    if not jobs:
        return '<p id="no-jobs">No jobs yet.</p>'
    rows = []
    for j in jobs:
        release = (
            f'<a href="/releases/{escape(j.release_id)}">{escape(j.release_id[:12])}</a>'
            if j.release_id
            else ""
        )
        rows.append(
            f'<tr><td><a href="/jobs/{escape(j.job_id)}">{escape(j.job_id[:12])}</a></td>'
            f"<td>{escape(j.kind)}</td>"
            f'<td class="state-{escape(j.state.value)}">{escape(j.state.value)}</td>'
            f"<td>{release}</td><td>{escape(j.submitted_by)}</td>"
            f"<td>{escape(_when(j.created_at))}</td><td>{escape(j.reason)}</td></tr>"
        )
    return (
        '<table class="list" id="jobs"><thead><tr><th>Job</th><th>Kind</th><th>State</th>'
        "<th>Release</th><th>Submitted by</th><th>Created (UTC)</th><th>Reason</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def overview_page(
    releases: Sequence[ReleaseSummary],
    jobs: Sequence[Job],
    ledgers: Sequence[SiteLedger],
    *,
    viewer: Viewer,
) -> str:
    figure = budget_figure(ledgers)
    body = (
        "<h2>Newest releases</h2>"
        f"{_releases_table(releases)}"
        '<p><a href="/releases">All releases</a></p>'
        "<h2>Job queue</h2>"
        f"{_jobs_table(jobs)}"
        '<p><a href="/jobs">All jobs, and a form to ask a new question</a></p>'
        "<h2>Privacy budget spent per site</h2>"
        f"<figure>{figure.svg}<figcaption>{escape(figure.caption)}</figcaption></figure>"
    )
    return _layout("Overview", body, viewer)


def releases_page(
    releases: Sequence[ReleaseSummary],
    kinds: Sequence[str],
    *,
    kind: str,
    viewer: Viewer,
) -> str:
    options = "".join(
        f'<option value="{escape(k)}"{" selected" if k == kind else ""}>{escape(k)}</option>'
        for k in ("", *kinds)
    )
    body = (
        '<form method="get" action="/releases"><label for="kind">Kind </label>'
        f'<select id="kind" name="kind">{options}</select> '
        '<button type="submit">Filter</button></form>'
        f"{_releases_table(releases)}"
    )
    return _layout("Releases", body, viewer)


def release_page(release: Release, *, viewer: Viewer) -> str:
    body = f'<div id="release">{release_section_html(release)}</div>'
    return _layout(f"Release {release.release_id[:12]} ({release.kind})", body, viewer)


def budgets_page(ledgers: Sequence[SiteLedger], *, viewer: Viewer) -> str:
    """Each site's mirrored ledger and the ε its queued and running jobs hold: "left" is
    what a new job may still spend."""
    figure = budget_figure(ledgers)
    rows = "".join(
        f"<tr><td>{escape(m.site_id)}</td><td>{m.budget_epsilon:.3g}</td>"
        f"<td>{m.epsilon_spent:.3g}</td><td>{m.reserved_epsilon:.3g}</td>"
        f"<td>{max(m.budget_epsilon - m.epsilon_spent - m.reserved_epsilon, 0.0):.3g}"
        f"</td><td>{m.delta:.1e}</td>"
        f"<td>{len(m.events)}</td><td>{escape(m.accountant)}</td></tr>"
        for m in ledgers
    )
    table = (
        '<table class="list" id="budgets"><thead><tr><th>Site</th><th>Budget ε</th>'
        "<th>Spent ε</th><th>Reserved ε</th><th>Left ε</th><th>δ</th><th>Releases</th>"
        "<th>Accountant</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
        if ledgers
        else '<p id="no-budgets">No site has reported its ledger yet.</p>'
    )
    body = (
        f"<figure>{figure.svg}<figcaption>{escape(figure.caption)}</figcaption></figure>{table}"
        '<p class="hint">Every site keeps its own ledger and refuses work past its budget; '
        "this page shows the coordinator's mirror of those ledgers. Reserved ε is held by "
        "queued and running jobs until they end: what their releases add to the spent ε when "
        "composed with it.</p>"
    )
    return _layout("Privacy budgets", body, viewer)


def jobs_page(
    jobs: Sequence[Job],
    kinds: Sequence[str],
    *,
    viewer: Viewer,
    error: str = "",
    form: dict[str, str] | None = None,
) -> str:
    form = form or {}
    banner = f'<div class="banner error" id="error">{escape(error)}</div>' if error else ""
    if viewer.principal.role >= Role.ANALYST:
        options = "".join(
            f'<option value="{escape(k)}"{" selected" if k == form.get("kind") else ""}>'
            f"{escape(k)}</option>"
            for k in kinds
        )
        submit = (
            "<h2>Ask a question</h2>"
            '<form method="post" action="/jobs" class="job" id="submit-job">'
            f'<input type="hidden" name="csrf" value="{escape(viewer.csrf)}">'
            f'<label for="job-kind">Kind</label><select id="job-kind" name="kind">{options}'
            "</select>"
            '<label for="job-params">Parameters</label>'
            '<textarea id="job-params" name="params" rows="3" placeholder="explain-epsilon=0.5">'
            f"{escape(form.get('params', ''))}</textarea>"
            '<div class="hint">One <code>key=value</code> per line, as for '
            "<code>fedlens query submit --param</code>.</div>"
            '<label for="job-cohort">Cohort (JSON, global_attribution only)</label>'
            '<input type="text" id="job-cohort" name="cohort" '
            f'placeholder=\'{{"sex": ["Female"]}}\' value="{escape(form.get("cohort", ""))}">'
            '<label for="job-input">Query input (JSON, influence kinds only)</label>'
            f'<textarea id="job-input" name="query_input" rows="3">'
            f"{escape(form.get('query_input', ''))}</textarea>"
            '<p><button type="submit" id="submit">Submit job</button></p></form>'
        )
    else:
        submit = (
            '<p class="hint" id="viewer-note">You are a viewer: you can read releases and '
            "jobs; submitting a job needs the analyst role.</p>"
        )
    body = f"{banner}{submit}<h2>Jobs, newest first</h2>{_jobs_table(jobs)}"
    return _layout("Jobs", body, viewer)


def job_page(job: Job, *, viewer: Viewer) -> str:
    what = {
        JobState.QUEUED: "Waiting for the coordinator to start its explanation round.",
        JobState.RUNNING: "The sites are computing their noised contributions.",
        JobState.DONE: (
            "Answered from a stored release: no privacy was spent."
            if job.from_cache
            else "The sites answered; the release below is stored and its cost is in their ledgers."
        ),
        JobState.REFUSED: "Refused: nothing was spent.",
        JobState.FAILED: "Failed: the run broke off.",
    }[job.state]
    release = (
        f'<p><a id="release-link" href="/releases/{escape(job.release_id)}">'
        f"Read release {escape(job.release_id[:12])}</a></p>"
        if job.release_id
        else ""
    )
    reason = f'<p id="reason">Reason: {escape(job.reason)}</p>' if job.reason else ""
    refreshing = (
        '<p class="hint">This page refreshes itself until the job ends.</p>'
        if job.state in _ACTIVE
        else ""
    )
    body = (
        f'<p id="job-state" class="state-{escape(job.state.value)}">'
        f"<strong>{escape(job.state.value)}</strong> — {escape(what)}</p>{reason}{release}"
        f"{refreshing}"
        f"<p>Kind {escape(job.kind)}, submitted by {escape(job.submitted_by)} at "
        f"{escape(_when(job.created_at))}, last change {escape(_when(job.updated_at))} (UTC).</p>"
    )
    return _layout(
        f"Job {job.job_id[:12]}",
        body,
        viewer,
        refresh_s=2 if job.state in _ACTIVE else 0,
    )


def error_page(status: int, message: str, *, viewer: Viewer | None) -> str:
    body = (
        f'<div class="banner error" id="error">{escape(message)}</div><p><a href="/">Back</a></p>'
    )
    return _layout(f"Error {status}", body, viewer)
