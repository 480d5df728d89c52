"""The dashboard over real HTTP on loopback (uvicorn in a thread), on a real store with
access control: logging in, roles, refusals that name what was wrong and charge nothing,
CSRF, oversize and malformed forms, revoked tokens, and the pages' content policy."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest

from fedlens.datasets import load_dataset
from fedlens.errors import AuthenticationError
from fedlens.models import build_model
from fedlens.types import ReleasedValue, SiteLedger
from privacy import LedgerEvent
from server.access import AccessControl, Role
from server.aggregation import Aggregator, QueryHandler
from server.dashboard import COOKIE, MAX_FORM_BYTES, DashboardServer, start_dashboard
from server.dashboard_sessions import SessionStore
from server.jobs import JobQueue
from server.storage import Store
from tests.explain.test_figures import PLOTTED, real_release
from tests.server.stored import save_release, store_release

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SITES = ("site-0", "site-1")


class Dashboard:
    def __init__(self, url: str, *, open_access: bool = False, burst: float = 100) -> None:
        self.store = Store(url)
        self.access = None if open_access else AccessControl(self.store, burst=burst, rate=0.5)
        self.jobs = JobQueue(Aggregator(self.store), min_cohort_size=50)
        self.server: DashboardServer = start_dashboard(
            QueryHandler(self.store), self.jobs, self.access
        )
        self.tokens = (
            {}
            if self.access is None
            else {
                role: self.access.issue(f"{role.name.lower()}-1", role, now=NOW)[1] for role in Role
            }
        )
        pre = load_dataset("breast_cancer").preprocessor
        self.store.save_model(
            dataset="breast_cancer",
            model="logistic",
            state=build_model("logistic", pre.dimension, seed=0).state_dict(),
            now=NOW,
            params={"seed": "0", "rounds": "1"},
        )
        for i, site in enumerate(SITES):
            events = tuple(
                LedgerEvent(
                    "gaussian",
                    4.0,
                    label=f"release {k}",
                    created_at=NOW + timedelta(hours=k + i),
                )
                for k in range(2)
            )
            self.store.mirror_ledger(
                SiteLedger(site_id=site, budget_epsilon=4.0, delta=1e-5, events=events), now=NOW
            )
        self.save_release("rel-attribution-1", "global_attribution")

    def save_release(self, release_id: str, kind: str) -> None:
        save_release(
            self.store,
            release_id,
            kind,
            SITES,
            now=NOW,
            values=(ReleasedValue("age", 0.31, 0.02), ReleasedValue("sex=Female", -0.12, 0.02)),
            grouped=(ReleasedValue("age", 0.31, 0.02), ReleasedValue("sex", -0.12, 0.02)),
            epsilon=0.5,
            noised_count=812.0,
        )

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, follow_redirects=False, timeout=30)

    @contextlib.contextmanager
    def login(self, role: Role) -> Iterator[httpx.Client]:
        with self.client() as client:
            response = client.post("/login", data={"token": self.tokens[role]})
            assert response.status_code == 303, response.text
            assert COOKIE in client.cookies
            yield client

    def refusals(self) -> list[str]:
        return [e.detail for e in self.store.audit_entries() if e.action == "access_refused"]

    def close(self) -> None:
        self.server.stop()
        self.store.close()


@pytest.fixture
def dash(database_url: str) -> Iterator[Dashboard]:
    d = Dashboard(database_url)
    yield d
    d.close()


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no CSRF field on the page"
    return match.group(1)


@pytest.mark.both_backends
def test_pages_need_a_login_and_a_valid_token_gets_one(dash: Dashboard) -> None:
    with dash.client() as anonymous:
        for path in ("/", "/releases", "/jobs", "/budgets", "/releases/rel-attribution-1"):
            response = anonymous.get(path)
            assert response.status_code == 303 and response.headers["location"] == "/login"
    with dash.login(Role.VIEWER) as viewer:
        page = viewer.get("/")
        assert page.status_code == 200
        assert "viewer-1" in page.text and "rel-attribut" in page.text
        assert "<svg" in page.text  # the budget plot
        release = viewer.get("/releases/rel-attribution-1")
        assert release.status_code == 200 and "global_attribution" in release.text
        budgets = viewer.get("/budgets")
        assert "site-0" in budgets.text and "site-1" in budgets.text


def test_a_wrong_or_malformed_token_is_refused_and_audited(dash: Dashboard) -> None:
    with dash.client() as client:
        for token in ("fl_nosuch_secret", "not-a-token", dash.tokens[Role.VIEWER] + "x"):
            response = client.post("/login", data={"token": token})
            assert response.status_code == 401
            assert 'id="error"' in response.text
            assert COOKIE not in client.cookies
    refusals = dash.refusals()
    assert len(refusals) == 3 and all(r.startswith("dashboard/login") for r in refusals)
    assert any("malformed token" in r for r in refusals)


def test_every_page_is_self_contained_and_well_formed(dash: Dashboard) -> None:
    with dash.login(Role.ANALYST) as client:
        for path in ("/", "/releases", "/jobs", "/budgets", "/releases/rel-attribution-1"):
            response = client.get(path)
            assert response.status_code == 200, path
            csp = response.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src" not in csp
            assert response.headers["x-content-type-options"] == "nosniff"
            text = response.text
            assert "<script" not in text and "@import" not in text
            # Nothing is fetched from elsewhere (the SVG namespace is a name, not a fetch).
            assert not re.search(r'(src|href)="[a-z]+:', text), path
            for svg in re.findall(r"<svg.*?</svg>", text, flags=re.S):
                ElementTree.fromstring(svg)  # every plot is well-formed XML


def test_a_viewer_cannot_submit_and_the_refusal_is_audited(dash: Dashboard) -> None:
    with dash.login(Role.VIEWER) as viewer:
        page = viewer.get("/jobs")
        assert 'id="viewer-note"' in page.text and 'id="submit-job"' not in page.text
        response = viewer.post("/jobs", data={"kind": "global_attribution", "csrf": "x"})
        assert response.status_code == 403
        assert "submitjob needs analyst" in response.text.lower()
    assert dash.jobs.list_jobs() == []
    assert any("dashboard/SubmitJob" in r for r in dash.refusals())


def test_an_analyst_submits_a_job_and_reads_its_page(dash: Dashboard) -> None:
    with dash.login(Role.ANALYST) as client:
        csrf = _csrf(client.get("/jobs").text)
        response = client.post(
            "/jobs",
            data={
                "csrf": csrf,
                "kind": "global_attribution",
                "params": "explain-epsilon=0.5\n# a comment\nig-steps = 8",
                "cohort": "",
                "query_input": "",
            },
        )
        assert response.status_code == 303
        job_id = response.headers["location"].rsplit("/", 1)[-1]
        (job,) = dash.jobs.list_jobs()
        assert job.job_id == job_id and job.state.value == "queued"
        assert job.submitted_by.startswith("analyst-1 (")
        page = client.get(f"/jobs/{job_id}")
        assert 'id="job-state"' in page.text and "queued" in page.text
        assert 'http-equiv="refresh"' in page.text  # follows the job until it ends
        assert job_id[:12] in client.get("/jobs").text


@pytest.mark.parametrize(
    ("form", "status", "says"),
    [
        ({"kind": "no_such_kind"}, 400, "no_such_kind"),
        ({"kind": "hessian"}, 400, "releases factors"),
        ({"kind": "global_attribution", "params": "explain-epsilon"}, 400, "not key=value"),
        ({"kind": "global_attribution", "params": "clip-bound=9"}, 400, "clip-bound"),
        ({"kind": "global_attribution", "params": "explain-epsilon=nan"}, 400, "explain-epsilon"),
        ({"kind": "global_attribution", "cohort": "{not json"}, 400, "cohort"),
        ({"kind": "fairness", "query_input": '{"age": 40}'}, 400, "influence kinds only"),
        ({"kind": "global_attribution", "params": "explain-epsilon=50"}, 409, "site-0"),
    ],
)
def test_bad_questions_are_refused_with_the_reason_and_nothing_queued(
    dash: Dashboard, form: dict[str, str], status: int, says: str
) -> None:
    with dash.login(Role.ANALYST) as client:
        form = {"csrf": _csrf(client.get("/jobs").text), **form}
        response = client.post("/jobs", data=form)
        assert response.status_code == status, response.text
        assert 'id="error"' in response.text and says in response.text
        # The form keeps what was typed, so the analyst can correct it.
        if form.get("params"):
            assert form["params"] in response.text
    assert dash.jobs.list_jobs() == []
    ledgers = {m.site_id: len(m.events) for m in dash.store.site_ledgers()}
    assert ledgers == {"site-0": 2, "site-1": 2}  # nothing charged


def test_a_form_without_the_session_csrf_token_is_refused(dash: Dashboard) -> None:
    with dash.login(Role.ANALYST) as client:
        for csrf in ("", "forged"):
            response = client.post("/jobs", data={"csrf": csrf, "kind": "global_attribution"})
            assert response.status_code == 403 and "CSRF" in response.text
    assert dash.jobs.list_jobs() == []


def test_oversize_and_malformed_forms_are_refused(dash: Dashboard) -> None:
    with dash.login(Role.ANALYST) as client:
        csrf = _csrf(client.get("/jobs").text)
        big = client.post(
            "/jobs",
            data={
                "csrf": csrf,
                "kind": "global_attribution",
                "params": "a=" + "x" * MAX_FORM_BYTES,
            },
        )
        assert big.status_code == 400 and "at most" in big.text
        binary = client.post(
            "/jobs",
            content=b"\xff\xfe\x00",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert binary.status_code == 400 and "malformed form" in binary.text
    assert dash.jobs.list_jobs() == []


def test_a_revoked_token_ends_its_session_and_logout_ends_it_too(dash: Dashboard) -> None:
    with dash.login(Role.ANALYST) as client:
        assert client.get("/").status_code == 200
        assert dash.access is not None
        token_id = dash.tokens[Role.ANALYST].split("_")[1]
        dash.access.revoke(token_id, now=NOW)
        response = client.get("/")
        assert response.status_code == 303 and response.headers["location"] == "/login"
    with dash.login(Role.VIEWER) as client:
        csrf = _csrf(client.get("/").text)
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
        assert client.get("/").status_code == 303


def test_an_unknown_release_or_job_is_a_404_that_names_it(dash: Dashboard) -> None:
    with dash.login(Role.VIEWER) as client:
        release = client.get("/releases/nosuchrelease")
        assert release.status_code == 404 and "nosuchrelease" in release.text
        job = client.get("/jobs/nosuchjob")
        assert job.status_code == 404 and "nosuchjob" in job.text


def test_hostile_text_in_a_release_is_escaped(dash: Dashboard) -> None:
    dash.save_release("rel-<script>alert(1)</script>", "<b>kind</b>")
    with dash.login(Role.VIEWER) as client:
        page = client.get("/releases")
        assert "<script>alert(1)</script>" not in page.text
        assert "&lt;script&gt;" in page.text and "<b>kind</b>" not in page.text


def test_sessions_expire_after_idling(tmp_path: Path) -> None:
    clock = [NOW]
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    access = AccessControl(store)
    _, token = access.issue("ana", Role.ANALYST, now=NOW)
    sessions = SessionStore(access, idle_s=60, max_age_s=600, clock=lambda: clock[0])
    session = sessions.open(token)
    clock[0] = NOW + timedelta(seconds=59)
    assert sessions.check(session.session_id) is session
    clock[0] = NOW + timedelta(seconds=59 + 61)
    assert sessions.check(session.session_id) is None and len(sessions) == 0
    again = sessions.open(token)
    for minutes in range(1, 12):  # busy, but past the absolute lifetime of 10 minutes
        clock[0] = NOW + timedelta(seconds=120 + 59 * minutes)
        alive = sessions.check(again.session_id)
    assert alive is None
    store.close()


def test_with_access_control_off_every_page_is_open_and_says_so(tmp_path: Path) -> None:
    d = Dashboard(f"sqlite:///{tmp_path / 'fedlens.db'}", open_access=True)
    try:
        with d.client() as client:
            page = client.get("/")
            assert page.status_code == 200 and "Access control is off" in page.text
            assert client.get("/login").status_code == 303
            response = client.post("/jobs", data={"kind": "global_attribution"})
            assert response.status_code == 303
        assert len(d.jobs.list_jobs()) == 1
    finally:
        d.close()


def test_the_dashboard_rate_limits_a_token_like_the_grpc_api(database_url: str) -> None:
    d = Dashboard(database_url, burst=5)
    try:
        assert d.access is not None
        with d.login(Role.VIEWER) as client:
            statuses = [client.get("/healthz").status_code for _ in range(10)]
            assert statuses == [200] * 10  # health is not metered
            codes = [client.get("/budgets").status_code for _ in range(8)]
        assert codes[:5] == [200] * 5 and 429 in codes[5:]  # a burst of 5, then 0.5/s
        assert any("over its rate limit" in r for r in d.refusals())
    finally:
        d.close()


def test_the_budgets_page_shows_what_queued_jobs_reserve(dash: Dashboard) -> None:
    def reserved_cells(page: str) -> list[float]:
        rows = re.findall(r"<tr><td>site-\d</td>(.*?)</tr>", page)
        return [float(re.findall(r"<td>([^<]*)</td>", row)[2]) for row in rows]

    with dash.login(Role.ANALYST) as client:
        assert reserved_cells(client.get("/budgets").text) == [0.0, 0.0]
        csrf = _csrf(client.get("/jobs").text)
        submitted = client.post(
            "/jobs",
            data={"csrf": csrf, "kind": "global_attribution", "params": "explain-epsilon=0.5"},
        )
        assert submitted.status_code == 303
        held = reserved_cells(client.get("/budgets").text)
        assert len(held) == 2 and all(0 < eps <= 0.5 + 1e-9 for eps in held), held


def test_a_session_ends_when_its_token_expires(tmp_path: Path) -> None:
    today = [NOW]
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    try:
        access = AccessControl(store, wall_clock=lambda: today[0])
        _, token = access.issue("ana", Role.ANALYST, now=NOW, expires_at=NOW + timedelta(hours=1))
        sessions = SessionStore(access, idle_s=7200, clock=lambda: today[0])
        session = sessions.open(token)
        today[0] = NOW + timedelta(minutes=59)
        assert sessions.check(session.session_id) is session
        today[0] = NOW + timedelta(minutes=60)
        assert sessions.check(session.session_id) is None
        with pytest.raises(AuthenticationError, match="expired"):
            sessions.open(token)
    finally:
        store.close()


@pytest.mark.parametrize("kind", [*PLOTTED, "hessian"])
def test_every_kind_of_release_renders_with_its_card_and_plots(dash: Dashboard, kind: str) -> None:
    """Each kind's release as its own post-processor makes it, stored and read back."""
    store_release(dash.store, real_release(kind, release_id=f"rel-{kind}"), now=NOW)
    with dash.login(Role.VIEWER) as client:
        page = client.get(f"/releases/rel-{kind}")
        assert page.status_code == 200, page.text
        text = page.text
        assert 'class="card"' in text and "Privacy cost" in text
        svgs = re.findall(r"<svg.*?</svg>", text, flags=re.S)
        for svg in svgs:
            ElementTree.fromstring(svg)
        if kind == "hessian":
            assert not svgs and "second-order factors" in text
        else:
            assert svgs, f"no plot for {kind}"
        listed = client.get(f"/releases?kind={kind}").text
        assert f"rel-{kind}"[:12] in listed
