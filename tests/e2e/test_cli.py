"""The commands a newcomer types: ``fedlens demo``, then ``fedlens server``, a token from
``fedlens admin token``, and ``fedlens query`` reading the stored release back through the
gRPC Query service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from server.deployment import free_port

FEDLENS = [sys.executable, "-m", "fedlens.cli"]


def run(
    *args: str, cwd: Path, timeout: float = 60, token: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FEDLENS_TOKEN"}
    return subprocess.run(
        [*FEDLENS, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**env, "FEDLENS_TOKEN": token} if token else env,
    )


def test_demo_then_query_through_the_server(tmp_path: Path) -> None:
    demo = run(
        "demo",
        "--dataset",
        "breast_cancer",
        "--sites",
        "2",
        "--rounds",
        "1",
        "--workdir",
        "work",
        cwd=tmp_path,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    for words in ("test accuracy of the global model", "privacy cost per site", "site-1"):
        assert words in demo.stdout
    database = f"sqlite:///{tmp_path / 'work' / 'fedlens.db'}"
    assert database in demo.stdout.replace("\n", "")

    issued = run(
        "admin",
        "token",
        "issue",
        "--name",
        "ana",
        "--role",
        "viewer",
        "--json",
        "--database-url",
        database,
        cwd=tmp_path,
    )
    assert issued.returncode == 0, issued.stderr
    token = json.loads(issued.stdout)["token"]

    port = free_port()
    server = subprocess.Popen(
        [*FEDLENS, "server", "--address", f"127.0.0.1:{port}", "--database-url", database],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "FEDLENS_AGGREGATOR_ADDRESS": f"127.0.0.1:{port}"},
    )
    try:
        deadline = time.monotonic() + 30
        address = ("--address", f"127.0.0.1:{port}")
        while True:
            listed = run("query", "releases", "--json", *address, cwd=tmp_path, token=token)
            if listed.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert listed.returncode == 0, listed.stderr
        # The server checks tokens by default: without one, nothing is read.
        anonymous = run("query", "releases", *address, cwd=tmp_path)
        assert anonymous.returncode == 2
        assert "needs a token" in anonymous.stderr
        releases = json.loads(listed.stdout)
        assert len(releases) == 1
        assert releases[0]["kind"] == "global_attribution"
        assert releases[0]["num_sites"] == 2

        shown = run(
            "query",
            "show",
            releases[0]["release_id"],
            "--json",
            "--address",
            f"127.0.0.1:{port}",
            cwd=tmp_path,
            token=token,
        )
        assert shown.returncode == 0, shown.stderr
        release = json.loads(shown.stdout)
        assert len(release["values"]) == 30  # breast_cancer's 30 features
        assert all(c["epsilon_total"] <= 4.0 for c in release["costs"])

        text = run(
            "query",
            "show",
            releases[0]["release_id"],
            "--address",
            f"127.0.0.1:{port}",
            cwd=tmp_path,
            token=token,
        )
        assert text.returncode == 0, text.stderr
        assert "carries privacy noise with standard deviation about" in " ".join(
            text.stdout.split()
        )
        budgets = run("query", "budgets", "--json", *address, cwd=tmp_path, token=token)
        assert budgets.returncode == 0, budgets.stderr
        mirrored = json.loads(budgets.stdout)
        assert sorted(b["site_id"] for b in mirrored) == ["site-0", "site-1"]
        assert all(0 < b["epsilon_spent"] <= b["budget_epsilon"] for b in mirrored)

        missing = run("query", "show", "nope", *address, cwd=tmp_path, token=token)
        assert missing.returncode == 2
        assert "no release 'nope'" in missing.stderr
    finally:
        server.terminate()
        server.wait(10)
