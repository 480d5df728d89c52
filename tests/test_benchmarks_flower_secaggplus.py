"""Flower's SecAgg+ benchmark runs a real local deployment and recovers the plain sum."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.flower_secaggplus import default_shares, run_flower_secaggplus
from fedlens.errors import ConfigurationError


def test_default_shares_are_an_odd_neighbourhood_with_a_majority_threshold() -> None:
    assert default_shares(3) == (3, 2)
    for sites in (4, 10, 25, 100, 1000):
        shares, threshold = default_shares(sites)
        assert shares % 2 == 1 or shares == sites
        assert 2 <= threshold <= shares <= sites
        assert threshold > shares // 2


@pytest.mark.parametrize(
    ("sites", "dim", "dropout"), [(2, 10, 0.0), (1024, 10, 0.0), (3, 0, 0.0), (3, 10, 1.0)]
)
def test_out_of_range_arguments_are_refused_before_anything_starts(
    sites: int, dim: int, dropout: float
) -> None:
    with pytest.raises(ConfigurationError):
        run_flower_secaggplus(sites, dim, dropout)


@pytest.mark.slow
def test_three_sites_sum_is_verified_and_timed(tmp_path: Path) -> None:
    # About 50 s on two cores: each of the four stages waits on Flower's pull intervals.
    result = run_flower_secaggplus(3, 100, 0.0, timeout_s=300, workdir=tmp_path)
    assert result["checked_sum"]
    assert result["max_abs_error"] <= result["error_bound"]
    assert result["flower_sites"] == result["flower_survivors"] == 3
    assert result["flower_runtime"] == "deployment"
    assert result["flower_secaggplus_s"] > 0 and result["flower_startup_s"] > 0
    stages = result["flower_stage_s"]
    assert set(stages) == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    assert all(s > 0 for s in stages.values())
    assert sum(stages.values()) <= result["flower_secaggplus_s"]
