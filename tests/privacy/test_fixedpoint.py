"""Fixed-point codec: bounded round-trip error, unbiased rounding, sums that never wrap."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlens.errors import ConfigurationError, IntegrityError
from privacy import MAX_BITS, FixedPointCodec, SeededRandom

scales = st.sampled_from([1.0, 3.0, 0.25, 2.0**10, 1e3, 2.0**16, 1e6])


def roundtrip_slack(x: np.ndarray) -> np.ndarray:
    """Float64 rounding of ``x * scale`` and of the decoded value (see the module doc)."""
    return np.asarray(4 * np.spacing(np.abs(x)), dtype=np.float64)


@settings(max_examples=200)
@given(bits=st.integers(2, MAX_BITS), scale=scales, data=st.data(), seed=st.integers(0, 2**32))
def test_round_trip_error_is_below_one_over_scale(
    bits: int, scale: float, data: st.DataObject, seed: int
) -> None:
    codec = FixedPointCodec(bits=bits, scale=scale)
    bound = codec.max_abs
    values = np.array(
        data.draw(st.lists(st.floats(-bound, bound), min_size=0, max_size=30)), dtype=np.float64
    )
    encoded = codec.encode(values, SeededRandom(seed))
    assert encoded.dtype == np.uint64 and encoded.shape == values.shape
    assert (encoded < np.uint64(1 << bits)).all()
    error = np.abs(codec.decode(encoded) - values)
    assert (error < 1 / scale + roundtrip_slack(values)).all()


def test_integers_round_trip_exactly_and_negatives_use_twos_complement() -> None:
    codec = FixedPointCodec(bits=8, scale=1.0)
    encoded = codec.encode(np.array([0.0, 1.0, -1.0, 127.0, -127.0]), SeededRandom(0))
    assert encoded.tolist() == [0, 1, 255, 127, 129]
    assert codec.decode(encoded).tolist() == [0.0, 1.0, -1.0, 127.0, -127.0]
    assert codec.decode(np.array([128], dtype=np.uint64)).tolist() == [-128.0]


def test_stochastic_rounding_is_unbiased() -> None:
    codec = FixedPointCodec(bits=16, scale=1.0)
    values = np.full(200_000, 0.3)
    decoded = codec.decode(codec.encode(values, SeededRandom(1)))
    assert set(np.unique(decoded)) == {0.0, 1.0}
    assert decoded.mean() == pytest.approx(0.3, abs=0.005)
    negative = codec.decode(codec.encode(-values, SeededRandom(2)))
    assert negative.mean() == pytest.approx(-0.3, abs=0.005)


def test_shape_is_kept() -> None:
    codec = FixedPointCodec(bits=20, scale=100.0)
    values = np.arange(6.0).reshape(2, 3)
    assert np.array_equal(codec.decode(codec.encode(values, SeededRandom(0))), values)


@settings(max_examples=100)
@given(
    sites=st.integers(1, 40),
    max_abs=st.floats(0.0, 1e6),
    precision=st.floats(1e-6, 10.0),
    data=st.data(),
    seed=st.integers(0, 2**32),
)
def test_choose_never_wraps(
    sites: int, max_abs: float, precision: float, data: st.DataObject, seed: int
) -> None:
    try:
        codec = FixedPointCodec.choose(sites, max_abs, precision)
    except ConfigurationError:
        assert sites * (max_abs / precision + 1) > 2.0**60
        return
    assert codec.scale == 1 / precision
    assert 2 <= codec.bits <= MAX_BITS
    # Minimal: one bit fewer would not leave the documented headroom.
    assert codec.bits == 2 or sites * (max_abs * codec.scale + 1) > 2.0 ** (codec.bits - 3)
    length = 4
    extreme = st.sampled_from([max_abs, -max_abs])
    any_value = st.floats(-max_abs, max_abs) if max_abs > 0 else st.just(0.0)
    rows = [
        data.draw(st.lists(st.one_of(extreme, any_value), min_size=length, max_size=length))
        for _ in range(sites)
    ]
    values = np.array(rows, dtype=np.float64)
    rng = SeededRandom(seed)
    total = codec.sum(codec.encode(row, rng) for row in values)
    decoded = codec.decode(total)
    exact = values.sum(axis=0)
    slack = sites / codec.scale + 8 * sites * np.spacing(max(max_abs, 1.0))
    assert (np.abs(decoded - exact) <= slack).all()


def test_all_sites_at_the_extreme_do_not_wrap() -> None:
    codec = FixedPointCodec.choose(num_sites=5, max_abs=1.0, precision=1e-3)
    rng = SeededRandom(0)
    for sign in (1.0, -1.0):
        encodings = [codec.encode(np.full(3, sign), rng) for _ in range(5)]
        assert np.allclose(codec.decode(codec.sum(encodings)), 5 * sign)


@settings(max_examples=50)
@given(
    sites=st.integers(1, 10),
    seed=st.integers(0, 2**32),
    length=st.integers(0, 20),
)
def test_sums_of_encodings_decode_within_n_over_scale(sites: int, seed: int, length: int) -> None:
    codec = FixedPointCodec(bits=40, scale=2.0**12)
    rng = SeededRandom(seed)
    values = rng.normal(sites * length, 50.0).reshape(sites, length)
    encodings = [codec.encode(row, rng) for row in values]
    pairwise = encodings[0]
    for item in encodings[1:]:
        pairwise = codec.add(pairwise, item)
    total = codec.sum(encodings)
    assert np.array_equal(total, pairwise)
    assert np.array_equal(codec.sum(np.stack(encodings)), total)
    assert (np.abs(codec.decode(total) - values.sum(axis=0)) <= sites / codec.scale).all()


def test_modular_addition_wraps_at_two_to_the_bits() -> None:
    codec = FixedPointCodec(bits=62, scale=1.0)
    top = np.array([(1 << 62) - 1], dtype=np.uint64)
    assert codec.add(top, np.array([2], dtype=np.uint64)).tolist() == [1]
    small = FixedPointCodec(bits=4, scale=1.0)
    assert small.sum([np.array([15], dtype=np.uint64)] * 3).tolist() == [13]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_their_index(bad: float) -> None:
    codec = FixedPointCodec(bits=16, scale=1.0)
    with pytest.raises(IntegrityError, match="index 2"):
        codec.encode(np.array([0.0, 1.0, bad]), SeededRandom(0))


def test_values_beyond_the_half_range_are_rejected() -> None:
    codec = FixedPointCodec(bits=8, scale=1.0)
    codec.encode(np.array([127.0, -127.0]), SeededRandom(0))
    with pytest.raises(IntegrityError, match=r"index 1.*outside the representable range"):
        codec.encode(np.array([0.0, 127.5]), SeededRandom(0))
    with pytest.raises(IntegrityError, match="index 0"):
        codec.encode(np.array([-128.0]), SeededRandom(0))


def test_wide_codec_does_not_wrap_at_its_largest_value() -> None:
    for bits in (53, 54, 62):
        codec = FixedPointCodec(bits=bits, scale=1.0)
        x = np.array([codec.max_abs, -codec.max_abs])
        assert np.array_equal(codec.decode(codec.encode(x, SeededRandom(0))), x)


def test_decode_rejects_values_outside_the_ring() -> None:
    codec = FixedPointCodec(bits=8, scale=1.0)
    with pytest.raises(IntegrityError, match="outside"):
        codec.decode(np.array([1, 256], dtype=np.uint64))
    with pytest.raises(IntegrityError, match="integer"):
        codec.decode(np.array([1.0]))
    with pytest.raises(IntegrityError, match="negative"):
        codec.decode(np.array([-1]))
    with pytest.raises(IntegrityError, match="shapes"):
        codec.add(np.zeros(2, dtype=np.uint64), np.zeros(3, dtype=np.uint64))
    with pytest.raises(IntegrityError, match="no encodings"):
        codec.sum([])


@pytest.mark.parametrize(
    ("bits", "scale", "match"),
    [(1, 1.0, "bits"), (63, 1.0, "bits"), (16, 0.0, "scale"), (16, float("inf"), "scale")],
)
def test_invalid_codecs_are_configuration_errors(bits: int, scale: float, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        FixedPointCodec(bits=bits, scale=scale)


def test_choose_refuses_more_than_62_bits_and_bad_arguments() -> None:
    with pytest.raises(ConfigurationError, match="62 bits"):
        FixedPointCodec.choose(1000, 1e12, 1e-9)
    with pytest.raises(ConfigurationError, match="num_sites"):
        FixedPointCodec.choose(0, 1.0, 1e-3)
    with pytest.raises(ConfigurationError, match="precision"):
        FixedPointCodec.choose(3, 1.0, 0.0)
    with pytest.raises(ConfigurationError, match="max_abs"):
        FixedPointCodec.choose(3, -1.0, 1e-3)


def test_choose_known_answer() -> None:
    # 3 * (1 * 1e6 + 1) = 3_000_003 <= 2**22, > 2**21: bits - 2 = 22.
    assert FixedPointCodec.choose(3, 1.0, 1e-6) == FixedPointCodec(bits=24, scale=1e6)


@pytest.mark.parametrize("num_sites", [1, 3, 100])
def test_site_limit_keeps_the_sum_of_every_site_from_wrapping(num_sites: int) -> None:
    codec = FixedPointCodec(bits=20, scale=8.0)
    limit = codec.site_limit(num_sites)
    for sign in (1.0, -1.0):
        encoded = [
            codec.encode(np.array([sign * limit]), SeededRandom(i)) for i in range(num_sites)
        ]
        assert codec.decode(codec.sum(encoded))[0] == pytest.approx(
            sign * limit * num_sites, abs=num_sites / codec.scale
        )
