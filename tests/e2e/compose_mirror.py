"""``docker/compose.yaml`` run as local processes: the same commands, environment and
arguments, with only what a single host forces substituted.

What a container gives and one host cannot, and what stands in for it:

- service names (``coordinator``, ``superlink``) and ``0.0.0.0`` become ``127.0.0.1``,
  and every port a service listens on becomes a free port (four SuperNodes cannot all
  listen on 9094 of one host);
- the PostgreSQL service becomes a database of the test session's server: its URL (a Unix
  socket there) replaces the coordinator's ``--database-url`` whole;
- named volumes become directories under ``root/volumes`` (shared where compose shares
  them), and each service gets its own home (``FLWR_HOME``) and ``/app`` under
  ``root/<service>``;
- the image's environment is read from ``docker/Dockerfile`` (its ``ENV`` lines), with
  the image's virtualenv replaced by the one running this code.

Compose's interpolation (``${VAR:-default}``, ``${VAR:?message}``, ``$$``) is applied
as compose applies it, to every string of the file. Each substitution must find what it
replaces, so an edit of compose.yaml that the mirror no longer matches fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from server.deployment import _alive, _descendants

__all__ = [
    "COMPOSE",
    "DOCKERFILE",
    "MIRRORED",
    "Mirror",
    "MirrorError",
    "Ports",
    "Service",
    "flag_value",
    "image_env",
    "interpolate",
    "load_compose",
    "plan",
    "port_of",
    "run_config_of",
]

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
SITES = ("site-0", "site-1", "site-2", "site-3")
MIRRORED = ("coordinator", "superlink", *SITES, "job")  # postgres: the test's server
IMAGE_VENV = "/opt/fedlens/venv"
IMAGE_HOME = "/home/fedlens"
DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOOPBACK = "127.0.0.1"


class MirrorError(AssertionError):
    """compose.yaml no longer matches the mirror, or a mirrored process failed."""


# -- compose.yaml --------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """``value`` with compose's variable interpolation applied, variables from ``env``.

    ``$$`` is a literal ``$``; ``${VAR:-default}`` (``-``: only if unset) and
    ``${VAR:?message}`` (``?``: only if unset) as in compose; an unset ``$VAR`` is empty.
    """

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op is not None and op.endswith("-") and missing:
            return arg
        if op is not None and op.endswith("?") and missing:
            raise MirrorError(f"compose refuses to start: {name}: {arg}")
        return current or ""

    return _VARIABLE.sub(replace, value)


def _interpolate_all(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_all(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_all(item, env) for key, item in node.items()}
    return node


def load_compose(env: Mapping[str, str], path: Path = COMPOSE) -> dict[str, Any]:
    """compose.yaml parsed (YAML merge keys resolved) and interpolated with ``env``."""
    raw = yaml.safe_load(path.read_text())
    loaded: dict[str, Any] = _interpolate_all(raw, env)
    return loaded


def image_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """The ``ENV`` instructions of the Dockerfile, in order (later ones see earlier ones)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("ENV "):
            continue
        for pair in line[4:].split():
            name, sep, value = pair.partition("=")
            if not sep:
                raise MirrorError(f"Dockerfile: ENV {pair!r} is not NAME=value")
            env[name] = value
    return env


def flag_value(command: Sequence[str], flag: str) -> str:
    """The argument after ``flag`` in ``command``."""
    if command.count(flag) != 1 or command.index(flag) + 1 >= len(command):
        raise MirrorError(f"expected one {flag} VALUE in {list(command)}")
    return command[command.index(flag) + 1]


def port_of(address: str) -> int:
    """The port of ``host:port``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise MirrorError(f"{address!r} is not host:port")
    return int(port)


def run_config_of(script: str) -> str:
    """The ``--run-config '...'`` of the job's ``flwr run`` line."""
    found = re.findall(r"--run-config '([^']*)'", script)
    if len(found) != 1:
        raise MirrorError("the job's script has no single --run-config '...'")
    return str(found[0])


# -- the plan: each service as a local process ----------------------------------------


@dataclass(frozen=True)
class Ports:
    """The host ports standing in for the ports the services listen on."""

    coordinator: int
    dashboard: int
    superlink: int
    sites: Mapping[str, int]


@dataclass(frozen=True)
class Service:
    """One compose service as a local process."""

    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    healthcheck: list[str] | None = None
    health_timeout_s: float = 5.0
    health_interval_s: float = 2.0
    health_retries: int = 10
    depends_on: tuple[str, ...] = ()


def _seconds(value: object) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(value))
    if match is None:
        raise MirrorError(f"duration {value!r}: expected e.g. 5s")
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match[2]]


class _Rewriter:
    """Substitutions for one service: each ``required`` one must match somewhere."""

    def __init__(self, service: str, required: Mapping[str, str], optional: Mapping[str, str]):
        self.service = service
        self.required = dict(required)
        self.replacements = {**required, **optional}
        self.used: set[str] = set()

    def __call__(self, value: str) -> str:
        for old, new in self.replacements.items():
            if old in value:
                self.used.add(old)
                value = value.replace(old, new)
        return value

    def check(self) -> None:
        unused = sorted(set(self.required) - self.used)
        if unused:
            raise MirrorError(f"service {self.service}: nothing in compose.yaml holds {unused}")


def _set_flag(command: list[str], flag: str, value: str) -> None:
    flag_value(command, flag)
    command[command.index(flag) + 1] = value


def plan(
    compose: Mapping[str, Any],
    *,
    root: Path,
    ports: Ports,
    database_url: str,
    image: Mapping[str, str] | None = None,
) -> dict[str, Service]:
    """Every mirrored service of ``compose`` (interpolated) as a process under ``root``."""
    services: Mapping[str, Any] = compose["services"]
    missing = [name for name in (*MIRRORED, "postgres") if name not in services]
    if missing:
        raise MirrorError(f"compose.yaml has no service {missing}")
    coordinator_cmd = services["coordinator"]["command"]
    link_cmd = services["superlink"]["command"]
    coordinator_port = port_of(flag_value(coordinator_cmd, "--address"))
    dashboard_port = port_of(flag_value(coordinator_cmd, "--dashboard"))
    link_port = int(flag_value(link_cmd, "--port"))
    # Service names resolve to the host's loopback, with the port standing in.
    names = {
        f"coordinator:{coordinator_port}": f"{LOOPBACK}:{ports.coordinator}",
        f"superlink:{link_port}": f"{LOOPBACK}:{ports.superlink}",
    }
    volumes = root / "volumes"
    image = image_env() if image is None else image
    planned: dict[str, Service] = {}
    for name in MIRRORED:
        spec = services[name]
        command = [str(arg) for arg in spec["command"]]
        home = root / name / "home"
        app = root / name / "app"
        own: dict[str, str] = {}  # must match: this service's own listening addresses
        if name == "coordinator":
            own = {
                f"0.0.0.0:{coordinator_port}": f"{LOOPBACK}:{ports.coordinator}",
                f"0.0.0.0:{dashboard_port}": f"{LOOPBACK}:{ports.dashboard}",
                f"127.0.0.1:{coordinator_port}": f"{LOOPBACK}:{ports.coordinator}",
            }
            _set_flag(command, "--database-url", database_url)
        elif name == "superlink":
            _set_flag(command, "--host", LOOPBACK)
            _set_flag(command, "--port", str(ports.superlink))
            own = {f"127.0.0.1:{link_port}": f"{LOOPBACK}:{ports.superlink}"}
        elif name in SITES:
            site_port = int(flag_value(command, "--port"))
            if flag_value(command, "--host") != LOOPBACK:
                raise MirrorError(f"{name}: its runtime API should stay on {LOOPBACK}")
            _set_flag(command, "--port", str(ports.sites[name]))
            own = {f"127.0.0.1:{site_port}": f"{LOOPBACK}:{ports.sites[name]}"}
        elif name == "job":
            own = {"/app": str(app)}  # the image's app directory
        # Service names, and volumes at their mount points, wherever they appear.
        optional = dict(names)
        for volume in spec.get("volumes") or []:
            source, _, target = str(volume).partition(":")
            directory = volumes / source
            directory.mkdir(parents=True, exist_ok=True)
            optional[target] = str(directory)
        rewrite = _Rewriter(name, own, optional)
        command = [rewrite(arg) for arg in command]
        env = {
            "PATH": DOCKER_PATH,
            "HOME": str(home),
            "HOSTNAME": name,
            "LANG": "C.UTF-8",  # python:3.11-slim
        }
        for key, value in image.items():
            value = value.replace(IMAGE_VENV, sys.prefix).replace(IMAGE_HOME, str(home))
            env[key] = interpolate(value, env)
        for key, value in (spec.get("environment") or {}).items():
            env[str(key)] = rewrite(str(value))
        health = spec.get("healthcheck")
        test: list[str] | None = None
        if health:
            raw = [str(arg) for arg in health["test"]]
            if raw[0] == "CMD":
                test = [rewrite(arg) for arg in raw[1:]]
            elif raw[0] == "CMD-SHELL":
                test = ["sh", "-c", rewrite(" ".join(raw[1:]))]
            else:
                raise MirrorError(f"{name}: healthcheck test {raw[0]!r} is not CMD/CMD-SHELL")
        rewrite.check()
        for directory in (home, Path(env.get("FLWR_HOME", home)), app):
            directory.mkdir(parents=True, exist_ok=True)
        planned[name] = Service(
            name=name,
            command=command,
            env=env,
            cwd=home,
            healthcheck=test,
            health_timeout_s=_seconds(health.get("timeout", "30s")) if health else 30.0,
            health_interval_s=_seconds(health.get("interval", "30s")) if health else 30.0,
            health_retries=int(health.get("retries", 3)) if health else 3,
            depends_on=tuple(spec.get("depends_on") or ()),
        )
    return planned


# -- running the plan ---------------------------------------------------------------


@dataclass
class _Running:
    service: Service
    proc: subprocess.Popen[bytes]
    log: Path
    file: IO[bytes]


@dataclass
class Mirror:
    """Starts planned services as processes (logs under ``logs``) and stops them all."""

    services: Mapping[str, Service]
    logs: Path
    running: dict[str, _Running] = field(default_factory=dict)

    def __enter__(self) -> Mirror:
        self.logs.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tail(self, name: str, lines: int = 60) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return f"(no log for {name})"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text)

    def start(self, name: str) -> None:
        service = self.services[name]
        log = self.logs / f"{name}.log"
        file = log.open("wb")
        proc = subprocess.Popen(
            service.command,
            stdout=file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=service.env,
            cwd=service.cwd,
        )
        self.running[name] = _Running(service, proc, log, file)

    def wait_healthy(self, name: str, *, floor_s: float = 120.0) -> None:
        """Run the service's healthcheck until it passes, as compose would.

        Compose gives up after ``retries`` failures ``interval`` apart; on a shared
        machine the mirror allows at least ``floor_s``. A process that exits fails at once.
        """
        running = self.running[name]
        service = running.service
        if service.healthcheck is None:
            raise MirrorError(f"{name} has no healthcheck")
        budget = max(service.health_interval_s * service.health_retries, floor_s)
        deadline = time.monotonic() + budget
        last = ""
        while True:
            if running.proc.poll() is not None:
                raise MirrorError(
                    f"{name} exited with {running.proc.returncode} before it was healthy\n"
                    + self.tail(name)
                )
            try:
                check = subprocess.run(
                    service.healthcheck,
                    env=service.env,
                    cwd=service.cwd,
                    capture_output=True,
                    text=True,
                    timeout=max(service.health_timeout_s, 15.0),
                    check=False,
                )
                if check.returncode == 0:
                    return
                last = (check.stdout + check.stderr).strip()[-500:]
            except subprocess.TimeoutExpired:
                last = "the healthcheck timed out"
            if time.monotonic() > deadline:
                raise MirrorError(
                    f"{name} not healthy within {budget:.0f}s; last check: {last}\n"
                    + self.tail(name)
                )
            time.sleep(service.health_interval_s)

    def run(self, name: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        """Run a one-shot service to its end; its output is also in its log."""
        self.start(name)
        running = self.running[name]
        try:
            running.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise MirrorError(
                f"{name} did not finish within {timeout_s:.0f}s\n" + self.tail(name)
            ) from None
        running.file.flush()
        output = running.log.read_text(errors="replace")
        return subprocess.CompletedProcess(
            running.service.command, running.proc.returncode, output, ""
        )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every process (dependents first), then SIGKILL whatever remains,
        including the process trees Flower detached (SuperExec, ServerApp, ClientApps)."""
        tree: set[int] = set()
        for running in self.running.values():
            tree |= _descendants(running.proc.pid)
        order = list(reversed(self.running))
        for name in order:
            proc = self.running[name].proc
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name in order:
            proc = self.running[name].proc
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
            time.sleep(0.2)
        for pid in tree:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for running in self.running.values():
            running.file.close()
        self.running.clear()
