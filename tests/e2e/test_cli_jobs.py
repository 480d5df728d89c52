"""``fedlens server --flower-connection`` runs queued jobs: here on a connection that does
not exist, so the job ends ``failed`` with what ``flwr`` said, and the server goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from fedlens.datasets import load_dataset
from fedlens.errors import ProtocolError
from fedlens.jobs import JobRequest, JobState
from fedlens.models import build_model
from fedlens.query_client import QueryClient
from fedlens.types import SiteLedger
from server.deployment import free_port
from server.storage import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_server_runs_queued_jobs_through_flwr(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fedlens.db'}"
    store = Store(url)
    pre = load_dataset("breast_cancer").preprocessor
    store.save_model(
        dataset="breast_cancer",
        model="logistic",
        state=build_model("logistic", pre.dimension).state_dict(),
        now=NOW,
        params={"seed": "0", "rounds": "1"},
    )
    for site in ("site-0", "site-1"):
        store.mirror_ledger(SiteLedger(site, 4.0, 1e-5, ()), now=NOW)
    store.close()
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
    args = ["--auth", "off", "--database-url", url, "--address", address]
    server = subprocess.Popen(
        [sys.executable, "-m", "fedlens.cli", "server", *args, "--flower-connection", "nowhere"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with QueryClient(address, timeout_s=5) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    job = client.submit_job(JobRequest("feature_stats"))
                    break
                except ProtocolError:  # not listening yet
                    assert time.monotonic() < deadline and server.poll() is None
                    time.sleep(0.5)
            while not job.state.finished and time.monotonic() < deadline:
                time.sleep(0.5)
                job = client.get_job(job.job_id)
        assert job.state is JobState.FAILED, job
        assert "flwr run exited with" in job.reason and "ended without reporting" in job.reason
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out
    assert "running queued jobs through Flower (nowhere" in out.replace("\n", "")
