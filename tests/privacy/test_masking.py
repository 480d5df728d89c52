"""Pairwise masks: cancellation, agreement of both parties, rejection, known answers."""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlens.errors import ConfigurationError, IntegrityError
from privacy import FixedPointCodec, KeyPair, SeededRandom, generate_keypair, mask_vector
from privacy import pairwise_mask as mask

# RFC 7748 §6.1 test vector.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def keypair_from(private: bytes) -> KeyPair:
    return KeyPair.from_private_key(X25519PrivateKey.from_private_bytes(private))


def keypair_for(seed: int, index: int) -> KeyPair:
    return keypair_from(hashlib.sha256(f"{seed}/{index}".encode()).digest())


# -- independent reference implementations (RFC 5869 HKDF, RFC 8439 ChaCha20) ------------


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


def _rotl(v: int, c: int) -> int:
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


COLUMNS = [(0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)]
DIAGONALS = [(0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)]


def chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    constants = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    state = [*constants, *struct.unpack("<8L", key), counter, *struct.unpack("<3L", nonce)]
    x = list(state)

    def quarter(a: int, b: int, c: int, d: int) -> None:
        x[a] = (x[a] + x[b]) & 0xFFFFFFFF
        x[d] = _rotl(x[d] ^ x[a], 16)
        x[c] = (x[c] + x[d]) & 0xFFFFFFFF
        x[b] = _rotl(x[b] ^ x[c], 12)
        x[a] = (x[a] + x[b]) & 0xFFFFFFFF
        x[d] = _rotl(x[d] ^ x[a], 8)
        x[c] = (x[c] + x[d]) & 0xFFFFFFFF
        x[b] = _rotl(x[b] ^ x[c], 7)

    for _ in range(10):
        for indices in COLUMNS + DIAGONALS:
            quarter(*indices)
    return struct.pack("<16L", *[(a + b) & 0xFFFFFFFF for a, b in zip(x, state, strict=True)])


def test_reference_chacha20_matches_rfc_8439() -> None:
    # RFC 8439 §2.3.2 block function test vector.
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a00000000")
    block = chacha20_block(key, 1, nonce)
    assert block[:16].hex() == "10f1e7e4d13b5915500fdd1fa32071c4"


def test_x25519_keys_match_rfc_7748() -> None:
    alice, bob = keypair_from(ALICE_PRIVATE), keypair_from(BOB_PRIVATE)
    assert alice.public_bytes == ALICE_PUBLIC and bob.public_bytes == BOB_PUBLIC


def test_mask_derivation_known_answer() -> None:
    alice = keypair_from(ALICE_PRIVATE)
    got = mask(alice, "site-b", "site-a", BOB_PUBLIC, "round-1", length=20, bits=32)
    seed = hkdf_sha256(
        SHARED,
        salt=hashlib.sha256(b"round-1").digest(),
        info=b"fedlens/v1 pairwise-mask site-a\x00site-b",
        length=32,
    )
    stream = b"".join(chacha20_block(seed, counter, bytes(12)) for counter in range(3))
    expected = [w & 0xFFFFFFFF for w in struct.unpack("<20Q", stream[:160])]
    assert got.dtype == np.uint64
    assert got.tolist() == expected
    # Pinned so that any change of the derivation is noticed (it would break rounds with
    # sites on different versions); Bob derives the same words, here at 62 bits.
    assert got[:4].tolist() == [2635609706, 559622276, 3524433984, 350260802]
    bob = keypair_from(BOB_PRIVATE)
    wide = mask(bob, "site-a", "site-b", ALICE_PUBLIC, "round-1", length=4, bits=62)
    assert wide.tolist() == [
        2962605882922776170,
        4424978018193844356,
        148683898636900416,
        563809308008025666,
    ]
    assert ((wide & np.uint64(0xFFFFFFFF)) == got[:4]).all()


def test_both_parties_derive_the_same_mask() -> None:
    a, b = generate_keypair(), generate_keypair()
    from_a = mask(a, "alpha", "beta", b.public_bytes, "r9", 100, 61)
    from_b = mask(b, "beta", "alpha", a.public_bytes, "r9", 100, 61)
    assert np.array_equal(from_a, from_b)
    assert (from_a < np.uint64(1 << 61)).all()


def test_masks_differ_across_rounds_and_pairs() -> None:
    a, b, c = (keypair_for(0, i) for i in range(3))
    ab = mask(a, "a", "b", b.public_bytes, "r1", 64, 32)
    assert not np.array_equal(ab, mask(a, "a", "b", b.public_bytes, "r2", 64, 32))
    assert not np.array_equal(ab, mask(a, "a", "c", c.public_bytes, "r1", 64, 32))
    # The ids are bound too, not only the keys.
    assert not np.array_equal(ab, mask(a, "a", "b2", b.public_bytes, "r1", 64, 32))


@settings(max_examples=40, deadline=None)
@given(
    sites=st.integers(2, 8),
    length=st.integers(0, 40),
    bits=st.integers(2, 62),
    seed=st.integers(0, 2**32),
    round_id=st.text(min_size=0, max_size=8),
)
def test_masked_sum_equals_plain_sum(
    sites: int, length: int, bits: int, seed: int, round_id: str
) -> None:
    ids = [f"site-{i}" for i in range(sites)]
    keys = {site: keypair_for(seed, i) for i, site in enumerate(ids)}
    public = {site: keys[site].public_bytes for site in ids}
    rng = np.random.default_rng(seed)
    vectors = {site: rng.integers(0, 1 << bits, length, dtype=np.uint64) for site in ids}
    codec = FixedPointCodec(bits=bits, scale=1.0)
    masked = [mask_vector(vectors[site], keys[site], site, public, round_id, bits) for site in ids]
    for vector in masked:
        assert vector.dtype == np.uint64 and vector.shape == (length,)
        assert (vector < np.uint64(1 << bits)).all()
    assert np.array_equal(codec.sum(masked), codec.sum(vectors.values()))


def test_real_valued_round_recovers_the_sum_of_encodings() -> None:
    codec = FixedPointCodec.choose(num_sites=4, max_abs=10.0, precision=1e-4)
    ids = ["h1", "h2", "h3", "h4"]
    keys = {site: generate_keypair() for site in ids}
    public = {site: keys[site].public_bytes for site in ids}
    rng = SeededRandom(5)
    values = {site: rng.normal(50, 3.0).clip(-10, 10) for site in ids}
    masked = [
        mask_vector(codec.encode(values[s], rng), keys[s], s, public, "r", codec.bits) for s in ids
    ]
    total = codec.decode(codec.sum(masked))
    assert np.allclose(total, sum(values.values()), atol=4 * 1e-4)


def test_a_single_masked_vector_looks_nothing_like_its_input() -> None:
    bits = 32
    codec = FixedPointCodec(bits=bits, scale=2.0**16)
    values = np.linspace(-5, 5, 2000)
    encoded = codec.encode(values, SeededRandom(0))
    own, peer = generate_keypair(), generate_keypair()
    masked = mask_vector(encoded, own, "site-0", {"site-1": peer.public_bytes}, "r1", bits)
    assert np.mean(masked == encoded) < 0.01
    decoded = codec.decode(masked)
    assert abs(np.corrcoef(decoded, values)[0, 1]) < 0.1
    # Uniform over the ring: about half the decoded values are negative, spread widely.
    assert 0.4 < np.mean(decoded < 0) < 0.6
    assert np.abs(decoded).max() > 1000 * np.abs(values).max()


def test_own_id_among_peers_is_skipped() -> None:
    own, peer = generate_keypair(), generate_keypair()
    vector = np.arange(10, dtype=np.uint64)
    with_self = mask_vector(
        vector, own, "a", {"a": own.public_bytes, "b": peer.public_bytes}, "r", 16
    )
    without = mask_vector(vector, own, "a", {"b": peer.public_bytes}, "r", 16)
    assert np.array_equal(with_self, without)
    assert np.array_equal(mask_vector(vector, own, "a", {}, "r", 16), vector)


@pytest.mark.parametrize(
    ("peer_public", "match"),
    [
        (bytes(31), "32 bytes, got 31"),
        (bytes(33), "32 bytes, got 33"),
        (bytes(32), "not a usable X25519 key"),  # low-order point: all-zero secret
        ((1).to_bytes(32, "little"), "not a usable X25519 key"),
    ],
)
def test_bad_peer_keys_are_rejected(peer_public: bytes, match: str) -> None:
    own = generate_keypair()
    with pytest.raises(IntegrityError, match=match):
        mask(own, "a", "b", peer_public, "r", 4, 16)
    with pytest.raises(IntegrityError, match=match):
        mask_vector(np.zeros(4, dtype=np.uint64), own, "a", {"b": peer_public}, "r", 16)


def test_own_key_and_own_id_are_rejected() -> None:
    own = generate_keypair()
    with pytest.raises(IntegrityError, match="own key"):
        mask(own, "a", "b", own.public_bytes, "r", 4, 16)
    with pytest.raises(IntegrityError, match="equals this site's id"):
        mask(own, "a", "a", generate_keypair().public_bytes, "r", 4, 16)
    with pytest.raises(IntegrityError, match="NUL"):
        mask(own, "a", "b\x00c", generate_keypair().public_bytes, "r", 4, 16)


def test_invalid_vectors_and_parameters() -> None:
    own, peer = generate_keypair(), generate_keypair()
    peers = {"b": peer.public_bytes}
    with pytest.raises(IntegrityError, match="outside"):
        mask_vector(np.array([1 << 16], dtype=np.uint64), own, "a", peers, "r", 16)
    with pytest.raises(IntegrityError, match="1-D integer"):
        mask_vector(np.zeros(3), own, "a", peers, "r", 16)
    with pytest.raises(ConfigurationError, match="bits"):
        mask(own, "a", "b", peer.public_bytes, "r", 4, 63)
    with pytest.raises(ConfigurationError, match="length"):
        mask(own, "a", "b", peer.public_bytes, "r", -1, 16)


def test_repr_does_not_reveal_the_private_key() -> None:
    pair = keypair_from(ALICE_PRIVATE)
    text = repr(pair) + str(pair)
    assert ALICE_PRIVATE.hex() not in text
    assert "private" not in text.lower()
    assert ALICE_PUBLIC.hex() in text
