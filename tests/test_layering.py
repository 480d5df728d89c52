"""The layering of DESIGN.md: the pure layers import no transport, runtime or database."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedlens.runconfig import RunConfig

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("grpc", "flwr", "sqlalchemy", "fedlens.v1", "client", "server")


@pytest.mark.parametrize("package", ["privacy", "explain", "fedlens.datasets", "fedlens.models"])
def test_pure_layers_import_no_transport(package: str) -> None:
    code = (
        f"import sys, {package}; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} "
        "or m.startswith('fedlens.v1')); print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "", f"{package} pulls in {out.stdout.strip()}"


def test_flower_app_declares_every_run_config_key_with_the_same_default() -> None:
    project = tomllib.loads((ROOT / "server" / "flower_project" / "pyproject.toml").read_text())
    declared = project["tool"]["flwr"]["app"]["config"]
    assert declared == RunConfig().to_flower()
