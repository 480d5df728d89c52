"""The influence benchmark runs end to end on small sizes and its ground truth is right."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.influence import TARGETS, main
from benchmarks.influence_federation import dp_noise_std, federate
from benchmarks.influence_mlp import Recipe, train_mlp
from benchmarks.influence_truth import (
    exact_shapley,
    fit_logistic,
    flip_labels,
    half_subsets,
    linear_datamodeling_score,
    logistic_logits,
    logistic_model,
    recall_at,
)

HEADLINE = {
    "loo_pearson",
    "loo_pearson_central",
    "lds",
    "lds_dp",
    "lds_mlp",
    "lds_tracin",
    "lds_captum_tracincp",
    "mislabel_auc",
    "recall_at_10pct",
    "recall_at_20pct",
    "loss_auc",
    "loss_recall_at_10pct",
    "loss_recall_at_20pct",
    "valuation_spearman",
    "corrupted_ranked_last",
    "query_site_s",
    "speedup_vs_captum",
    "federated_equals_central_max_abs_diff",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One ``--quick`` run shared by the tests below."""
    out = tmp_path_factory.mktemp("influence") / "influence.json"
    printed = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(printed):
        main(["--quick", "--json", str(out)])
    assert torch.get_num_threads() == threads  # the CLI restores the thread count
    return json.loads(out.read_text()), printed.getvalue()


def test_quick_run_reports_every_figure(quick: tuple[dict[str, Any], str]) -> None:
    results, printed = quick
    assert set(results) >= HEADLINE | {"targets", "targets_met", "settings", "cores", "seconds"}
    assert set(results["targets_met"]) == set(TARGETS) | {"corrupted_ranked_last"}
    for key, met in results["targets_met"].items():
        if key in TARGETS:
            assert met == (results[key] >= TARGETS[key])
    assert results["settings"]["mu"] == 1.0 and results["settings"]["mlp_rows"] == 400
    assert results["logistic"]["train_rows"] == sum(results["logistic"]["site_rows"]) == 456
    assert results["query_site_s"] > 0 and results["speedup_vs_captum"] > 0
    assert "loo_pearson" in printed and "speedup_vs_captum" in printed


def test_federated_second_order_equals_the_central_one(
    quick: tuple[dict[str, Any], str],
) -> None:
    results, _ = quick
    assert results["federated_equals_central_max_abs_diff"] <= 1e-9
    assert results["mlp"]["kfac_federated_equals_central_max_abs_diff"] <= 1e-9
    assert results["loo_pearson_central"] == pytest.approx(results["loo_pearson"], abs=1e-9)
    assert results["logistic"]["lds_central"] == pytest.approx(results["lds"], abs=1e-9)


def test_influence_predicts_exact_refits(quick: tuple[dict[str, Any], str]) -> None:
    results, _ = quick
    # Every record is left out even in the quick run: the exact model, exact Hessian.
    assert results["loo_pearson"] >= 0.99
    assert results["logistic"]["loo_pearson_pooled"] >= 0.99
    assert results["lds"] >= 0.9


def test_dp_release_is_noised_as_stated(quick: tuple[dict[str, Any], str]) -> None:
    results, _ = quick
    dp = results["logistic"]["dp"]
    z_sqrt2_c = dp_noise_std(dp["epsilon"], dp["delta"], dp["clip_bound"])
    assert dp["noise_std_per_site"] == pytest.approx(z_sqrt2_c)
    assert z_sqrt2_c == pytest.approx(3.73 * math.sqrt(2) * dp["clip_bound"], rel=0.01)
    chosen = dp["by_clip_bound"][f"{dp['clip_bound']:g}"]
    counts = np.asarray(chosen["noised_counts"])
    # The count coordinate is noised too: not the true count, but within 6 std of the sum.
    assert np.all(counts != 456)
    assert np.all(np.abs(counts - 456) < 6 * dp["noise_std_in_sum"] / dp["clip_bound"])
    assert 0.5 < results["lds_dp"] < results["lds"]


def test_our_tracin_equals_captum_tracincp(quick: tuple[dict[str, Any], str]) -> None:
    results, _ = quick
    mlp = results["mlp"]
    assert mlp["captum_vs_ours_tracin_max_abs_diff"] <= 1e-9 * max(1.0, mlp["tracin_max_abs_score"])
    assert results["lds_captum_tracincp"] == pytest.approx(results["lds_tracin"], abs=1e-9)
    assert results["speed"]["tracin"]["max_abs_diff"] <= 1e-9


def test_mislabels_and_corrupted_site_are_found(quick: tuple[dict[str, Any], str]) -> None:
    results, _ = quick
    assert results["mislabel_auc"] > 0.9 and results["loss_auc"] > 0.9
    assert results["corrupted_ranked_last"]
    for run in results["valuation"]["runs"]:
        assert run["shapley_ranks_corrupted_last"]


def test_newton_fit_is_a_stationary_point() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = (rng.random(60) < 0.5).astype(np.float64)
    theta = fit_logistic(x, y, 0.5)
    p = 1 / (1 + np.exp(-logistic_logits(theta, x)))
    gradient = np.hstack([x, np.ones((60, 1))]).T @ (p - y) + 0.5 * theta
    assert np.max(np.abs(gradient)) < 1e-9
    with torch.no_grad():
        out = logistic_model(theta)(torch.as_tensor(x)).numpy().reshape(-1)
    np.testing.assert_allclose(out, logistic_logits(theta, x), atol=1e-12)
    assert np.all(fit_logistic(x[:0], y[:0], 0.5) == 0.0)


def test_exact_shapley_known_answers() -> None:
    weights = np.array([1.0, -2.0, 0.5])
    additive = np.array([sum(weights[i] for i in range(3) if m >> i & 1) for m in range(8)])
    np.testing.assert_allclose(exact_shapley(additive), weights)
    # Unanimity game of players 0 and 1: they split the value, player 2 gets nothing.
    unanimity = np.array([1.0 if m & 0b011 == 0b011 else 0.0 for m in range(8)])
    np.testing.assert_allclose(exact_shapley(unanimity), [0.5, 0.5, 0.0])
    game = np.random.default_rng(1).normal(size=16)
    assert exact_shapley(game).sum() == pytest.approx(game[15] - game[0])


def test_small_statistics() -> None:
    truth = np.array([True, False, True, False, False])
    assert recall_at(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), truth, 0.2) == 0.5
    assert recall_at(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), truth, 0.6) == 1.0
    labels, flipped = flip_labels(np.zeros(50), 0.1, np.random.default_rng(0))
    assert flipped.sum() == 5 and np.all(labels == flipped)
    masks = half_subsets(10, 4, np.random.default_rng(0))
    assert masks.shape == (4, 10) and np.all(masks.sum(axis=1) == 5)
    actual = np.arange(12.0).reshape(6, 2)
    assert linear_datamodeling_score(actual, actual**3) == pytest.approx(1.0)
    assert linear_datamodeling_score(actual, -actual) == pytest.approx(-1.0)


def test_federate_sums_exactly_without_noise_and_noises_the_count() -> None:
    rng = np.random.default_rng(0)
    terms = [(rng.normal(size=7) * 100, n) for n in (3, 5, 9)]
    exact = federate(terms, round_id="t-exact")
    np.testing.assert_allclose(exact.total, sum(t for t, _ in terms), rtol=0, atol=1e-9)
    assert exact.count == pytest.approx(17, abs=1e-9) and exact.noise_std == 0.0
    noised = federate(terms, clip_bound=2.0, noise_std=1.0, seed=3, round_id="t-dp")
    assert noised.count != 17 and abs(noised.count - 17) < 6 * math.sqrt(3) / 2.0
    assert noised.fixed_point_max_error <= 3 * 1e-5


def test_mlp_recipe_keeps_evenly_spaced_checkpoints() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 5)), (rng.random(40) < 0.5).astype(np.float64)
    recipe = Recipe(steps=10, checkpoints=3)
    trained = train_mlp(x, y, recipe)
    assert len(trained.checkpoints) == 3
    assert all(eta == pytest.approx(0.01 * 3 / 40) for _, eta in trained.checkpoints)
    last, _ = trained.checkpoints[-1]
    for name, value in trained.model.state_dict().items():
        assert torch.equal(last[name], value)
    again = train_mlp(x, y, recipe, keep_checkpoints=False)
    assert again.checkpoints == [] and again.objective == trained.objective


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--json", str(tmp_path / "x.json"), "--quick", "--mlp-subsets", "1"])
    with pytest.raises(SystemExit):
        main(["--json", str(tmp_path / "x.json"), "--quick", "--threads", "0"])
