"""The benchmarks run and recover the plain sum (their timings are not checked here)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.dpsgd import measure as measure_dpsgd
from benchmarks.secagg import (
    BenchmarkConfig,
    codec_for,
    round_spec,
    run_benchmark,
    verify_released,
)
from client.training import GRAD_SAMPLE_MODES
from fedlens.errors import IntegrityError
from privacy import SeededRandom

SECAGG_KEYS = {
    "plain_s",
    "secagg_s",
    "secaggplus_s",
    "server_cpu_s",
    "plain_server_cpu_s",
    "server_ratio",
    "prg_floor_s",
    "site_cpu_s_median",
    "plain_site_cpu_s_median",
    "server_peak_mib",
    "flower_sites",
    "flower_secaggplus_s",
    "flower_error",
    "fedlens_at_flower_sites_s",
    "sites",
    "dim",
    "dropout",
    "cores",
    "scaling",
}


def test_secagg_benchmark_runs_every_mode_over_grpc_and_checks_each_released_sum() -> None:
    config = BenchmarkConfig(sites=5, dim=200, dropout=0.2, flower=False, timeout_s=60.0)
    result = run_benchmark(config)
    assert set(result) >= SECAGG_KEYS
    assert (result["sites"], result["dim"], result["dropout"], result["dropped"]) == (
        5,
        200,
        0.2,
        1,
    )
    assert set(result["modes"]) == {"plain", "complete", "secaggplus"}
    for mode in result["modes"].values():
        assert mode["sum_verified"]
        assert mode["max_abs_error"] <= mode["error_bound"]
        assert mode["seconds"] > 0 and mode["server_cpu_s"] > 0
        assert mode["site_cpu_s_median"] > 0 and mode["dropped_site_cpu_s_median"] > 0
    assert result["sum_verified"]
    # One self mask per survivor, one pairwise mask per (dropped, surviving neighbour).
    assert result["modes"]["complete"]["masks_removed"] == 4 + 4
    assert result["prg_floor_s"] > 0 and result["server_peak_mib"] > 0
    expected_ratio = result["server_cpu_s"] / (result["prg_floor_s"] + result["plain_server_cpu_s"])
    assert result["server_ratio"] == expected_ratio
    assert result["flower_sites"] is None and result["flower_secaggplus_s"] is None
    assert result["flower_error"] and result["fedlens_at_flower_sites_s"] is None
    assert result["scaling"] is None


def test_secagg_benchmark_refuses_a_released_sum_that_is_off_by_one_step() -> None:
    spec = round_spec("complete", 3, 4, "r", 10.0)
    codec = codec_for(3)
    vectors = [np.array([0.5, -0.25, 1e-3, 0.0]) for _ in range(3)]
    encoded = codec.sum(codec.encode(v, SeededRandom(i)) for i, v in enumerate(vectors))
    released = codec.decode(encoded)
    plain = np.sum(vectors, axis=0)
    error, bound = verify_released("r", released, plain, encoded, spec, 3)
    assert error <= bound == 3 / spec.scale
    wrong = released.copy()
    wrong[2] += 1 / spec.scale
    with pytest.raises(IntegrityError, match="differs"):
        verify_released("r", wrong, plain, encoded, spec, 3)
    with pytest.raises(IntegrityError, match="differs"):
        verify_released("r", plain + 1e-3, plain, None, spec, 3)


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
