"""The aggregator's round state machine: validation before mutation, sums, deadlines."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlens.errors import (
    ConfigurationError,
    DuplicateSubmissionError,
    IntegrityError,
    StaleRoundError,
)
from fedlens.types import KeyAdvertisement, MaskedSubmission, PrivacyCost, RoundPhase, RoundSpec
from privacy.aggregation_round import AggregationRound

SITES = ("a", "b", "c")


def make_spec(**kw: object) -> RoundSpec:
    base: dict[str, object] = dict(
        round_id="r1",
        kind="global_attribution",
        site_ids=SITES,
        length=4,
        bits=16,
        scale=1.0,
        clip_bound=1.0,
        labels=("x0", "x1", "x2"),
        phase_timeout_s=10.0,
    )
    base.update(kw)
    return RoundSpec(**base)  # type: ignore[arg-type]


def key(i: int) -> bytes:
    return bytes([i + 1]) * 32


def advertised(spec: RoundSpec | None = None) -> AggregationRound:
    state = AggregationRound(spec or make_spec(), now=0.0)
    for i, site in enumerate(state.spec.site_ids):
        state.advertise(KeyAdvertisement("r1", site, key(i)), now=1.0)
    return state


def sub(site: str, values: list[int], **cost: float) -> MaskedSubmission:
    c = dict(epsilon=0.5, delta=1e-6, epsilon_total=1.0)
    c.update(cost)
    return MaskedSubmission(
        round_id="r1",
        site_id=site,
        values=np.array(values, dtype=np.uint64),
        cost=PrivacyCost(site_id=site, **c),
        noise_std=0.3,
    )


def test_keys_are_released_only_when_every_site_advertised() -> None:
    state = AggregationRound(make_spec(), now=0.0)
    state.advertise(KeyAdvertisement("r1", "a", key(0)), now=1.0)
    assert state.peer_keys("a", now=1.0) == {}
    state.advertise(KeyAdvertisement("r1", "b", key(1)), now=1.0)
    state.advertise(KeyAdvertisement("r1", "c", key(2)), now=1.0)
    assert state.phase is RoundPhase.COLLECTING
    assert state.peer_keys("b", now=1.0) == {"a": key(0), "b": key(1), "c": key(2)}


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2**16 - 1), min_size=4, max_size=4), min_size=3, max_size=3)
)
def test_running_sum_is_the_modular_sum(vectors: list[list[int]]) -> None:
    state = advertised()
    for site, values in zip(SITES, vectors, strict=True):
        state.submit(sub(site, values), now=2.0)
    assert state.ready
    expected = np.array(vectors, dtype=np.uint64).sum(axis=0) % (2**16)
    result = state.result()
    assert np.array_equal(result.encoded_sum, expected)
    assert math.isclose(result.noise_std, math.sqrt(3 * 0.3**2))


BAD = [
    ("wrong length", sub("a", [1, 2, 3]), IntegrityError, "length 3"),
    ("out of field", sub("a", [1, 2, 3, 2**16]), IntegrityError, "outside the field"),
    ("NaN epsilon", sub("a", [1, 2, 3, 4], epsilon=math.nan), IntegrityError, "cost.epsilon"),
    ("inf std", sub("a", [1, 2, 3, 4], epsilon_total=math.inf), IntegrityError, "epsilon_total"),
    ("stranger", sub("z", [1, 2, 3, 4]), IntegrityError, "not part of round"),
]


@pytest.mark.parametrize(("name", "bad", "error", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_submission_is_refused_and_leaves_the_round_intact(
    name: str, bad: MaskedSubmission, error: type[Exception], match: str
) -> None:
    state = advertised()
    state.submit(sub("b", [5, 5, 5, 5]), now=2.0)
    with pytest.raises(error, match=match):
        state.submit(bad, now=2.0)
    assert state.status(2.0).submitted == ("b",)
    state.submit(sub("a", [1, 1, 1, 1]), now=2.0)
    state.submit(sub("c", [1, 1, 1, 1]), now=2.0)
    assert state.result().encoded_sum.tolist() == [7, 7, 7, 7]


def test_duplicate_submission_is_refused_and_not_counted_twice() -> None:
    state = advertised()
    state.submit(sub("a", [1, 1, 1, 1]), now=2.0)
    with pytest.raises(DuplicateSubmissionError):
        state.submit(sub("a", [1, 1, 1, 1]), now=2.0)
    state.submit(sub("b", [1, 1, 1, 1]), now=2.0)
    state.submit(sub("c", [1, 1, 1, 1]), now=2.0)
    assert state.result().encoded_sum.tolist() == [3, 3, 3, 3]


def test_submission_before_keys_are_complete_is_stale() -> None:
    state = AggregationRound(make_spec(), now=0.0)
    with pytest.raises(StaleRoundError, match="not accepting vectors"):
        state.submit(sub("a", [1, 1, 1, 1]), now=1.0)


def test_duplicate_or_copied_key_is_refused() -> None:
    state = AggregationRound(make_spec(), now=0.0)
    state.advertise(KeyAdvertisement("r1", "a", key(0)), now=1.0)
    with pytest.raises(DuplicateSubmissionError):
        state.advertise(KeyAdvertisement("r1", "a", key(1)), now=1.0)
    with pytest.raises(IntegrityError, match="another site's"):
        state.advertise(KeyAdvertisement("r1", "b", key(0)), now=1.0)
    with pytest.raises(IntegrityError, match="32 bytes"):
        state.advertise(KeyAdvertisement("r1", "b", b"short"), now=1.0)


def test_missing_site_aborts_at_the_deadline_revealing_nothing() -> None:
    state = advertised()
    state.submit(sub("a", [9, 9, 9, 9]), now=2.0)
    state.submit(sub("b", [9, 9, 9, 9]), now=2.0)
    status = state.status(now=100.0)
    assert status.phase is RoundPhase.ABORTED
    assert "c" in status.reason
    with pytest.raises(StaleRoundError):
        state.result()
    with pytest.raises(StaleRoundError):
        state.submit(sub("c", [9, 9, 9, 9]), now=100.0)


def test_missing_key_aborts_the_round() -> None:
    state = AggregationRound(make_spec(), now=0.0)
    state.advertise(KeyAdvertisement("r1", "a", key(0)), now=1.0)
    status = state.status(now=11.0)
    assert status.phase is RoundPhase.ABORTED
    assert "b, c" in status.reason
    with pytest.raises(StaleRoundError, match="aborted"):
        state.peer_keys("a", now=11.0)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("site_ids", ("a",), "at least 2"),
        ("site_ids", ("a", "a"), "distinct"),
        ("bits", 63, "bits"),
        ("length", 3, "len\\(labels\\)"),
        ("scale", 0.0, "scale"),
        ("clip_bound", math.nan, "clip_bound"),
    ],
)
def test_invalid_spec_is_refused(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        AggregationRound(make_spec(**{field: value}), now=0.0)
