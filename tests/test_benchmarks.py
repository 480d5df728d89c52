"""The benchmarks run and recover the plain sum (their timings are not checked here)."""

from __future__ import annotations

from benchmarks.dpsgd import measure as measure_dpsgd
from benchmarks.secagg import measure
from client.training import GRAD_SAMPLE_MODES


def test_secagg_benchmark_recovers_the_sum_within_the_encoding_error() -> None:
    result = measure(sites=3, length=50, repeats=1)
    assert result["max_abs_error"] < 3 / 1e5
    assert result["site_s"] > 0 and result["server_s"] > 0


def test_dpsgd_benchmark_reports_every_mode_and_their_weights_agree() -> None:
    result = measure_dpsgd(records=300, repeats=1)
    for key in ("nonprivate_s", "best_mode", "best_mode_s", "overhead", "modes", "cores"):
        assert key in result
    for key in ("threads", "records", "batch_size", "model", "loading_s"):
        assert key in result
    assert result["records"] == 300 and result["model"] == "mlp"
    assert set(result["modes"]) == set(GRAD_SAMPLE_MODES)
    assert result["best_mode"] in GRAD_SAMPLE_MODES
    for mode in result["modes"].values():
        assert {"seconds", "overhead", "cpu_seconds", "max_weight_difference"} <= set(mode)
        assert mode["max_weight_difference"] <= result["agreement_atol"]
    assert result["modes_agree"]
    assert set(result["dp_steps_per_epoch"].values()) == {result["steps_per_epoch"]} == {2}
