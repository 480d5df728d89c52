"""Cryptographic building blocks of secure aggregation, protocol version 2.

Every derived key comes from HKDF-SHA256 with the round as salt and a distinct ``info``
label per purpose, so a key agreed for one purpose is never reused for another:

===========================  ==================================================
label                        derives
===========================  ==================================================
``fedlens/v2 pairwise-mask`` the ChaCha20 key of a pair's mask (mask keys)
``fedlens/v2 share-seal``    the AES-256-GCM key that seals shares between a pair
                             (cipher keys)
``fedlens/v2 self-mask``     the ChaCha20 key of a site's self mask, from its seed
===========================  ==================================================

For the pair labels the two site ids follow, ordered by their UTF-8 bytes and joined by
a NUL byte, so both parties derive the same key. Masks are the ChaCha20 keystream (zero
nonce; every key is used for exactly one stream) read as little-endian uint64 words and
reduced modulo ``2**bits``. Sealed shares are ``nonce (12 random bytes) || AES-GCM
ciphertext`` with associated data ``round || sender || receiver``; any failure to open one
raises the same :class:`~fedlens.errors.IntegrityError`, whatever went wrong.

Key advertisements are signed with the site's Ed25519 identity over
:func:`advertisement_payload`, which length-prefixes every field so that no two distinct
advertisements share a payload.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlens.errors import ConfigurationError, IntegrityError

__all__ = [
    "KEY_BYTES",
    "LABEL_PAIR_MASK",
    "LABEL_SELF_MASK",
    "LABEL_SHARE_SEAL",
    "SIGNATURE_BYTES",
    "advertisement_payload",
    "agree",
    "expand_mask",
    "open_sealed",
    "raw_private",
    "raw_public",
    "seal",
    "self_mask",
    "sign_advertisement",
    "verify_advertisement",
]

KEY_BYTES = 32
SIGNATURE_BYTES = 64
LABEL_PAIR_MASK = b"fedlens/v2 pairwise-mask"
LABEL_SHARE_SEAL = b"fedlens/v2 share-seal"
LABEL_SELF_MASK = b"fedlens/v2 self-mask"
_ADVERTISEMENT_DOMAIN = b"fedlens/v2 key-advertisement"
_NONCE_BYTES = 12
_MAX_BITS = 62
_CHUNK_BYTES = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK_BYTES))


def raw_public(private_key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    """The 32-byte raw public key of an X25519 or Ed25519 private key."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def raw_private(private_key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of an X25519 private key (to be secret-shared, never sent)."""
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _salt(round_id: str) -> bytes:
    return hashlib.sha256(round_id.encode("utf-8")).digest()


def _id(site_id: str) -> bytes:
    raw = site_id.encode("utf-8")
    if b"\x00" in raw or not raw:
        raise IntegrityError(f"site id {site_id!r} is empty or contains a NUL character")
    return raw


def agree(
    private_key: X25519PrivateKey,
    peer_public: bytes,
    *,
    round_id: str,
    own_id: str,
    peer_id: str,
    label: bytes,
) -> bytes:
    """A 32-byte key both sites of the pair derive from X25519 and HKDF-SHA256.

    Raises
    ------
    IntegrityError
        The peer key is not 32 bytes or is a low-order point, or the ids are equal.
    """
    own_b, peer_b = _id(own_id), _id(peer_id)
    if own_b == peer_b:
        raise IntegrityError(f"peer id {peer_id!r} equals the site's own id")
    if len(peer_public) != KEY_BYTES:
        raise IntegrityError(f"public key of {peer_id!r} must be 32 bytes, got {len(peer_public)}")
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as exc:
        raise IntegrityError(f"public key of {peer_id!r} is not a usable X25519 key") from exc
    first, second = sorted((own_b, peer_b))
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=_salt(round_id),
        info=label + b" " + first + b"\x00" + second,
    ).derive(shared)


def expand_mask(key: bytes, length: int, bits: int) -> np.ndarray:
    """``(length,)`` uint64 mask in ``[0, 2**bits)``: the ChaCha20 keystream of ``key``.

    The keystream is written straight into the result, a chunk at a time, so expanding
    a mask allocates nothing but the result itself.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ConfigurationError(f"length must be an integer >= 0, got {length!r}")
    if not 1 < bits <= _MAX_BITS:
        raise ConfigurationError(f"bits must be in [2, {_MAX_BITS}], got {bits}")
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    words = np.empty(length, dtype="<u8")
    out = words.data.cast("B")
    for start in range(0, len(out), _CHUNK_BYTES):
        stop = min(len(out), start + _CHUNK_BYTES)
        encryptor.update_into(_ZEROS[: stop - start], out[start:stop])
    words &= np.uint64((1 << bits) - 1)
    return words.view(np.uint64)


def self_mask(seed: bytes, *, round_id: str, length: int, bits: int) -> np.ndarray:
    """The self mask a site adds, expanded from its secret-shared 32-byte seed."""
    if len(seed) != KEY_BYTES:
        raise IntegrityError(f"self-mask seed must be 32 bytes, got {len(seed)}")
    key = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_salt(round_id), info=LABEL_SELF_MASK
    ).derive(seed)
    return expand_mask(key, length, bits)


def _associated(round_id: str, sender: str, receiver: str) -> bytes:
    return _fields(b"fedlens/v2 share", round_id.encode(), _id(sender), _id(receiver))


def seal(key: bytes, plaintext: bytes, *, round_id: str, sender: str, receiver: str) -> bytes:
    """``nonce || AES-GCM(key, plaintext)`` bound to the round, sender and receiver."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _associated(round_id, sender, receiver))


def open_sealed(key: bytes, sealed: bytes, *, round_id: str, sender: str, receiver: str) -> bytes:
    """The plaintext of :func:`seal`; one opaque :class:`IntegrityError` for every failure."""
    try:
        return AESGCM(key).decrypt(
            sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _associated(round_id, sender, receiver)
        )
    except (InvalidTag, ValueError):
        raise IntegrityError(
            f"sealed shares from {sender!r} to {receiver!r} in round {round_id!r} do not open"
        ) from None


def _fields(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def advertisement_payload(
    round_id: str, site_id: str, cipher_public: bytes, mask_public: bytes
) -> bytes:
    """The bytes a site signs to advertise its keys: every field length-prefixed."""
    return _fields(
        _ADVERTISEMENT_DOMAIN,
        round_id.encode("utf-8"),
        site_id.encode("utf-8"),
        bytes(cipher_public),
        bytes(mask_public),
    )


def sign_advertisement(
    identity: Ed25519PrivateKey,
    *,
    round_id: str,
    site_id: str,
    cipher_public: bytes,
    mask_public: bytes,
) -> bytes:
    """The 64-byte Ed25519 signature of an advertisement."""
    return identity.sign(advertisement_payload(round_id, site_id, cipher_public, mask_public))


def verify_advertisement(
    identity_public: bytes,
    signature: bytes,
    *,
    round_id: str,
    site_id: str,
    cipher_public: bytes,
    mask_public: bytes,
) -> None:
    """Check an advertisement's signature against the site's enrolled identity key.

    Raises
    ------
    IntegrityError
        The identity key is malformed, a public key is not 32 bytes, or the signature
        does not verify (one message for all of these, naming the site).
    """
    if len(cipher_public) != KEY_BYTES or len(mask_public) != KEY_BYTES:
        raise IntegrityError(
            f"keys advertised by {site_id!r} must be 32 bytes each, got "
            f"{len(cipher_public)} and {len(mask_public)}"
        )
    if hmac.compare_digest(bytes(cipher_public), bytes(mask_public)):
        raise IntegrityError(f"site {site_id!r} advertised the same key for both purposes")
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes(identity_public))
        key.verify(
            bytes(signature), advertisement_payload(round_id, site_id, cipher_public, mask_public)
        )
    except (InvalidSignature, ValueError):
        raise IntegrityError(
            f"the key advertisement of {site_id!r} in round {round_id!r} is not signed by "
            f"its enrolled identity"
        ) from None
