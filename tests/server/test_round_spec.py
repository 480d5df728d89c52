"""The round the coordinator opens is built from the run configuration, checked first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from explain import get_kind
from fedlens.datasets import load_dataset
from fedlens.errors import ConfigurationError
from fedlens.runconfig import RunConfig
from server.round_specs import explanation_round_spec

PRE = load_dataset("adult").preprocessor
SITES = ("site-0", "site-1")


def test_default_round_is_integrated_gradients_over_every_record() -> None:
    spec = explanation_round_spec(RunConfig(), PRE, SITES, round_id="r")
    assert spec.params["method"] == "integrated_gradients" and "cohort" not in spec.params
    assert spec.labels == tuple(PRE.encoded_names) and spec.length == PRE.dimension + 1


def test_method_classes_and_cohort_reach_the_round_and_size_it() -> None:
    run = RunConfig(
        explain_method="feature_ablation",
        explain_target="both",
        explain_cohort=json.dumps({"sex": ["Female"], "age": [30, 50]}),
        min_cohort_size=100,
    )
    spec = explanation_round_spec(run, PRE, SITES, round_id="r")
    assert spec.params["method"] == "feature_ablation"
    assert json.loads(spec.params["cohort"]) == {"sex": ["Female"], "age": [30, 50]}
    assert spec.params["min_cohort_size"] == "100"
    assert spec.length == 2 * PRE.dimension + 1
    assert spec.labels[0].endswith("|class=1") and spec.labels[-1].endswith("|class=0")
    # The post-processor accepts the round, as the aggregator checks at OpenRound.
    get_kind(spec.kind).postprocess(
        np.zeros(spec.length),
        0.0,
        spec.clip_bound,
        spec.labels,
        spec.params,
    )


@pytest.mark.parametrize(
    ("cohort", "problem"),
    [
        ("{not json", "explain-cohort is not valid JSON"),
        ("[1, 2]", "explain-cohort must be a JSON object"),
        ('{"height": [1, 2]}', "height"),
        ('{"sex": ["X"]}', "X"),
    ],
)
def test_a_bad_cohort_is_refused_before_any_site_is_asked(cohort: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        explanation_round_spec(RunConfig(explain_cohort=cohort), PRE, SITES, round_id="r")


def test_distributed_noise_widens_the_modulus_for_the_shares() -> None:
    from explain import l2_sensitivity
    from privacy import (
        FixedPointCodec,
        calibrate_shares,
        discrete_gaussian_noise_multiplier,
        encoded_sensitivity,
        wraparound_bits,
    )
    from server.round_specs import MAX_RECORDS_PER_SITE

    local = explanation_round_spec(RunConfig(), PRE, SITES, round_id="r")
    run = RunConfig(secagg_noise="distributed", secagg_colluding=0)
    spec = explanation_round_spec(run, PRE, SITES, round_id="r")
    assert spec.noise == "distributed" and spec.params["noise"] == "distributed"
    assert spec.bits >= local.bits and spec.scale == local.scale
    # The chosen modulus keeps the chance that any coordinate wraps below 2**-40.
    share = calibrate_shares(
        noise_multiplier=discrete_gaussian_noise_multiplier(run.explain_epsilon, run.explain_delta),
        sensitivity=encoded_sensitivity(
            l2_sensitivity(run.attribution_clip), spec.scale, spec.length
        ),
        dimension=spec.length,
        threshold=2,
        colluding=0,
    ).share_sigma
    needed, bound = wraparound_bits(
        num_sites=2,
        max_abs_encoded=MAX_RECORDS_PER_SITE * run.attribution_clip * spec.scale + 1,
        share_sigma=share,
        dimension=spec.length,
    )
    assert spec.bits >= needed and bound <= 2.0**-40
    assert FixedPointCodec(bits=spec.bits, scale=spec.scale).modulus >= 2**needed


def test_colluding_sites_must_stay_below_the_threshold() -> None:
    from server.rounds import protocol_params

    run = RunConfig(secagg_noise="distributed", secagg_colluding=2)
    with pytest.raises(ConfigurationError, match="colluding"):
        explanation_round_spec(run, PRE, SITES, round_id="r")
    local = explanation_round_spec(RunConfig(secagg_colluding=2), PRE, SITES, round_id="r")
    with pytest.raises(ConfigurationError, match="colluding"):
        protocol_params(local)
