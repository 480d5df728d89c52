"""A site's side of one secure-aggregation round (Bonawitz et al. CCS 2017, protocol v2).

The site moves through four steps, each consuming what the aggregator relayed and
producing the next message; it keeps every secret of the round in memory and never
sends one unencrypted:

1. :meth:`SiteSession.advertise` — fresh X25519 *cipher* and *mask* key pairs, signed
   with the site's Ed25519 identity.
2. :meth:`SiteSession.share_keys` — verify the neighbours' signed keys, draw a self-mask
   seed ``b``, Shamir-share ``b`` and the mask private key among the closed neighbourhood,
   and seal each neighbour's two shares with AES-GCM under a key agreed with it.
3. :meth:`SiteSession.masked_input` — open the shares sent to this site, then add the
   self mask ``PRG(b)`` and, for every neighbour that shared, the pairwise mask (added
   towards greater ids, subtracted towards smaller ones) to the encoded input.
4. :meth:`SiteSession.unmask` — reveal, for each neighbour, the share of its self-mask
   seed if the aggregator says it survived, or of its mask key if it says it dropped;
   never both for one peer (asking for both would let the aggregator unmask that peer's
   input), and nothing at all if fewer than ``threshold`` inputs would be summed.

Guarantees, against an honest-but-curious aggregator and up to ``threshold - 1`` sites
colluding with it (fewer than a share threshold within each neighbourhood with SecAgg+):
the aggregator learns the sum of the surviving inputs and nothing else about any one
input. Each step may run once; a repeated or out-of-order call raises
:class:`~fedlens.errors.StaleRoundError`.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedlens.errors import DropoutError, IntegrityError, StaleRoundError
from fedlens.secagg_types import EncryptedShare, RevealedShare, ShareKind, SignedKeys
from privacy import secagg_crypto as crypto
from privacy.secagg_params import SecAggParams
from privacy.shamir import Share, split_secret

__all__ = ["SiteSession"]

_SHARE_BYTES = 68  # privacy.shamir.Share.to_bytes(): 2-byte x and 66-byte y


class _Step(enum.Enum):
    NEW = 0
    ADVERTISED = 1
    SHARED = 2
    MASKED = 3
    UNMASKED = 4


class SiteSession:
    """One site in one round. Single use: every step runs at most once, in order.

    Parameters
    ----------
    params
        The round's parameters.
    site_id
        This site; one of ``params.site_ids``.
    identity
        The site's enrolled Ed25519 identity key, which signs its advertisement.
    token_bytes
        Source of secret randomness (self-mask seed, Shamir coefficients); the OS CSPRNG
        unless a test passes a seeded source.
    """

    def __init__(
        self,
        params: SecAggParams,
        site_id: str,
        identity: Ed25519PrivateKey,
        *,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if site_id not in params.site_ids:
            raise IntegrityError(f"site {site_id!r} is not in round {params.round_id}")
        self.params = params
        self.site_id = site_id
        self._identity = identity
        self._token_bytes = token_bytes
        self._step = _Step.NEW
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._peers: dict[str, SignedKeys] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (self-mask, key) share
        self._seed = b""

    def __repr__(self) -> str:
        return f"SiteSession(round_id={self.params.round_id!r}, site_id={self.site_id!r})"

    @property
    def identity_public(self) -> bytes:
        """The site's raw 32-byte Ed25519 identity key, as enrolled at the coordinator."""
        return crypto.raw_public(self._identity)

    def _advance(self, expected: _Step, to: _Step) -> None:
        if self._step is not expected:
            raise StaleRoundError(
                f"site {self.site_id}: step {to.name.lower()} called after "
                f"{self._step.name.lower()}; each step runs once, in order"
            )
        self._step = to

    # -- step 1 ------------------------------------------------------------------

    def advertise(self) -> SignedKeys:
        self._advance(_Step.NEW, _Step.ADVERTISED)
        cipher_public = crypto.raw_public(self._cipher_key)
        mask_public = crypto.raw_public(self._mask_key)
        signature = crypto.sign_advertisement(
            self._identity,
            round_id=self.params.round_id,
            site_id=self.site_id,
            cipher_public=cipher_public,
            mask_public=mask_public,
        )
        return SignedKeys(self.params.round_id, self.site_id, cipher_public, mask_public, signature)

    # -- step 2 ------------------------------------------------------------------

    def share_keys(
        self, advertised: Mapping[str, SignedKeys], identities: Mapping[str, bytes]
    ) -> tuple[EncryptedShare, ...]:
        """Verify the neighbours' keys and seal this site's shares for each of them.

        Parameters
        ----------
        advertised
            The signed keys of every neighbour that advertised, this site's own included.
        identities
            Each neighbour's Ed25519 identity public key (raw 32 bytes).

        Raises
        ------
        IntegrityError
            A key set is not this site's neighbourhood, a signature does not verify, a
            key is reused, or this site's own keys were altered.
        DropoutError
            Fewer neighbours advertised than the share threshold.
        """
        self._advance(_Step.ADVERTISED, _Step.SHARED)
        round_id = self.params.round_id
        closed = self.params.closed(self.site_id)
        unexpected = sorted(set(advertised) - closed)
        if unexpected:
            raise IntegrityError(
                f"keys relayed for sites outside this site's neighbourhood: {unexpected}"
            )
        own = advertised.get(self.site_id)
        if own is None or (own.cipher_public, own.mask_public) != (
            crypto.raw_public(self._cipher_key),
            crypto.raw_public(self._mask_key),
        ):
            raise IntegrityError(f"round {round_id}: this site's own keys were not relayed intact")
        threshold = self.params.share_threshold(self.site_id)
        if len(advertised) < threshold:
            raise DropoutError(
                f"round {round_id}: {len(advertised)} of this site's neighbourhood advertised "
                f"keys, fewer than the {threshold} needed"
            )
        seen: set[bytes] = set()
        for site, keys in advertised.items():
            if keys.site_id != site or keys.round_id != round_id:
                raise IntegrityError(
                    f"keys relayed for {site!r} name {keys.site_id!r}/{keys.round_id!r}"
                )
            if site not in identities:
                raise IntegrityError(f"no enrolled identity for site {site!r}")
            crypto.verify_advertisement(
                identities[site],
                keys.signature,
                round_id=round_id,
                site_id=site,
                cipher_public=keys.cipher_public,
                mask_public=keys.mask_public,
            )
            for key in (keys.cipher_public, keys.mask_public):
                if key in seen:
                    raise IntegrityError(f"site {site!r} advertised a key another site also uses")
                seen.add(key)
        self._peers = dict(advertised)
        members = sorted(advertised, key=self.params.x_coordinate.__getitem__)
        xs = [self.params.x_coordinate[site] for site in members]
        self._seed = self._token_bytes(crypto.KEY_BYTES)
        seed_shares = split_secret(self._seed, threshold, xs, token_bytes=self._token_bytes)
        key_shares = split_secret(
            crypto.raw_private(self._mask_key), threshold, xs, token_bytes=self._token_bytes
        )
        sealed = []
        for site, seed_share, key_share in zip(members, seed_shares, key_shares, strict=True):
            plaintext = seed_share.to_bytes() + key_share.to_bytes()
            if site == self.site_id:
                self._held[site] = (seed_share.to_bytes(), key_share.to_bytes())
                continue
            key = self._seal_key(site)
            ciphertext = crypto.seal(
                key, plaintext, round_id=round_id, sender=self.site_id, receiver=site
            )
            sealed.append(EncryptedShare(round_id, self.site_id, site, ciphertext))
        return tuple(sealed)

    def _seal_key(self, peer: str) -> bytes:
        return crypto.agree(
            self._cipher_key,
            self._peers[peer].cipher_public,
            round_id=self.params.round_id,
            own_id=self.site_id,
            peer_id=peer,
            label=crypto.LABEL_SHARE_SEAL,
        )

    # -- step 3 ------------------------------------------------------------------

    def masked_input(self, encoded: np.ndarray, received: Sequence[EncryptedShare]) -> np.ndarray:
        """Open the shares sent to this site and mask its encoded input.

        Parameters
        ----------
        encoded
            ``(length,)`` unsigned vector with entries in ``[0, 2**bits)``.
        received
            The sealed shares every neighbour that completed step 2 sent this site.

        Returns
        -------
        numpy.ndarray
            ``(length,)`` uint64, the masked vector to submit.
        """
        self._advance(_Step.SHARED, _Step.MASKED)
        params = self.params
        values = np.asarray(encoded)
        if values.shape != (params.length,) or values.dtype.kind not in "ui":
            raise IntegrityError(
                f"input must be a ({params.length},) integer vector, got {values.dtype} "
                f"{values.shape}"
            )
        if values.size and (int(values.min()) < 0 or int(values.max()) >= 1 << params.bits):
            raise IntegrityError(f"input holds entries outside [0, 2**{params.bits})")
        for item in received:
            if item.round_id != params.round_id or item.receiver != self.site_id:
                raise IntegrityError(
                    f"shares relayed from {item.sender!r} are not for this site and round"
                )
            if item.sender not in self._peers or item.sender == self.site_id:
                raise IntegrityError(
                    f"shares relayed from {item.sender!r}, which did not advertise keys"
                )
            if item.sender in self._held:
                raise IntegrityError(f"shares from {item.sender!r} relayed twice")
            plaintext = crypto.open_sealed(
                self._seal_key(item.sender),
                item.ciphertext,
                round_id=params.round_id,
                sender=item.sender,
                receiver=self.site_id,
            )
            if len(plaintext) != 2 * _SHARE_BYTES:
                raise IntegrityError(f"shares from {item.sender!r} have the wrong length")
            for part in (plaintext[:_SHARE_BYTES], plaintext[_SHARE_BYTES:]):
                if Share.from_bytes(part).x != params.x_coordinate[self.site_id]:
                    raise IntegrityError(f"shares from {item.sender!r} are for another site")
            self._held[item.sender] = (plaintext[:_SHARE_BYTES], plaintext[_SHARE_BYTES:])
        threshold = params.share_threshold(self.site_id)
        if len(self._held) < threshold:
            raise DropoutError(
                f"round {params.round_id}: {len(self._held)} of this site's neighbourhood "
                f"shared keys, fewer than the {threshold} needed"
            )
        modulus = np.uint64((1 << params.bits) - 1)
        masked = values.astype(np.uint64)
        masked += crypto.self_mask(
            self._seed, round_id=params.round_id, length=params.length, bits=params.bits
        )
        own = self.site_id.encode()
        for peer in self._held:
            if peer == self.site_id:
                continue
            mask = crypto.expand_mask(self._pair_key(peer), params.length, params.bits)
            if peer.encode() > own:
                masked += mask
            else:
                masked -= mask
        masked &= modulus
        return masked

    def _pair_key(self, peer: str) -> bytes:
        return crypto.agree(
            self._mask_key,
            self._peers[peer].mask_public,
            round_id=self.params.round_id,
            own_id=self.site_id,
            peer_id=peer,
            label=crypto.LABEL_PAIR_MASK,
        )

    # -- step 4 ------------------------------------------------------------------

    def unmask(
        self, survivors: Collection[str], dropped: Collection[str]
    ) -> tuple[RevealedShare, ...]:
        """The shares that let the aggregator remove the masks, and nothing more.

        Raises
        ------
        IntegrityError
            A site is named both surviving and dropped, this site is not among the
            survivors, or a name is repeated.
        DropoutError
            Fewer than ``threshold`` survivors: the sum would expose too few inputs.
        """
        self._advance(_Step.MASKED, _Step.UNMASKED)
        params = self.params
        alive, gone = set(survivors), set(dropped)
        if len(alive) != len(survivors) or len(gone) != len(dropped):
            raise IntegrityError("the unmask request names a site twice")
        both = sorted(alive & gone)
        if both:
            raise IntegrityError(
                f"the aggregator asked for both the self-mask and the mask-key shares of "
                f"{both}; revealing both would expose their inputs"
            )
        if self.site_id not in alive:
            raise IntegrityError(f"the unmask request does not count {self.site_id} as surviving")
        if len(alive) < params.threshold:
            raise DropoutError(
                f"round {params.round_id}: only {len(alive)} inputs would be summed, fewer "
                f"than the threshold {params.threshold}; revealing nothing"
            )
        revealed = []
        for owner, (seed_share, key_share) in sorted(self._held.items()):
            if owner in alive:
                kind, share = ShareKind.SELF_MASK, seed_share
            elif owner in gone:
                kind, share = ShareKind.PAIR_KEY, key_share
            else:
                continue
            revealed.append(RevealedShare(params.round_id, self.site_id, owner, kind, share))
        self._held.clear()
        self._seed = b""
        return tuple(revealed)
