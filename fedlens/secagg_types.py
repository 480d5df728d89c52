"""Messages of the secure-aggregation protocol (protocol version 2), as frozen dataclasses.

The state machines in :mod:`privacy.secagg_site` and :mod:`privacy.secagg_server` consume
and produce these; :mod:`fedlens.wire` converts them to and from protobuf. Keys are raw
bytes; no private key ever appears in one of these messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "EncryptedShare",
    "RevealedShare",
    "SecAggPhase",
    "ShareKind",
    "SignedKeys",
    "UnmaskRequest",
]


class SecAggPhase(enum.Enum):
    """Phases of a round at the aggregator, in order; ``COMPLETE`` and ``ABORTED`` end it."""

    ADVERTISING = "advertising"
    SHARING = "sharing"
    COLLECTING = "collecting"
    UNMASKING = "unmasking"
    COMPLETE = "complete"
    ABORTED = "aborted"

    @property
    def finished(self) -> bool:
        return self in (SecAggPhase.COMPLETE, SecAggPhase.ABORTED)


class ShareKind(enum.Enum):
    """Which secret a revealed share belongs to."""

    SELF_MASK = "self_mask"
    """A share of a surviving site's self-mask seed: removes its self mask from the sum."""
    PAIR_KEY = "pair_key"
    """A share of a dropped site's mask private key: recomputes its pairwise masks."""


@dataclass(frozen=True)
class SignedKeys:
    """A site's two X25519 public keys for one round, signed with its Ed25519 identity.

    Attributes
    ----------
    cipher_public
        32 bytes; agreed with a peer's cipher key, it encrypts the shares between them.
    mask_public
        32 bytes; agreed with a peer's mask key, it seeds their pairwise mask.
    signature
        64-byte Ed25519 signature over :func:`privacy.secagg_crypto.advertisement_payload`.
    """

    round_id: str
    site_id: str
    cipher_public: bytes
    mask_public: bytes
    signature: bytes

    def __repr__(self) -> str:
        return f"SignedKeys(round_id={self.round_id!r}, site_id={self.site_id!r})"


@dataclass(frozen=True)
class EncryptedShare:
    """Shares of the sender's two secrets for one receiver, sealed with AES-GCM.

    The associated data binds the round, the sender and the receiver, so the aggregator
    cannot redirect or replay a ciphertext into another round or to another site.
    """

    round_id: str
    sender: str
    receiver: str
    ciphertext: bytes

    def __repr__(self) -> str:
        return (
            f"EncryptedShare(round_id={self.round_id!r}, sender={self.sender!r}, "
            f"receiver={self.receiver!r}, {len(self.ciphertext)} bytes)"
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """Which sites' inputs are in the sum (``survivors``) and which dropped after sharing."""

    round_id: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class RevealedShare:
    """One Shamir share that ``sender`` holds of ``owner``'s secret, revealed to unmask."""

    round_id: str
    sender: str
    owner: str
    kind: ShareKind
    share: bytes

    def __repr__(self) -> str:
        return (
            f"RevealedShare(round_id={self.round_id!r}, sender={self.sender!r}, "
            f"owner={self.owner!r}, kind={self.kind.value})"
        )
