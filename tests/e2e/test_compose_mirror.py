"""docker/compose.yaml kept honest without Docker: its services' own command lines,
environment and healthchecks run as local processes (:mod:`tests.e2e.compose_mirror`),
and its structure is checked against what that mirror assumes."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from flwr.common.config import parse_config_args

from server.deployment import free_port
from tests.e2e.compose_mirror import (
    MIRRORED,
    Mirror,
    MirrorError,
    Ports,
    flag_value,
    image_env,
    interpolate,
    load_compose,
    plan,
    port_of,
    run_config_of,
)
from tests.postgres_server import PostgresDatabases

TOKEN_ENV = {"FEDLENS_ADMIN_TOKEN": "fl_0123456789abcdef_" + "0" * 64}


def _sites(services: dict[str, Any]) -> dict[str, list[str]]:
    """The services that run a SuperNode, with their commands."""
    return {
        name: [str(arg) for arg in spec["command"]]
        for name, spec in services.items()
        if (spec.get("command") or [""])[0] == "flower-supernode"
    }


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$$FLWR_HOME ${SET} $SET", env) == "$FLWR_HOME x x"
    assert interpolate("${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:-d}", env) == "d d  x"
    with pytest.raises(MirrorError, match="UNSET: set it"):
        interpolate("${UNSET:?set it}", env)
    with pytest.raises(MirrorError, match="EMPTY"):
        interpolate("${EMPTY:?set it}", env)
    # Compose refuses to start without the admin token.
    with pytest.raises(MirrorError, match="FEDLENS_ADMIN_TOKEN"):
        load_compose({})


def test_compose_has_the_structure_the_mirror_assumes(tmp_path: Path) -> None:
    compose = load_compose(TOKEN_ENV)
    services = compose["services"]
    for name in (*MIRRORED, "postgres"):
        assert name in services, name
    for name in MIRRORED:
        command = services[name]["command"]
        assert isinstance(command, list), name
        assert all(isinstance(arg, str) for arg in command), name

    # Four sites, partitions 0..3 of 4, each with its own name, state volume and healthcheck.
    sites = _sites(services)
    assert sorted(sites) == ["site-0", "site-1", "site-2", "site-3"]
    configs = {
        name: parse_config_args([flag_value(c, "--node-config")]) for name, c in sites.items()
    }
    assert sorted(c["partition-id"] for c in configs.values()) == [0, 1, 2, 3]
    assert {c["num-partitions"] for c in configs.values()} == {len(sites)}
    assert {name: c["site-name"] for name, c in configs.items()} == {n: n for n in sites}
    state_volumes = [tuple(services[name]["volumes"]) for name in sites]
    assert len(set(state_volumes)) == len(sites)

    link = services["superlink"]["command"]
    for command in sites.values():
        assert flag_value(command, "--superlink") == f"superlink:{flag_value(link, '--port')}"

    # The job's run: one partition per site, the coordinator's address as aggregator,
    # its output in the volume the SuperLink (which runs the ServerApp) writes to.
    job = services["job"]
    assert job["command"][:2] == ["sh", "-euc"]
    run = parse_config_args([run_config_of(job["command"][2])])
    assert run["num-sites"] == len(sites)
    coordinator = services["coordinator"]
    address = flag_value(coordinator["command"], "--address")
    assert run["aggregator"] == f"coordinator:{port_of(address)}"
    assert coordinator["environment"]["FEDLENS_AGGREGATOR_ADDRESS"] == run["aggregator"]
    out = [v for v in job["volumes"] if v.endswith(":" + str(run["out-dir"]))]
    assert out and out[0] in services["superlink"]["volumes"]
    assert f"superlink:{flag_value(link, '--port')}" in job["command"][2]
    assert set(job["depends_on"]) == {"coordinator", "superlink", *sites}
    assert {d["condition"] for d in job["depends_on"].values()} == {"service_healthy"}

    # Published on the host's loopback only, the gRPC port and the dashboard's.
    dashboard = flag_value(coordinator["command"], "--dashboard")
    published = {p.rsplit(":", 1)[1]: p for p in coordinator["ports"]}
    assert published[str(port_of(dashboard))].startswith("127.0.0.1:")
    assert published[str(port_of(address))].startswith("127.0.0.1:")
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))

    # And every substitution the mirror makes finds what it replaces.
    ports = Ports(1, 2, 3, {name: 10 + i for i, name in enumerate(sites)})
    planned = plan(compose, root=tmp_path, ports=ports, database_url="postgresql+psycopg://x")
    coordinator_cmd = planned["coordinator"].command
    assert flag_value(coordinator_cmd, "--database-url") == "postgresql+psycopg://x"
    assert flag_value(coordinator_cmd, "--address") == "127.0.0.1:1"
    assert flag_value(coordinator_cmd, "--dashboard") == "127.0.0.1:2"
    assert planned["coordinator"].env["FEDLENS_AGGREGATOR_ADDRESS"] == "127.0.0.1:1"
    assert planned["site-2"].healthcheck is not None
    assert "127.0.0.1:12/health" in planned["site-2"].healthcheck[-1]
    assert 'aggregator="127.0.0.1:1"' in planned["job"].command[2]
    assert "FLWR_HOME" in image_env()


@pytest.mark.slow
def test_compose_services_run_as_processes(tmp_path: Path, postgres: PostgresDatabases) -> None:
    token = f"fl_{secrets.token_hex(8)}_{secrets.token_hex(32)}"
    compose = load_compose({"FEDLENS_ADMIN_TOKEN": token})
    site_names = list(_sites(compose["services"]))
    chosen: list[int] = []
    while len(chosen) < 3 + len(site_names):  # free now, and distinct from one another
        port = free_port()
        if port not in chosen:
            chosen.append(port)
    ports = Ports(*chosen[:3], sites=dict(zip(site_names, chosen[3:], strict=True)))
    database_url = postgres.create()
    try:
        services = plan(compose, root=tmp_path, ports=ports, database_url=database_url)
        with Mirror(services, tmp_path / "logs") as mirror:
            # Compose's order: a service starts once everything it depends on is healthy.
            healthy = {"postgres"}
            waiting = [name for name in MIRRORED if name != "job"]
            while waiting:
                wave = [n for n in waiting if set(services[n].depends_on) <= healthy]
                assert wave, f"depends_on never satisfied: {waiting}"
                for name in wave:
                    mirror.start(name)
                for name in wave:
                    mirror.wait_healthy(name)
                    healthy.add(name)
                waiting = [n for n in waiting if n not in wave]
            assert set(services["job"].depends_on) <= healthy

            job = mirror.run("job", timeout_s=1500)
            diagnosis = f"{mirror.tail('job')}\n{mirror.tail('superlink')}"
            assert job.returncode == 0, diagnosis
            stored = re.search(r"^release ([0-9a-f]+) stored; test accuracy", job.stdout, re.M)
            assert stored is not None, diagnosis
            release_id = stored[1]

            # An operator's one-off `fedlens query` in the coordinator's environment.
            coordinator = services["coordinator"]
            listed = subprocess.run(
                ["fedlens", "query", "releases", "--json"],
                env=coordinator.env,
                cwd=coordinator.cwd,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert listed.returncode == 0, listed.stderr + mirror.tail("coordinator")
            releases = {r["release_id"]: r for r in json.loads(listed.stdout)}
            assert release_id in releases, releases
            assert releases[release_id]["num_sites"] == len(ports.sites)

            with httpx.Client(base_url=f"http://127.0.0.1:{ports.dashboard}", timeout=30) as web:
                assert web.get("/healthz").text == "ok"
                login = web.post("/login", data={"token": token})
                assert login.status_code == 303, login.text
                assert "fedlens_session" in login.cookies
                page = web.get("/releases")
                assert page.status_code == 200, page.text[-2000:]
                assert f"/releases/{release_id}" in page.text
    finally:
        postgres.drop(database_url)
