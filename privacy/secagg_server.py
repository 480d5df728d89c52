"""The aggregator's side of one secure-aggregation round (Bonawitz et al. 2017, protocol v2).

Phases, each closing when every site still in the round has answered or at its deadline,
whichever comes first; at a deadline the round goes on with the sites that answered if
there are at least ``threshold`` of them, and aborts otherwise:

=============  ================================================  ===================
phase          accepts                                           survivors
=============  ================================================  ===================
ADVERTISING    signed key pairs, verified against identities     U1
SHARING        sealed shares, one per advertised neighbour       U2 ⊆ U1
COLLECTING     masked vectors, added to a running sum            U3 ⊆ U2
UNMASKING      revealed shares: self-mask seeds of U3,           U4 ⊆ U3
               mask keys of U2 \\ U3
=============  ================================================  ===================

Then the aggregator rebuilds each surviving site's self-mask seed and each dropped site's
mask key from a share threshold of shares, removes the self masks and the dropped sites'
pairwise masks, and obtains the sum of the U3 inputs modulo ``2**bits``. An abort reveals
nothing: the running sum is never decoded or returned.

Guarantees and assumptions: the aggregator is honest-but-curious; every message is fully
validated before any state changes, so a rejected message (wrong phase, duplicate, wrong
length, out of field, bad signature) leaves the round as it was. A second masked vector
from a site is refused as a duplicate even after the collecting phase closed, so a site
that retries a submission whose reply it lost can tell that it counted. Masked vectors
are added as they arrive and not kept, so memory is O(length) for the sum plus
O(n · degree) for keys and sealed shares. Time is passed in as ``now`` (wall-clock
seconds); a phase that ends at its deadline starts the next one at that deadline, not at
the moment someone noticed, so replaying the same calls with the same ``now`` values
rebuilds the same state (the coordinator relies on this to resume a round after a
restart).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedlens.errors import (
    ConfigurationError,
    DropoutError,
    DuplicateSubmissionError,
    IntegrityError,
    StaleRoundError,
)
from fedlens.secagg_types import (
    EncryptedShare,
    RevealedShare,
    SecAggPhase,
    ShareKind,
    SignedKeys,
    UnmaskRequest,
)
from privacy import secagg_crypto as crypto
from privacy.secagg_params import SecAggParams
from privacy.shamir import Share, combine_shares

__all__ = ["SEALED_SHARE_BYTES", "ServerSession"]

SEALED_SHARE_BYTES = 12 + 2 * 68 + 16
"""Nonce, two 68-byte Shamir shares, and the AES-GCM tag."""


class ServerSession:
    """The aggregator's state of one round. Not thread-safe: callers hold a lock.

    Parameters
    ----------
    params
        The round's parameters.
    now
        Wall-clock seconds at which the round opens.
    phase_timeout_s
        Seconds each phase may take.
    """

    def __init__(self, params: SecAggParams, *, now: float, phase_timeout_s: float) -> None:
        if not phase_timeout_s > 0:
            raise ConfigurationError(f"phase_timeout_s must be > 0, got {phase_timeout_s}")
        self.params = params
        self._timeout = phase_timeout_s
        self._phase = SecAggPhase.ADVERTISING
        self._deadline = now + phase_timeout_s
        self._withdrawn: dict[str, str] = {}
        self._keys: dict[str, SignedKeys] = {}
        self._shares: dict[str, tuple[EncryptedShare, ...]] = {}
        self._inbox: dict[str, list[EncryptedShare]] = {}
        self._submitted: list[str] = []
        self._revealed: dict[str, tuple[RevealedShare, ...]] = {}
        self._gathered: dict[tuple[str, ShareKind], list[Share]] = {}
        self._sum = np.zeros(params.length, dtype=np.uint64)
        self._modulus = np.uint64((1 << params.bits) - 1)
        self._result: np.ndarray | None = None
        self.reason = ""

    # -- queries -----------------------------------------------------------------

    @property
    def phase(self) -> SecAggPhase:
        return self._phase

    @property
    def deadline(self) -> float:
        return self._deadline

    @property
    def advertised(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    @property
    def shared(self) -> tuple[str, ...]:
        return tuple(sorted(self._shares))

    @property
    def submitted(self) -> tuple[str, ...]:
        return tuple(self._submitted)

    @property
    def unmasked(self) -> tuple[str, ...]:
        return tuple(sorted(self._revealed))

    @property
    def running_sum(self) -> np.ndarray:
        """The masked running sum, for persistence only (it reveals nothing on its own)."""
        return self._sum

    def result(self) -> np.ndarray:
        """The unmasked sum of the surviving inputs, ``(length,)`` uint64."""
        if self._result is None:
            raise StaleRoundError(f"round {self.params.round_id} is {self._phase.value}")
        return self._result

    def tick(self, now: float) -> SecAggPhase:
        """Close the current phase if its deadline has passed; the phase after."""
        while not self._phase.finished and now >= self._deadline:
            self._close(self._deadline, at_deadline=True)
        return self._phase

    def keys_for(self, site_id: str, *, now: float) -> dict[str, SignedKeys] | None:
        """The signed keys of the site's advertised closed neighbourhood, once known."""
        self._require(site_id, now)
        if self._phase is SecAggPhase.ADVERTISING:
            return None
        closed = self.params.closed(site_id)
        return {site: keys for site, keys in self._keys.items() if site in closed}

    def shares_for(self, site_id: str, *, now: float) -> tuple[EncryptedShare, ...] | None:
        """The sealed shares addressed to the site by every site that shared, once known."""
        self._require(site_id, now)
        if self._phase in (SecAggPhase.ADVERTISING, SecAggPhase.SHARING):
            return None
        return tuple(self._inbox.get(site_id, ()))

    def unmask_request(self, site_id: str, *, now: float) -> UnmaskRequest | None:
        """Survivors and dropped sites, once the collecting phase has closed."""
        self._require(site_id, now)
        if self._phase in (SecAggPhase.ADVERTISING, SecAggPhase.SHARING, SecAggPhase.COLLECTING):
            return None
        survivors = tuple(sorted(self._submitted))
        dropped = tuple(sorted(set(self._shares) - set(self._submitted)))
        return UnmaskRequest(self.params.round_id, survivors, dropped)

    # -- transitions ---------------------------------------------------------------

    def advertise(self, keys: SignedKeys, identity_public: bytes, *, now: float) -> None:
        """Accept a site's signed keys, checked against its enrolled identity key."""
        site = keys.site_id
        self._expect(site, SecAggPhase.ADVERTISING, now, keys.round_id)
        if site in self._keys:
            raise DuplicateSubmissionError(f"site {site} already advertised keys")
        crypto.verify_advertisement(
            identity_public,
            keys.signature,
            round_id=keys.round_id,
            site_id=site,
            cipher_public=keys.cipher_public,
            mask_public=keys.mask_public,
        )
        for other in self._keys.values():
            for key in (other.cipher_public, other.mask_public):
                if hmac.compare_digest(key, keys.cipher_public) or hmac.compare_digest(
                    key, keys.mask_public
                ):
                    raise IntegrityError(f"site {site} advertised a key {other.site_id} uses")
        self._keys[site] = keys
        self._maybe_close(now)

    def share(self, site_id: str, shares: Sequence[EncryptedShare], *, now: float) -> None:
        """Accept a site's sealed shares: exactly one per advertised neighbour."""
        self._expect(site_id, SecAggPhase.SHARING, now)
        if site_id not in self._keys:
            raise StaleRoundError(f"site {site_id} did not advertise keys in time")
        if site_id in self._shares:
            raise DuplicateSubmissionError(f"site {site_id} already sent its shares")
        expected = (self.params.closed(site_id) & set(self._keys)) - {site_id}
        receivers = [item.receiver for item in shares]
        if len(set(receivers)) != len(receivers) or set(receivers) != expected:
            raise IntegrityError(
                f"site {site_id} sent shares for {sorted(receivers)}, expected one for each "
                f"of {sorted(expected)}"
            )
        for item in shares:
            if item.sender != site_id or item.round_id != self.params.round_id:
                raise IntegrityError(f"a share from {site_id} names sender {item.sender!r}")
            if len(item.ciphertext) != SEALED_SHARE_BYTES:
                raise IntegrityError(
                    f"sealed share from {site_id} to {item.receiver} is "
                    f"{len(item.ciphertext)} bytes, expected {SEALED_SHARE_BYTES}"
                )
        self._shares[site_id] = tuple(shares)
        for item in shares:
            self._inbox.setdefault(item.receiver, []).append(item)
        self._maybe_close(now)

    def submit(self, site_id: str, values: np.ndarray | None, *, now: float) -> None:
        """Validate a masked vector completely, then add it to the running sum.

        ``values=None`` records the submission without adding anything; only a restore
        whose running sum already holds the vector may use it.
        """
        # Before the phase check: a retry whose first attempt closed the phase is a duplicate.
        if site_id in self._submitted:
            raise DuplicateSubmissionError(f"site {site_id} already submitted its vector")
        self._expect(site_id, SecAggPhase.COLLECTING, now)
        if site_id not in self._shares:
            raise StaleRoundError(f"site {site_id} did not share keys in time")
        if values is not None:
            array = np.asarray(values)
            if array.shape != (self.params.length,):
                raise IntegrityError(
                    f"vector from {site_id} has shape {array.shape}, expected "
                    f"({self.params.length},)"
                )
            if array.dtype != np.uint64:
                raise IntegrityError(f"vector from {site_id} has dtype {array.dtype}, not uint64")
            if array.size and int(array.max()) > int(self._modulus):
                raise IntegrityError(
                    f"vector from {site_id} has values outside the field [0, 2^{self.params.bits})"
                )
            self._sum += array
            self._sum &= self._modulus
        self._submitted.append(site_id)
        self._maybe_close(now)

    def restore_sum(self, running_sum: np.ndarray) -> None:
        """Put back a persisted running sum (after replaying submissions with no values)."""
        array = np.asarray(running_sum, dtype=np.uint64)
        if array.shape != self._sum.shape:
            raise IntegrityError(f"stored sum has shape {array.shape}, expected {self._sum.shape}")
        self._sum = array.copy()

    def unmask(self, site_id: str, revealed: Sequence[RevealedShare], *, now: float) -> None:
        """Accept a surviving site's revealed shares, checking each one's owner and kind."""
        self._expect(site_id, SecAggPhase.UNMASKING, now)
        if site_id not in self._submitted:
            raise StaleRoundError(f"site {site_id} did not submit a vector, so cannot unmask")
        if site_id in self._revealed:
            raise DuplicateSubmissionError(f"site {site_id} already revealed its shares")
        alive = set(self._submitted)
        closed = self.params.closed(site_id)
        owners = [item.owner for item in revealed]
        if len(set(owners)) != len(owners):
            raise IntegrityError(f"site {site_id} revealed two shares of one site")
        x = self.params.x_coordinate[site_id]
        parsed = []
        for item in revealed:
            if item.sender != site_id or item.round_id != self.params.round_id:
                raise IntegrityError(f"a revealed share from {site_id} names {item.sender!r}")
            if item.owner not in closed or item.owner not in self._shares:
                raise IntegrityError(
                    f"site {site_id} revealed a share of {item.owner!r}, which it holds none of"
                )
            wanted = ShareKind.SELF_MASK if item.owner in alive else ShareKind.PAIR_KEY
            if item.kind is not wanted:
                raise IntegrityError(
                    f"site {site_id} revealed a {item.kind.value} share of {item.owner}, "
                    f"expected {wanted.value}"
                )
            share = Share.from_bytes(item.share)
            if share.x != x:
                raise IntegrityError(f"site {site_id} revealed a share with another x-coordinate")
            parsed.append(((item.owner, item.kind), share))
        self._revealed[site_id] = tuple(revealed)
        for key, share in parsed:
            self._gathered.setdefault(key, []).append(share)
        self._maybe_close(now)

    def withdraw(self, site_id: str, reason: str, *, now: float) -> None:
        """A site leaves the round; it counts as dropped from the current phase on."""
        self._require(site_id, now)
        if self._phase.finished:
            raise StaleRoundError(f"round {self.params.round_id} is {self._phase.value}")
        self._withdrawn[site_id] = reason
        self._maybe_close(now)

    def abort(self, reason: str) -> None:
        if not self._phase.finished:
            self._phase = SecAggPhase.ABORTED
            self.reason = reason
            self._drop_bulk()

    def _drop_bulk(self) -> None:
        """Once the round has ended, keep only who took part: the running sum, sealed and
        revealed shares are no longer needed, and a long-lived aggregator keeps many
        finished rounds."""
        self._sum = np.zeros(0, dtype=np.uint64)
        self._shares = {site: () for site in self._shares}
        self._revealed = {site: () for site in self._revealed}
        self._inbox.clear()
        self._gathered.clear()

    # -- internals -------------------------------------------------------------------

    def _require(self, site_id: str, now: float) -> None:
        if site_id not in self.params.x_coordinate:
            raise IntegrityError(f"site {site_id!r} is not part of round {self.params.round_id}")
        self.tick(now)
        if self._phase is SecAggPhase.ABORTED:
            raise StaleRoundError(f"round {self.params.round_id} aborted: {self.reason}")

    def _expect(self, site_id: str, phase: SecAggPhase, now: float, round_id: str = "") -> None:
        if round_id and round_id != self.params.round_id:
            raise IntegrityError(f"message for round {round_id!r} sent to {self.params.round_id}")
        self._require(site_id, now)
        if site_id in self._withdrawn:
            raise StaleRoundError(f"site {site_id} withdrew from round {self.params.round_id}")
        if self._phase is not phase:
            raise StaleRoundError(
                f"round {self.params.round_id} is {self._phase.value}, not {phase.value}"
            )

    def _waiting_for(self) -> set[str]:
        """Sites still in the round that have not answered the current phase."""
        answered: Mapping[str, object] | Sequence[str]
        if self._phase is SecAggPhase.ADVERTISING:
            eligible, answered = set(self.params.site_ids), self._keys
        elif self._phase is SecAggPhase.SHARING:
            eligible, answered = set(self._keys), self._shares
        elif self._phase is SecAggPhase.COLLECTING:
            eligible, answered = set(self._shares), self._submitted
        else:
            eligible, answered = set(self._submitted), self._revealed
        return eligible - set(answered) - set(self._withdrawn)

    def _maybe_close(self, now: float) -> None:
        if not self._phase.finished and not self._waiting_for():
            self._close(now, at_deadline=False)

    def _close(self, at: float, *, at_deadline: bool) -> None:
        missing = sorted(self._waiting_for())
        when = f"at the {self._phase.value} deadline" if at_deadline else ""
        if self._phase is SecAggPhase.UNMASKING:
            try:
                self._result = self._unmask_sum()
            except (DropoutError, IntegrityError) as exc:
                self.abort(f"{exc} {when}".strip())
                return
            self._phase = SecAggPhase.COMPLETE
            self._drop_bulk()
            return
        answered = {
            SecAggPhase.ADVERTISING: len(set(self._keys) - set(self._withdrawn)),
            SecAggPhase.SHARING: len(set(self._shares) - set(self._withdrawn)),
            SecAggPhase.COLLECTING: len(set(self._submitted)),
        }[self._phase]
        if answered < self.params.threshold:
            declined = "".join(
                f"; site {site} declined: {why}" for site, why in sorted(self._withdrawn.items())
            )
            self.abort(
                f"only {answered} sites answered the {self._phase.value} phase, fewer than "
                f"the threshold {self.params.threshold}; missing: {', '.join(missing) or '-'}"
                f"{declined}"
            )
            return
        order = list(SecAggPhase)
        self._phase = order[order.index(self._phase) + 1]
        self._deadline = at + self._timeout

    def _unmask_sum(self) -> np.ndarray:
        params = self.params
        alive = set(self._submitted)
        dropped = set(self._shares) - alive
        gathered = self._gathered
        total = self._sum  # no longer needed as such: unmasked in place
        for owner in sorted(alive):
            seed = self._rebuild(owner, ShareKind.SELF_MASK, gathered)
            total -= crypto.self_mask(
                seed, round_id=params.round_id, length=params.length, bits=params.bits
            )
        for owner in sorted(dropped):
            raw = self._rebuild(owner, ShareKind.PAIR_KEY, gathered)
            key = X25519PrivateKey.from_private_bytes(raw)
            if not hmac.compare_digest(crypto.raw_public(key), self._keys[owner].mask_public):
                raise IntegrityError(f"the rebuilt mask key of {owner} does not match its keys")
            for peer in sorted(params.neighbours[owner] & alive):
                if peer not in self._shares:
                    continue
                pair_key = crypto.agree(
                    key,
                    self._keys[peer].mask_public,
                    round_id=params.round_id,
                    own_id=owner,
                    peer_id=peer,
                    label=crypto.LABEL_PAIR_MASK,
                )
                mask = crypto.expand_mask(pair_key, params.length, params.bits)
                # The survivor added the mask towards a greater id and subtracted it otherwise.
                if owner.encode() > peer.encode():
                    total -= mask
                else:
                    total += mask
        total &= self._modulus
        return total

    def _rebuild(
        self, owner: str, kind: ShareKind, gathered: Mapping[tuple[str, ShareKind], list[Share]]
    ) -> bytes:
        shares = gathered.get((owner, kind), [])
        needed = self.params.share_threshold(owner)
        if len(shares) < needed:
            raise DropoutError(
                f"only {len(shares)} shares of the {kind.value} secret of {owner} were "
                f"revealed, {needed} are needed"
            )
        # One share beyond the threshold is checked against the polynomial of the others,
        # which catches a corrupted share among them; checking every extra share would
        # cost O(n) per extra share for no further guarantee against a single liar.
        return combine_shares(shares[: needed + 1], needed, crypto.KEY_BYTES)
