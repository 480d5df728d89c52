"""An analyst's job end to end with the real Flower runtime: train once, then submit
questions through the Query service and through the dashboard in headless Chromium, let
the job runner answer them with explain-only Flower runs, and get an identical question
answered from the stored release at no privacy cost.

The browser test saves screenshots of each step under ``test-artifacts/dashboard/``
(``FEDLENS_TEST_ARTIFACTS`` moves them).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from selenium.webdriver import Chrome, ChromeOptions, ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from fedlens.jobs import Job, JobRequest, JobState
from fedlens.query_client import QueryClient
from fedlens.runconfig import RunConfig
from server.access import AccessControl, Role
from server.aggregation import Aggregator, QueryHandler
from server.dashboard import start_dashboard
from server.deployment import CONNECTION, LocalFederation, SiteSpec
from server.grpc_server import RunningServer, serve
from server.job_runner import FlowerLauncher, JobRunner
from server.jobs import JobQueue
from server.storage import Store
from tests.browser import find_or_install, launch_flags

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ARTIFACTS = Path(
    os.environ.get("FEDLENS_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)


def _wait(client: QueryClient, job_id: str, timeout_s: float) -> Job:
    deadline = time.monotonic() + timeout_s
    job = client.get_job(job_id)
    while not job.state.finished and time.monotonic() < deadline:
        time.sleep(1.0)
        job = client.get_job(job_id)
    return job


@dataclass
class Service:
    """A coordinator (gRPC, store, access control, job queue) and a trained federation."""

    store: Store
    access: AccessControl
    jobs: JobQueue
    server: RunningServer
    federation: LocalFederation
    tokens: dict[Role, str]

    def runner(self) -> JobRunner:
        """The runner `fedlens server --flower-connection` starts: flwr run on the SuperLink."""
        launcher = FlowerLauncher(
            self.federation.app_dir, CONNECTION, timeout_s=600, env=self.federation.env
        )
        return JobRunner(
            self.jobs,
            launcher,
            deployment={"aggregator": self.server.address, "phase-timeout": 60.0},
            poll_s=0.5,
        )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp_path = tmp_path_factory.mktemp("jobs")
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    access = AccessControl(store)
    aggregator = Aggregator(store)
    jobs = JobQueue(aggregator)
    server = serve(aggregator, QueryHandler(store), access=access, jobs=jobs)
    tokens = {role: access.issue(f"{role.name.lower()}-1", role, now=NOW)[1] for role in Role}
    sites = [
        SiteSpec(
            name=f"site-{i}",
            node_config={
                "partition-id": i,
                "num-partitions": 2,
                "state-dir": str(tmp_path / f"site-{i}"),
                "epsilon": 10.0,
                "delta": 1e-5,
                "threads": 1,
            },
        )
        for i in range(2)
    ]
    training = RunConfig(
        dataset="breast_cancer",
        num_sites=2,
        rounds=1,
        explain_kind="feature_stats",
        aggregator=server.address,
        out_dir=str(tmp_path / "out"),
        phase_timeout_s=60.0,
    )
    federation = LocalFederation(tmp_path / "flower", sites)
    # The ServerApp's token, from its environment (never the run configuration).
    federation.env["FEDLENS_TOKEN"] = tokens[Role.ADMIN]
    try:
        with federation:
            trained = federation.run(training.to_flower(), timeout_s=600)
            summary = json.loads((tmp_path / "out" / "summary.json").read_text())
            assert trained.completed, (trained, summary)
            yield Service(store, access, jobs, server, federation, tokens)
    finally:
        server.stop()
        store.close()


def test_a_job_runs_through_flower_and_its_twin_is_answered_from_cache(service: Service) -> None:
    jobs, store = service.jobs, service.store
    audited_before = len(store.audit_entries())
    with QueryClient(service.server.address, token=service.tokens[Role.ANALYST]) as client:
        before = {m.site_id: len(m.events) for m in client.list_budgets()}
        assert before == {"site-0": 2, "site-1": 2}  # one training round, one release
        runner = service.runner()
        question = JobRequest("global_attribution", {"ig-steps": "8"})
        job = client.submit_job(question)
        assert job.state is JobState.QUEUED and job.submitted_by.startswith("analyst-1 (")
        runner.start()
        done = _wait(client, job.job_id, 600)
        runner.stop(timeout_s=60)
        assert done.state is JobState.DONE, done
        assert not done.from_cache
        release = client.get_release(done.release_id)
        assert release.kind == "global_attribution"
        assert sorted(c.site_id for c in release.costs) == ["site-0", "site-1"]
        after = {m.site_id: m for m in client.list_budgets()}
        assert {s: len(m.events) for s, m in after.items()} == {"site-0": 3, "site-1": 3}

        twin = client.submit_job(JobRequest("global_attribution", {"ig-steps": "8"}))
        assert twin.state is JobState.DONE and twin.from_cache
        assert twin.release_id == done.release_id
        assert jobs.claim_next() is None  # nothing left to run
        assert {m.site_id: m.events for m in client.list_budgets()} == {
            s: m.events for s, m in after.items()
        }
    # The job's audit trail: queued, running, done; the twin answered from cache.
    trail = [
        (e.action, e.outcome) for e in store.audit_entries()[audited_before:] if "job" in e.action
    ]
    assert trail == [
        ("submit_job", "queued"),
        ("run_job", "running"),
        ("run_job", "done"),
        ("submit_job", "cached"),
    ]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless Chromium driven through chromedriver, installed by tests/browser.py."""
    binaries = find_or_install()
    options = ChromeOptions()
    options.binary_location = str(binaries.browser)
    for flag in launch_flags(tmp_path_factory.mktemp("chromium-profile")):
        options.add_argument(flag)
    driver = Chrome(service=ChromeService(str(binaries.driver)), options=options)
    driver.set_window_size(1280, 1600)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: WebDriver, name: str) -> Path:
    folder = ARTIFACTS / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    # The whole page, not only the window: size the window to the document first.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(900, min(int(height), 6000)))
    assert driver.save_screenshot(str(path)), path
    return path


def _login(driver: WebDriver, base: str, token: str) -> None:
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    # Logged in (the navigation names the holder) or refused (the form shows why).
    WebDriverWait(driver, 60).until(
        lambda d: d.find_elements(By.ID, "who") or d.find_elements(By.ID, "error")
    )


def _follow(driver: WebDriver, by: str, what: str, *then: str) -> None:
    """Click a link or button and wait for an element of the next page (ids ``then``)."""
    driver.find_element(by, what).click()
    WebDriverWait(driver, 60).until(lambda d: any(d.find_elements(By.ID, i) for i in then))


def test_an_analyst_logs_in_submits_a_job_and_reads_the_answer_in_a_browser(
    service: Service, browser: WebDriver
) -> None:
    dashboard = start_dashboard(QueryHandler(service.store), service.jobs, service.access)
    runner = service.runner()
    runner.start()
    base = dashboard.url
    try:
        # Not logged in: every page leads to the login form; a wrong token is refused.
        browser.get(f"{base}/jobs")
        assert browser.current_url == f"{base}/login"
        _login(browser, base, service.tokens[Role.VIEWER] + "x")
        assert "unknown token" in browser.find_element(By.ID, "error").text
        _shot(browser, "01-login-refused")

        # A viewer reads releases and budgets but gets no job form.
        _login(browser, base, service.tokens[Role.VIEWER])
        assert "viewer-1" in browser.find_element(By.ID, "who").text
        kinds = [
            td.text for td in browser.find_elements(By.CSS_SELECTOR, "#releases td:nth-child(2)")
        ]
        assert "feature_stats" in kinds
        _shot(browser, "02-overview-viewer")
        _follow(browser, By.LINK_TEXT, "Jobs", "viewer-note", "submit-job")
        assert browser.find_elements(By.ID, "viewer-note")
        assert not browser.find_elements(By.ID, "submit-job")
        _follow(browser, By.ID, "logout", "token")
        assert browser.current_url == f"{base}/login"

        # An analyst asks a question through the form and follows the job to its end.
        _login(browser, base, service.tokens[Role.ANALYST])
        _follow(browser, By.LINK_TEXT, "Jobs", "submit-job")
        Select(browser.find_element(By.ID, "job-kind")).select_by_value("global_attribution")
        browser.find_element(By.ID, "job-params").send_keys("ig-steps=16\nexplain-epsilon=0.5")
        _shot(browser, "03-job-form")
        _follow(browser, By.ID, "submit", "job-state", "error")
        refusal = browser.find_elements(By.ID, "error")
        assert not refusal, refusal[0].text
        job_id = browser.current_url.rsplit("/", 1)[-1]
        # The page refreshes itself every 2 s while the job is queued or running.
        WebDriverWait(browser, 600, poll_frequency=1).until(
            lambda d: (
                d.find_element(By.ID, "job-state").text.split(" ")[0]
                in ("done", "refused", "failed")
            )
        )
        state = browser.find_element(By.ID, "job-state").text
        assert state.startswith("done"), (state, service.jobs.get(job_id))
        _shot(browser, "04-job-done")

        # The answer: the release page with its plot and plain-language card.
        _follow(browser, By.ID, "release-link", "release")
        assert "global_attribution" in browser.find_element(By.TAG_NAME, "h1").text
        assert browser.find_elements(By.CSS_SELECTOR, "figure svg")
        card = browser.find_element(By.CSS_SELECTOR, "#release p.card").text
        assert "records" in card
        release_id = browser.current_url.rsplit("/", 1)[-1]
        release = service.store.get_release(release_id)
        assert release.params.get("ig-steps") in (None, "16") and release.kind == (
            "global_attribution"
        )
        _shot(browser, "05-release")

        _follow(browser, By.LINK_TEXT, "Budgets", "budgets")
        sites = [
            td.text for td in browser.find_elements(By.CSS_SELECTOR, "#budgets td:first-child")
        ]
        assert sites == ["site-0", "site-1"]
        assert browser.find_elements(By.CSS_SELECTOR, "figure svg")
        _shot(browser, "06-budgets")
    finally:
        runner.stop(timeout_s=60)
        dashboard.stop()
    # The job was submitted in the analyst's name and written to the audit log.
    job = service.jobs.get(job_id)
    assert job.state is JobState.DONE and job.submitted_by.startswith("analyst-1 (")
    trail = [
        (e.action, e.outcome, e.actor.split(" ")[0])
        for e in service.store.audit_entries(round_id=f"job-{job_id}")
    ]
    assert trail == [
        ("submit_job", "queued", "analyst-1"),
        ("run_job", "running", trail[1][2]),
        ("run_job", "done", trail[2][2]),
    ]
