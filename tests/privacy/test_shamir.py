"""Shamir sharing: reconstruction, secrecy below the threshold, corruption, known answers."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlens.errors import ConfigurationError, IntegrityError
from privacy import FIELD_PRIME, SHARE_BYTES, Share, combine_shares, split_secret

P = 2**521 - 1


def fixed_tokens(*values: int) -> Callable[[int], bytes]:
    """A token source that returns the given integers as 66-byte words, then fails."""
    words = iter(values)

    def token_bytes(size: int) -> bytes:
        assert size == SHARE_BYTES
        return next(words).to_bytes(size, "big")

    return token_bytes


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


@st.composite
def sharings(draw: st.DrawFn) -> tuple[bytes, int, list[int], int]:
    """A secret, a threshold, distinct xs and a seed for the coefficients."""
    secret = draw(st.binary(max_size=64))
    n = draw(st.integers(1, 12))
    threshold = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, 0xFFFF), min_size=n, max_size=n, unique=True))
    return secret, threshold, xs, draw(st.integers(0, 2**32))


# -- known answers ----------------------------------------------------------------------


def test_known_answer_small_polynomial() -> None:
    # f(X) = 1234 + 166 X + 94 X^2, by hand: f(1) = 1494, f(2) = 1234 + 332 + 376 = 1942,
    # f(3) = 1234 + 498 + 846 = 2578, f(4) = 1234 + 664 + 1504 = 3402,
    # f(5) = 1234 + 830 + 2350 = 4414.
    # The token source first offers p itself (rejected), then 166 with the 7 bits above
    # bit 520 set (masked off), then 94.
    tokens = fixed_tokens(P, (0x7F << 521) | 166, 94)
    shares = split_secret((1234).to_bytes(2, "big"), 3, [1, 2, 3, 4, 5], token_bytes=tokens)
    assert [(s.x, s.y) for s in shares] == [(1, 1494), (2, 1942), (3, 2578), (4, 3402), (5, 4414)]
    for subset in ([0, 1, 2], [4, 2, 0], [1, 3, 4]):
        chosen = [shares[i] for i in subset]
        assert combine_shares(chosen, 3, 2) == b"\x04\xd2"
    assert combine_shares(shares, 3, 2) == b"\x04\xd2"


def test_known_answer_reduces_modulo_p() -> None:
    # f(X) = 5 + (p - 1) X = 5 - X (mod p): f(1) = 4, f(2) = 3, f(7) = p - 2.
    shares = split_secret(b"\x05", 2, [1, 2, 7], token_bytes=fixed_tokens(P - 1))
    assert [(s.x, s.y) for s in shares] == [(1, 4), (2, 3), (7, P - 2)]
    assert combine_shares(shares[1:], 2, 1) == b"\x05"


def test_known_answer_encoding() -> None:
    share = Share(x=0x0102, y=(1 << 520) | 0xAB)
    encoded = share.to_bytes()
    assert encoded == b"\x01\x02" + b"\x01" + bytes(64) + b"\xab"
    assert len(encoded) == 68
    assert Share.from_bytes(encoded) == share
    assert FIELD_PRIME == P


def test_threshold_one_hands_out_the_secret() -> None:
    shares = split_secret(b"key", 1, [9, 3], token_bytes=fixed_tokens())
    assert {s.y for s in shares} == {int.from_bytes(b"key", "big")}
    assert combine_shares(shares[1:], 1, 3) == b"key"


# -- properties ---------------------------------------------------------------------------


@given(sharings(), st.randoms(use_true_random=False))
def test_any_threshold_subset_reconstructs(
    case: tuple[bytes, int, list[int], int], rnd: random.Random
) -> None:
    secret, threshold, xs, seed = case
    shares = split_secret(secret, threshold, xs, token_bytes=seeded(seed))
    assert [s.x for s in shares] == xs
    subset = rnd.sample(shares, threshold)
    assert combine_shares(subset, threshold, len(secret)) == secret
    assert combine_shares(shares, threshold, len(secret)) == secret


@given(sharings())
def test_fewer_than_threshold_are_refused(case: tuple[bytes, int, list[int], int]) -> None:
    secret, threshold, xs, seed = case
    shares = split_secret(secret, threshold, xs, token_bytes=seeded(seed))
    with pytest.raises(IntegrityError, match="needed"):
        combine_shares(shares[: threshold - 1], threshold, len(secret))


def _mul_poly(a: Sequence[int], b: Sequence[int]) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            out[i + j] = (out[i + j] + ai * bj) % P
    return out


@given(
    st.binary(max_size=64),
    st.binary(max_size=64),
    st.integers(2, 8),
    st.lists(st.integers(1, 0xFFFF), min_size=8, max_size=8, unique=True),
    st.lists(st.integers(0, P - 1), min_size=7, max_size=7),
)
def test_below_threshold_shares_are_independent_of_the_secret(
    secret: bytes, other: bytes, threshold: int, xs: list[int], coefficients: list[int]
) -> None:
    # For the t - 1 parties at xs[:t-1], the map a -> a' below is a bijection of the
    # coefficient space that turns every sharing of `secret` into a sharing of `other`
    # with the same t - 1 shares: g = f + (other - secret) * prod_j (1 - X / x_j).
    # Uniform coefficients therefore give the same share distribution for both secrets.
    seen = xs[: threshold - 1]
    a = coefficients[: threshold - 1]
    vanishing = [1]
    for x in seen:
        vanishing = _mul_poly(vanishing, [1, (-pow(x, -1, P)) % P])
    delta = int.from_bytes(other, "big") - int.from_bytes(secret, "big")
    shifted = [(a[k] + delta * vanishing[k + 1]) % P for k in range(threshold - 1)]

    original = split_secret(secret, threshold, xs, token_bytes=fixed_tokens(*a))
    moved = split_secret(other, threshold, xs, token_bytes=fixed_tokens(*shifted))
    assert original[: threshold - 1] == moved[: threshold - 1]
    assert combine_shares(moved, threshold, len(other)) == other


@given(sharings(), st.data())
def test_a_corrupted_share_among_extras_is_detected(
    case: tuple[bytes, int, list[int], int], data: st.DataObject
) -> None:
    secret, threshold, xs, seed = case
    shares = split_secret(secret, threshold, xs, token_bytes=seeded(seed))
    if len(shares) == threshold:
        xs_extra = data.draw(st.integers(1, 0xFFFF).filter(lambda x: x not in xs))
        shares += split_secret(secret, threshold, [*xs, xs_extra], token_bytes=seeded(seed))[-1:]
    # Any one corrupted share among more than t is caught, wherever it sits.
    index = data.draw(st.integers(0, len(shares) - 1))
    delta = data.draw(st.integers(1, P - 1))
    corrupted = list(shares)
    corrupted[index] = Share(x=shares[index].x, y=(shares[index].y + delta) % P)
    with pytest.raises(IntegrityError, match="inconsistent"):
        combine_shares(corrupted, threshold, len(secret))


@given(st.integers(1, 0xFFFF), st.integers(0, P - 1))
def test_share_bytes_round_trip(x: int, y: int) -> None:
    share = Share(x=x, y=y)
    encoded = share.to_bytes()
    assert len(encoded) == 2 + SHARE_BYTES
    assert Share.from_bytes(encoded) == share


@settings(max_examples=25)
@given(st.binary(min_size=1, max_size=8))
def test_leading_zero_bytes_are_restored_from_secret_len(tail: bytes) -> None:
    secret = b"\x00\x00" + tail
    shares = split_secret(secret, 2, [1, 2], token_bytes=seeded(0))
    assert combine_shares(shares, 2, len(secret)) == secret


# -- rejection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        bytes(67),
        bytes(69),
        b"",
        bytes(2) + (1).to_bytes(66, "big"),  # x = 0
        b"\x00\x01" + P.to_bytes(66, "big"),  # y = p
        b"\x00\x01" + b"\xff" * 66,  # y >= p
    ],
)
def test_from_bytes_rejects_malformed(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        Share.from_bytes(data)


@pytest.mark.parametrize("x, y", [(0, 1), (0x10000, 1), (True, 1), (1, -1), (1, P), (1, 1.0)])
def test_share_rejects_out_of_range_fields(x: object, y: object) -> None:
    with pytest.raises(IntegrityError):
        Share(x=x, y=y)  # type: ignore[arg-type]


def test_repr_hides_the_value() -> None:
    assert repr(Share(x=3, y=123456789)) == "Share(x=3)"


def test_duplicate_x_is_refused_when_combining() -> None:
    shares = split_secret(b"s", 2, [1, 2, 3], token_bytes=seeded(1))
    with pytest.raises(IntegrityError, match="x = 1"):
        combine_shares([shares[0], shares[0], shares[1]], 2, 1)


def test_value_too_long_for_secret_len_is_refused() -> None:
    shares = split_secret(b"\x01\x00", 2, [1, 2], token_bytes=seeded(2))
    with pytest.raises(IntegrityError, match="fit in 1 bytes"):
        combine_shares(shares, 2, 1)


def test_wrong_threshold_yields_garbage_that_is_refused() -> None:
    shares = split_secret(b"\x07" * 16, 3, [1, 2, 3, 4], token_bytes=seeded(3))
    # Interpolating a degree-2 polynomial as a line: the fourth share contradicts it.
    with pytest.raises(IntegrityError):
        combine_shares(shares[:3], 2, 16)


@pytest.mark.parametrize(
    "secret, threshold, xs, match",
    [
        (bytes(65), 1, [1], "at most 64"),
        (b"s", 0, [1, 2], "threshold"),
        (b"s", 3, [1, 2], "threshold"),
        (b"s", True, [1, 2], "threshold"),
        (b"s", 1, [1, 1], "distinct"),
        (b"s", 1, [0, 1], r"\[1, 65535\]"),
        (b"s", 1, [0x10000], r"\[1, 65535\]"),
        (b"s", 1, [], "threshold"),
    ],
)
def test_split_rejects_bad_settings(
    secret: bytes, threshold: int, xs: list[int], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        split_secret(secret, threshold, xs, token_bytes=seeded(0))


def test_split_rejects_a_short_token_source() -> None:
    with pytest.raises(ConfigurationError, match="66 bytes"):
        split_secret(b"s", 2, [1, 2], token_bytes=lambda n: bytes(n - 1))


@pytest.mark.parametrize("threshold, secret_len", [(0, 1), (True, 1), (1, -1), (1, 65)])
def test_combine_rejects_bad_settings(threshold: int, secret_len: int) -> None:
    shares = split_secret(b"s", 1, [1], token_bytes=seeded(0))
    with pytest.raises(ConfigurationError):
        combine_shares(shares, threshold, secret_len)
