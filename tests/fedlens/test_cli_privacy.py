"""``fedlens plan`` and ``fedlens client budget``, run through the command's entry point."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from client.ledger_store import LedgerStore
from fedlens.cli import main
from privacy import LedgerEvent

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_plan_prints_each_site_split_within_the_budget(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--records", "4000", "--records", "9000", "--epsilon", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [site["records"] for site in out["sites"]] == [4000, 9000]
    for site in out["sites"]:
        assert 1.99 <= site["epsilon_total"] <= 2.0
        assert site["training_epsilon"] <= 0.7 * 2 + 1e-9
        assert site["release_noise_multiplier"] > 0


def test_plan_table_names_noise_multipliers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--records", "4000", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "train z" in out and "release z" in out and "4000" in out


def test_plan_that_cannot_fit_exits_2_naming_the_problem(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["plan", "--records", "4000", "--train-epsilon", "3.5", "--explain-epsilon", "3"])
    assert code == 2
    assert "does not fit the site budget" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epsilon", "0"], "epsilon must be finite and > 0"),
        (["--delta", "0.001"], "delta must be in (0, 1/records)"),
        (["--train-epsilon", "1"], "--train-epsilon and --explain-epsilon go together"),
    ],
)
def test_plan_bad_settings_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--records", "4000", *argv]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_client_budget_prints_the_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite")
    training = LedgerEvent(
        kind="dpsgd",
        noise_multiplier=1.1,
        sampling_rate=0.03,
        steps=60,
        label="round 1",
        created_at=NOW,
    )
    release = LedgerEvent(kind="gaussian", noise_multiplier=3.0, label="release r1", created_at=NOW)
    store.spend(training, 4.0, 1e-5)
    spent = store.spend(release, 4.0, 1e-5)
    assert main(["client", "budget", "--state-dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget_epsilon"] == 4.0 and out["delta"] == 1e-5
    assert out["epsilon_spent"] == pytest.approx(spent)
    assert [e["label"] for e in out["events"]] == ["round 1", "release r1"]
    assert main(["client", "budget", "--state-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "release r1" in text and "spent ε" in text


def test_client_budget_without_a_ledger_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["client", "budget", "--state-dir", str(tmp_path)]) == 2
    assert "no privacy ledger at" in capsys.readouterr().err
    assert not (tmp_path / "ledger.sqlite").exists()
