"""An administrator's steps: a test PKI and an enrolled site, then ``fedlens server`` with TLS
answering ``fedlens query`` given the CA, and refusing a plaintext client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlens.cli import main
from server.deployment import free_port


def test_server_with_tls_answers_query_given_the_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls, keys = tmp_path / "tls", tmp_path / "keys"
    database = f"sqlite:///{tmp_path / 'fedlens.db'}"
    assert (
        main(["keys", "tls", "--out", str(tls), "--host", "localhost", "--host", "127.0.0.1"]) == 0
    )
    assert main(["keys", "identity", "--site-id", "site-1", "--out", str(keys)]) == 0
    enroll = ["keys", "enroll", "--site-id", "site-1", "--public-key", str(keys / "site-1.pub")]
    assert main([*enroll, "--database-url", database]) == 0
    capsys.readouterr()
    issue = ["admin", "token", "issue", "--name", "ana", "--role", "viewer", "--json"]
    assert main([*issue, "--database-url", database]) == 0
    token = json.loads(capsys.readouterr().out)["token"]

    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "fedlens.cli", "server", "--address", address]
    command += ["--database-url", database]
    command += ["--tls-cert", str(tls / "server.pem"), "--tls-key", str(tls / "server.key")]
    server = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        query = ["query", "releases", "--json", "--address", address, "--token", token]
        deadline = time.monotonic() + 60
        while main([*query, "--tls-ca", str(tls / "ca.pem")]) != 0:
            assert server.poll() is None, server.communicate()[0]
            assert time.monotonic() < deadline, capsys.readouterr().err
            time.sleep(0.3)
        assert json.loads(capsys.readouterr().out) == []

        assert main(query) == 2
        refused = " ".join(capsys.readouterr().err.split())
        assert f"no answer from the fedlens server at {address}" in refused
        assert "a server with TLS needs its CA certificate" in refused
    finally:
        server.terminate()
        output = server.communicate(timeout=10)[0]
    assert "(TLS)" in output
