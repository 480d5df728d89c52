"""``fedlens admin token`` on a real store: issue with an expiry, list, refuse bad lifetimes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedlens.cli import main
from fedlens.cli_admin import parse_lifetime
from fedlens.errors import ConfigurationError


@pytest.mark.parametrize(
    ("text", "lifetime"),
    [("90d", timedelta(days=90)), ("12h", timedelta(hours=12)), (" 30m ", timedelta(minutes=30))],
)
def test_lifetimes_parse(text: str, lifetime: timedelta) -> None:
    assert parse_lifetime(text) == lifetime


@pytest.mark.parametrize("text", ["0d", "-1d", "1y", "1.5h", "", "d", "9999999d"])
def test_bad_lifetimes_are_refused_by_name(text: str) -> None:
    with pytest.raises(ConfigurationError, match="--expires-in"):
        parse_lifetime(text)


def test_issue_with_an_expiry_and_list_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = ["--database-url", f"sqlite:///{tmp_path / 'fedlens.db'}"]
    before = datetime.now(UTC)
    issue = ["admin", "token", "issue", "--name", "ana", "--role", "analyst", "--json"]
    assert main([*issue, "--expires-in", "12h", *db]) == 0
    issued = json.loads(capsys.readouterr().out)
    expires = datetime.fromisoformat(issued["expires"])
    assert before + timedelta(hours=12) <= expires <= datetime.now(UTC) + timedelta(hours=12)
    assert main(["admin", "token", "issue", "--name", "bo", "--role", "viewer", "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out)["expires"] is None

    assert main(["admin", "token", "list", "--json", *db]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert listed["ana"]["token_id"] == issued["token_id"] and listed["ana"]["active"]
    assert datetime.fromisoformat(listed["ana"]["expires"]) == expires.replace(microsecond=0)
    assert listed["bo"]["expires"] is None and listed["bo"]["active"]

    assert main(["admin", "token", "list", *db]) == 0
    table = capsys.readouterr().out
    assert "never" in table and str(expires.date()) in table

    assert main([*issue, "--expires-in", "0d", *db]) == 2
    assert "--expires-in" in capsys.readouterr().err
