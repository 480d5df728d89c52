"""The attribution benchmark runs end to end on a small federation and reports sane figures."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.attribution import deletion_curve, main, rank_agreement
from server.round_specs import PRECISION


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One quick run shared by the tests below: 1 seed, a tenth of the rows, 4 IG steps."""
    out = tmp_path_factory.mktemp("attribution") / "attribution.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(
            [
                "--dataset", "adult",
                "--json", str(out),
                "--seeds", "1",
                "--epsilons", "1,inf",
                "--fraction", "0.1",
                "--n-steps", "4",
            ]
        )  # fmt: skip
    return json.loads(out.read_text()), printed.getvalue()


def test_quick_run_reports_every_figure(quick: tuple[dict[str, Any], str]) -> None:
    results, printed = quick
    for key in ("deletion_auc", "deletion_auc_random", "site_s", "settings", "cores", "seconds"):
        assert key in results
    assert list(results["top5_agreement"]) == list(results["spearman"]) == ["1", "inf"]
    assert all(0.0 <= v <= 1.0 for v in results["top5_agreement"].values())
    settings = results["settings"]
    assert settings["sites"] == 4 and settings["seeds"] == [0] and settings["delta"] == 1e-6
    assert settings["clip_bound"] == 0.5
    runs = results["runs"]
    assert len(runs) == 2
    noisy, clipped = runs
    assert noisy["site_noise_std"] > 0 and clipped["site_noise_std"] == 0.0
    # Without noise the decoded count is the record count, up to the fixed-point rounding.
    records = sum(results["per_seed"][0]["site_records"])
    assert abs(clipped["noised_count"] - records) <= 4 * PRECISION / settings["clip_bound"]
    assert all(run["fixed_point_max_error"] <= 4 * PRECISION for run in runs)
    assert isinstance(results["site_s"], float) and results["site_s"] > 0
    assert "Spearman" in printed and "deletion AUC" in printed


def test_clipping_alone_keeps_the_ranking(quick: tuple[dict[str, Any], str]) -> None:
    results, _ = quick
    assert results["spearman"]["inf"] > 0.9


def test_released_ranking_deletes_faster_than_random(
    quick: tuple[dict[str, Any], str],
) -> None:
    results, _ = quick
    assert results["deletion_auc"] < results["deletion_auc_random"]


def test_rank_agreement_known_answers() -> None:
    pooled = {f"f{i}": float(i) for i in range(8)}
    assert rank_agreement(pooled, pooled) == (1.0, 1.0)
    reversed_ = {name: 7.0 - value for name, value in pooled.items()}
    top5, rho = rank_agreement(reversed_, pooled)
    assert top5 == 2 / 5 and rho == pytest.approx(-1.0)
    # Only magnitudes rank: flipping signs changes nothing.
    assert rank_agreement({k: -v for k, v in pooled.items()}, pooled) == (1.0, 1.0)


def test_deletion_curve_zeroes_features_in_order() -> None:
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[4.0, 0.0, 2.0]]))
        model.bias.zero_()
    groups = {"a": [0], "b": [1], "c": [2]}
    x = np.ones((2, 3), dtype=np.float32)
    curve = deletion_curve(model, x, ["a", "b", "c"], groups)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    np.testing.assert_allclose(curve, [sigmoid(6), sigmoid(2), sigmoid(2), 0.5], rtol=1e-6)
    assert x.sum() == 6  # the caller's records are left alone


def test_bad_epsilons_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--json", str(tmp_path / "x.json"), "--epsilons", "1,-2"])
