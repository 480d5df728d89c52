"""Pairwise additive masks of secure aggregation (Bonawitz et al., CCS 2017, §4).

Every pair of sites ``(u, v)`` agrees on a seed by X25519 Diffie–Hellman and expands it into
a mask vector ``m_uv`` modulo ``2**bits``. The site with the smaller id adds ``m_uv`` and
the other subtracts it, so the masks cancel in the sum of all sites' masked vectors while
each masked vector on its own is uniformly distributed to anyone who lacks both parties'
private keys.

Derivation, for sites ``a < b`` (ids ordered by their UTF-8 bytes, which is Unicode code
point order)::

    shared = X25519(own private key, peer public key)
    seed   = HKDF-SHA256(shared, length=32, salt=SHA-256(round_id),
                         info=b"fedlens/v1 pairwise-mask " + a + 0x00 + b)
    mask   = ChaCha20(key=seed, nonce=16 zero bytes) keystream, read as little-endian
             uint64 words, each reduced modulo 2**bits

Assumptions: the aggregator is honest-but-curious and relays authentic public keys
(signed key advertisements come with the full protocol); every site of the round submits
(this module has neither self masks nor secret-shared dropout recovery, so a missing site
leaves its pairs' masks in the sum and the round must be aborted). The all-zero nonce is
safe because every seed is used for exactly one keystream: the salt binds the round and the
info binds the pair. Keys should still be fresh per round.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlens.errors import ConfigurationError, IntegrityError
from privacy.fixedpoint import MAX_BITS

__all__ = [
    "MASK_INFO_LABEL",
    "PUBLIC_KEY_BYTES",
    "KeyPair",
    "generate_keypair",
    "mask_vector",
    "pairwise_mask",
]

PUBLIC_KEY_BYTES = 32
MASK_INFO_LABEL = b"fedlens/v1 pairwise-mask "
"""HKDF ``info`` prefix of pairwise mask seeds; the two site ids follow it."""

_ID_SEPARATOR = b"\x00"
_CHACHA_NONCE = bytes(16)


@dataclass(frozen=True, eq=False)
class KeyPair:
    """An X25519 key pair for one round. The private key never appears in ``repr``.

    Attributes
    ----------
    private_key
        The X25519 private key object.
    public_bytes
        The 32-byte raw public key, as advertised to the other sites.
    """

    private_key: X25519PrivateKey = field(repr=False)
    public_bytes: bytes

    def __repr__(self) -> str:
        return f"KeyPair(public_bytes={self.public_bytes.hex()})"

    @classmethod
    def from_private_key(cls, private_key: X25519PrivateKey) -> KeyPair:
        """The pair of an existing private key (for example one loaded from storage)."""
        public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(private_key=private_key, public_bytes=public)


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the operating system's CSPRNG."""
    return KeyPair.from_private_key(X25519PrivateKey.generate())


def pairwise_mask(
    own: KeyPair,
    own_id: str,
    peer_id: str,
    peer_public: bytes,
    round_id: str,
    length: int,
    bits: int,
) -> np.ndarray:
    """The mask that ``own_id`` and ``peer_id`` share in ``round_id``.

    Both parties obtain the same array: the X25519 secret is symmetric and the HKDF info
    orders the two ids.

    Parameters
    ----------
    own
        This site's key pair.
    own_id, peer_id
        Distinct site ids, without NUL characters.
    peer_public
        The peer's raw 32-byte X25519 public key.
    round_id
        The round; it salts the key derivation, so masks never repeat across rounds.
    length
        Number of coordinates, >= 0.
    bits
        Modulus exponent of the ring, in [2, 62].

    Returns
    -------
    numpy.ndarray
        ``(length,)`` uint64, entries in ``[0, 2**bits)``.

    Raises
    ------
    IntegrityError
        The peer key is not 32 bytes, equals this site's own key, or is a low-order
        point (all-zero shared secret); or the ids are equal or contain NUL.
    ConfigurationError
        ``length`` or ``bits`` is out of range.
    """
    _check_shape(length, bits)
    seed = _pair_seed(own, own_id, peer_id, peer_public, round_id)
    encryptor = Cipher(algorithms.ChaCha20(seed, _CHACHA_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    return words & np.uint64((1 << bits) - 1)


def mask_vector(
    encoded: np.ndarray,
    own: KeyPair,
    own_id: str,
    peers: Mapping[str, bytes],
    round_id: str,
    bits: int,
) -> np.ndarray:
    """Add this site's pairwise masks to its encoded vector, modulo ``2**bits``.

    For each peer ``p`` (``own_id`` itself is skipped if present) the mask shared with
    ``p`` is added when ``p > own_id`` and subtracted when ``p < own_id``. Summed over all
    sites of the round, the masks cancel: the sum of masked vectors equals the sum of the
    encoded vectors modulo ``2**bits``.

    Parameters
    ----------
    encoded
        ``(length,)`` unsigned integer vector with entries in ``[0, 2**bits)``.
    peers
        Site id to raw public key, for every site of the round.

    Returns
    -------
    numpy.ndarray
        ``(length,)`` uint64, entries in ``[0, 2**bits)``.

    Raises
    ------
    IntegrityError
        ``encoded`` is not a vector of ring elements, or a peer key or id is rejected as
        in :func:`pairwise_mask`.
    """
    values = np.asarray(encoded)
    if values.ndim != 1 or values.dtype.kind not in "ui":
        raise IntegrityError(
            f"encoded must be a 1-D integer vector, got {values.dtype} of shape {values.shape}"
        )
    _check_shape(values.size, bits)
    if values.size and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise IntegrityError(f"encoded holds entries outside [0, 2**{bits})")
    masked = values.astype(np.uint64)  # a copy; uint64 arithmetic wraps modulo 2**64
    for peer_id in sorted(peers, key=_id_bytes):
        if peer_id == own_id:
            continue
        mask = pairwise_mask(own, own_id, peer_id, peers[peer_id], round_id, values.size, bits)
        if _id_bytes(peer_id) > _id_bytes(own_id):
            masked += mask
        else:
            masked -= mask
    return masked & np.uint64((1 << bits) - 1)


def _pair_seed(own: KeyPair, own_id: str, peer_id: str, peer_public: bytes, round_id: str) -> bytes:
    """The 32-byte ChaCha20 key both parties of the pair derive."""
    own_b, peer_b = _id_bytes(own_id), _id_bytes(peer_id)
    if own_b == peer_b:
        raise IntegrityError(f"peer id {peer_id!r} equals this site's id")
    if not isinstance(peer_public, bytes | bytearray) or len(peer_public) != PUBLIC_KEY_BYTES:
        size = len(peer_public) if isinstance(peer_public, bytes | bytearray) else "not bytes"
        raise IntegrityError(f"public key of {peer_id!r} must be 32 bytes, got {size}")
    if hmac.compare_digest(bytes(peer_public), own.public_bytes):
        raise IntegrityError(f"public key of {peer_id!r} is this site's own key")
    try:
        shared = own.private_key.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as exc:
        raise IntegrityError(f"public key of {peer_id!r} is not a usable X25519 key") from exc
    first, second = sorted((own_b, peer_b))
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=hashlib.sha256(round_id.encode("utf-8")).digest(),
        info=MASK_INFO_LABEL + first + _ID_SEPARATOR + second,
    )
    return hkdf.derive(shared)


def _id_bytes(site_id: str) -> bytes:
    raw = site_id.encode("utf-8")
    if _ID_SEPARATOR in raw:
        raise IntegrityError(f"site id {site_id!r} contains a NUL character")
    return raw


def _check_shape(length: int, bits: int) -> None:
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 0:
        raise ConfigurationError(f"length must be an integer >= 0, got {length!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 < bits <= MAX_BITS:
        raise ConfigurationError(f"bits must be an integer in [2, {MAX_BITS}], got {bits!r}")
