"""The utility benchmark runs end to end on a small federation and reports sane figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.utility import eps_key, fedavg, main
from fedlens.datasets import load_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_quick_run_writes_the_json_table_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "utility.json", tmp_path / "utility.png"
    main(
        [
            "--dataset", "adult",
            "--json", str(out),
            "--png", str(png),
            "--seeds", "1",
            "--epsilons", "1,inf",
            "--rounds", "3",
            "--local-epochs", "2",
            "--fraction", "0.5",
        ]
    )  # fmt: skip
    results = json.loads(out.read_text())

    assert png.read_bytes().startswith(PNG_SIGNATURE)
    for key in ("accuracy_std", "group_accuracy_std", "settings", "cores", "seconds"):
        assert key in results
    assert list(results["accuracy"]) == ["1", "inf"]
    assert list(results["group_accuracy"]) == ["1", "inf"]
    sizes = results["group_sizes"]
    assert {"sex=Female", "sex=Male", "race=Black", "race=White"} <= set(sizes)
    for feature in ("sex", "race"):
        assert (
            sum(n for g, n in sizes.items() if g.startswith(f"{feature}="))
            == (results["test_rows"])
        )
    for key in ("1", "inf"):
        assert set(results["group_accuracy"][key]) == set(sizes)
        values = [results["accuracy"][key], *results["group_accuracy"][key].values()]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert results["accuracy_std"][key] == 0.0  # one seed
    settings = results["settings"]
    assert settings["sites"] == 4 and settings["rounds"] == 3 and settings["seeds"] == [0]
    assert settings["delta"] == 1e-5
    assert len(results["runs"]) == 2
    assert all(z > 0 for z in results["runs"][0]["noise_multipliers"])
    assert results["runs"][1]["noise_multipliers"] == [0.0] * 4

    # Predicting the majority class scores 0.76 on Adult's test set; a trained model
    # must clearly beat it.
    test_labels = load_dataset("adult").test_data().labels
    majority = max(test_labels.mean(), 1 - test_labels.mean())
    assert results["nonprivate_accuracy"] == results["accuracy"]["inf"]
    assert results["nonprivate_accuracy"] > max(0.80, majority + 0.03)
    assert "overall" in capsys.readouterr().out


def test_fedavg_weights_by_record_count() -> None:
    states = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
    torch.testing.assert_close(fedavg(states, [1, 3])["w"], torch.full((2,), 0.75))


def test_eps_keys() -> None:
    assert [eps_key(e) for e in (0.5, 1.0, 2.0, 8.0, math.inf)] == ["0.5", "1", "2", "8", "inf"]


def test_bad_epsilons_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--json", str(tmp_path / "x.json"), "--epsilons", "1,-2"])
