"""A Flower deployment on one machine: a SuperLink and one SuperNode per site, as processes.

This is what ``docker/compose.yaml`` runs in containers, run as local processes instead:
the real Flower runtime (``flower-superlink``, ``flower-supernode``, one ``flwr-clientapp``
process per message), with per-run dependency installation turned off because fedlens
is already installed. Everything Flower writes goes under ``workdir`` (``FLWR_HOME``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

from fedlens.errors import ConfigurationError, FedlensError

__all__ = ["LocalFederation", "RunOutcome", "SiteSpec", "free_port", "toml_value"]

logger = logging.getLogger(__name__)

CONNECTION = "fedlens-local"


def free_port() -> int:
    """A currently free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def toml_value(value: object) -> str:
    """``value`` as a TOML literal, as ``--run-config`` and ``--node-config`` expect."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _pairs(config: Mapping[str, object]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


@dataclass(frozen=True)
class SiteSpec:
    """One SuperNode: its ``--node-config`` (partition, state directory, budget)."""

    name: str
    node_config: Mapping[str, object]


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    status: str
    details: str

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


class LocalFederation:
    """Start, use and stop a SuperLink and SuperNodes under ``workdir``.

    Use as a context manager; leaving it terminates every process it started, including
    the ClientApp processes Flower spawned.
    """

    def __init__(self, workdir: Path, sites: Sequence[SiteSpec]) -> None:
        if len(sites) < 1:
            raise ConfigurationError("a federation needs at least one site")
        self.workdir = workdir
        self.sites = tuple(sites)
        self.logs = workdir / "logs"
        self.flwr_home = workdir / "flwr_home"
        self.app_dir = workdir / "app"
        self.bin = Path(sys.executable).parent
        self.link_port = free_port()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []
        self.env = dict(os.environ)
        self.env.update(
            {
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                # Flower starts flwr-serverapp / flwr-clientapp by name.
                "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
            }
        )

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        for path in (self.logs, self.flwr_home, self.app_dir):
            path.mkdir(parents=True, exist_ok=True)
        self._write_app()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )
        self._spawn(
            "superlink",
            [
                self._tool("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.link_port),
            ],
        )
        self._wait_healthy(timeout_s)
        for site in self.sites:
            self._spawn(
                site.name,
                [
                    self._tool("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    _pairs(site.node_config),
                ],
            )
        logger.info("SuperLink on port %d with %d SuperNodes", self.link_port, len(self.sites))

    def run(
        self,
        run_config: Mapping[str, object],
        *,
        timeout_s: float = 900.0,
        on_line: Callable[[str], None] | None = None,
    ) -> RunOutcome:
        """Submit the fedlens Flower app with ``run_config`` and wait until it finishes."""
        cmd = [
            self._tool("flwr"),
            "run",
            str(self.app_dir),
            CONNECTION,
            "--stream",
            "--run-config",
            _pairs(run_config),
        ]
        stream_log = (self.logs / "run.log").open("w")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env
        )
        run_ids: list[int] = []

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                stream_log.write(line)
                stream_log.flush()
                if "started run" in line:
                    digits = [w for w in line.split() if w.isdigit()]
                    if digits:
                        run_ids.append(int(digits[-1]))
                if on_line is not None:
                    on_line(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            if run_ids:
                self.flwr("stop", str(run_ids[0]), CONNECTION)
            proc.terminate()
            proc.wait(10)
            raise FedlensError(
                f"the Flower run did not finish within {timeout_s:.0f}s; logs in {self.logs}"
            ) from None
        finally:
            reader.join(5)
            stream_log.close()
        if not run_ids:
            raise FedlensError(f"the Flower run was not accepted; see {self.logs / 'run.log'}")
        info = json.loads(
            self.flwr("ls", CONNECTION, "--run-id", str(run_ids[0]), "--format", "json")
        )
        if not info.get("success"):
            raise FedlensError(f"cannot read the status of run {run_ids[0]}: {info}")
        run = info["runs"][0]
        return RunOutcome(
            run_id=run_ids[0], status=str(run["status"]), details=str(run.get("status-details"))
        )

    def flwr(self, *args: str) -> str:
        done = subprocess.run(
            [self._tool("flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return done.stdout

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate the SuperNodes, then the SuperLink, then any process they spawned."""
        tree: set[int] = set()
        for proc in self._procs.values():
            tree |= _descendants(proc.pid)
        order = [n for n in self._procs if n != "superlink"] + ["superlink"]
        procs = [self._procs[n] for n in order if n in self._procs]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Flower's executors follow their parent within seconds; anything left is killed.
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.2)
        for pid in tree:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._procs.clear()
        for f in self._files:
            f.close()
        self._files.clear()

    # -- helpers -----------------------------------------------------------------------

    def _tool(self, name: str) -> str:
        path = self.bin / name
        if path.exists():
            return str(path)
        found = shutil.which(name)
        if found is None:
            raise ConfigurationError(f"{name} not found; is flwr installed in this environment?")
        return found

    def _write_app(self) -> None:
        source = resources.files("server") / "flower_project" / "pyproject.toml"
        (self.app_dir / "pyproject.toml").write_text(source.read_text())

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        self._procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir
        )

    def _wait_healthy(self, timeout_s: float) -> None:
        url = f"http://127.0.0.1:{self.link_port}/health"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._procs["superlink"].poll() is not None:
                raise FedlensError(f"flower-superlink exited; see {self.logs / 'superlink.log'}")
            try:
                with urllib.request.urlopen(url, timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise FedlensError(f"the SuperLink did not become healthy in {timeout_s:.0f}s")


def _children() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table.setdefault(ppid, []).append(int(entry.name))
    return table


def _descendants(pid: int) -> set[int]:
    """Every descendant process of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    if not Path("/proc").is_dir():
        return set()
    table, out, stack = _children(), set(), [pid]
    while stack:
        for child in table.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
