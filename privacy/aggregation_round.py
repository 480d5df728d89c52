"""The aggregator's side of one secure-aggregation round, as a transport-free state machine.

Protocol (pairwise masking of Bonawitz et al., CCS 2017, without the self masks and the
secret-shared dropout recovery, which a later protocol version adds): every expected site
advertises an X25519 public key; once all have, each site fetches its peers' keys, adds
its pairwise masks to its fixed-point contribution, and submits the masked vector. The
pairwise masks cancel in the sum modulo ``2**bits``, so the aggregator learns the sum and
nothing else, provided it sees every expected site's vector. A site that fails to appear
before a phase deadline aborts the round: the partial sum is discarded, never decoded.

Guarantees and assumptions: the aggregator is honest-but-curious; messages are validated
completely before any state changes, so a rejected message leaves the round as it was;
masked vectors are added to a running sum as they arrive and are not retained (memory
O(length) per round). Time is passed in as ``now`` (seconds, any monotonic origin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlens.errors import (
    ConfigurationError,
    DuplicateSubmissionError,
    IntegrityError,
    StaleRoundError,
)
from fedlens.types import (
    KeyAdvertisement,
    MaskedSubmission,
    PrivacyCost,
    RoundPhase,
    RoundSpec,
    RoundStatus,
)
from privacy.fixedpoint import MAX_BITS
from privacy.masking import PUBLIC_KEY_BYTES

__all__ = ["AggregationRound", "RoundResult"]


@dataclass(frozen=True)
class RoundResult:
    """The unmasked fixed-point sum of a complete round.

    Attributes
    ----------
    encoded_sum
        ``(length,)`` uint64, the sum of every site's encoded contribution mod ``2**bits``.
    noise_std
        Standard deviation of the total Gaussian noise per coordinate, before encoding:
        ``sqrt(sum of the sites' declared stds squared)``.
    """

    encoded_sum: np.ndarray
    noise_std: float


class AggregationRound:
    """State of one round at the aggregator. Not thread-safe: callers hold a lock."""

    def __init__(self, spec: RoundSpec, *, now: float) -> None:
        _validate_spec(spec)
        self.spec = spec
        self._expected = frozenset(spec.site_ids)
        self._keys: dict[str, bytes] = {}
        self._submitted: list[str] = []
        self._costs: list[PrivacyCost] = []
        self._modulus_mask = np.uint64((1 << spec.bits) - 1)
        self._sum = np.zeros(spec.length, dtype=np.uint64)
        self._noise_var = 0.0
        self._phase = RoundPhase.ADVERTISING
        self._deadline = now + spec.phase_timeout_s
        self._reason = ""
        self._release_id = ""

    # -- queries -----------------------------------------------------------------

    def status(self, now: float) -> RoundStatus:
        """The round's status, aborting it first if its phase deadline has passed."""
        self._check_deadline(now)
        return RoundStatus(
            round_id=self.spec.round_id,
            phase=self._phase,
            advertised=tuple(sorted(self._keys)),
            submitted=tuple(self._submitted),
            release_id=self._release_id,
            reason=self._reason,
        )

    @property
    def phase(self) -> RoundPhase:
        return self._phase

    @property
    def costs(self) -> tuple[PrivacyCost, ...]:
        """What each submitting site declared the contribution cost it."""
        return tuple(self._costs)

    # -- transitions ---------------------------------------------------------------

    def advertise(self, adv: KeyAdvertisement, *, now: float) -> RoundStatus:
        self._check_deadline(now)
        self._require_member(adv.site_id)
        if self._phase is not RoundPhase.ADVERTISING:
            raise StaleRoundError(
                f"round {self.spec.round_id} is {self._phase.value}, not accepting keys"
            )
        if adv.site_id in self._keys:
            raise DuplicateSubmissionError(
                f"site {adv.site_id} already advertised a key in round {self.spec.round_id}"
            )
        if len(adv.public_key) != PUBLIC_KEY_BYTES:
            raise IntegrityError(
                f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(adv.public_key)}"
            )
        if adv.public_key in self._keys.values():
            raise IntegrityError(f"site {adv.site_id} advertised another site's public key")
        self._keys[adv.site_id] = adv.public_key
        if set(self._keys) == self._expected:
            self._phase = RoundPhase.COLLECTING
            self._deadline = now + self.spec.phase_timeout_s
        return self.status(now)

    def peer_keys(self, site_id: str, *, now: float) -> dict[str, bytes]:
        """Every site's public key once all have advertised, else an empty mapping."""
        self._check_deadline(now)
        self._require_member(site_id)
        if self._phase is RoundPhase.ABORTED:
            raise StaleRoundError(f"round {self.spec.round_id} aborted: {self._reason}")
        if self._phase is RoundPhase.ADVERTISING:
            return {}
        return dict(self._keys)

    def submit(self, sub: MaskedSubmission, *, now: float) -> RoundStatus:
        """Validate a masked vector completely, then add it to the running sum."""
        self._check_deadline(now)
        self._require_member(sub.site_id)
        if self._phase is not RoundPhase.COLLECTING:
            raise StaleRoundError(
                f"round {self.spec.round_id} is {self._phase.value}, not accepting vectors"
            )
        if sub.site_id in self._submitted:
            raise DuplicateSubmissionError(
                f"site {sub.site_id} already submitted in round {self.spec.round_id}"
            )
        if sub.values.shape != (self.spec.length,):
            raise IntegrityError(
                f"vector has length {sub.values.size}, round {self.spec.round_id} "
                f"expects {self.spec.length}"
            )
        if sub.values.size and int(sub.values.max()) > int(self._modulus_mask):
            raise IntegrityError(f"vector has values outside the field [0, 2^{self.spec.bits})")
        for name, value in (
            ("noise_std", sub.noise_std),
            ("cost.epsilon", sub.cost.epsilon),
            ("cost.delta", sub.cost.delta),
            ("cost.epsilon_total", sub.cost.epsilon_total),
        ):
            if not math.isfinite(value) or value < 0:
                raise IntegrityError(f"{name} must be finite and >= 0, got {value}")
        if sub.cost.site_id != sub.site_id:
            raise IntegrityError(
                f"cost names site {sub.cost.site_id!r} but was submitted by {sub.site_id!r}"
            )
        self._sum = (self._sum + sub.values) & self._modulus_mask
        self._noise_var += sub.noise_std**2
        self._submitted.append(sub.site_id)
        self._costs.append(sub.cost)
        return self.status(now)

    def decline(self, site_id: str, reason: str, *, now: float) -> RoundStatus:
        """A member site will not contribute: abort now, revealing nothing."""
        self._check_deadline(now)
        self._require_member(site_id)
        if not self._phase.finished:
            self.abort(f"site {site_id} declined: {reason[:500] or 'no reason given'}")
        return self.status(now)

    @property
    def ready(self) -> bool:
        """Every expected site has submitted; :meth:`result` may be called."""
        return self._phase is RoundPhase.COLLECTING and set(self._submitted) == self._expected

    def result(self) -> RoundResult:
        if not self.ready:
            raise StaleRoundError(f"round {self.spec.round_id} is not complete")
        return RoundResult(encoded_sum=self._sum.copy(), noise_std=math.sqrt(self._noise_var))

    def mark_complete(self, release_id: str) -> None:
        if not self.ready:
            raise StaleRoundError(f"round {self.spec.round_id} is not complete")
        self._phase = RoundPhase.COMPLETE
        self._release_id = release_id
        self._sum[:] = 0

    def abort(self, reason: str) -> None:
        """End the round revealing nothing: the partial sum is wiped."""
        if self._phase.finished:
            return
        self._phase = RoundPhase.ABORTED
        self._reason = reason
        self._sum[:] = 0

    # -- helpers -------------------------------------------------------------------

    def _require_member(self, site_id: str) -> None:
        if site_id not in self._expected:
            raise IntegrityError(f"site {site_id!r} is not part of round {self.spec.round_id}")

    def _check_deadline(self, now: float) -> None:
        if self._phase.finished or now <= self._deadline:
            return
        if self._phase is RoundPhase.ADVERTISING:
            missing = sorted(self._expected - set(self._keys))
            self.abort(f"timed out waiting for keys from {', '.join(missing)}")
        else:
            missing = sorted(self._expected - set(self._submitted))
            self.abort(f"timed out waiting for vectors from {', '.join(missing)}")


def _validate_spec(spec: RoundSpec) -> None:
    if not spec.round_id:
        raise ConfigurationError("round_id must not be empty")
    if len(set(spec.site_ids)) != len(spec.site_ids) or len(spec.site_ids) < 2:
        raise ConfigurationError(
            f"a round needs at least 2 distinct sites, got {list(spec.site_ids)}"
        )
    if not 2 <= spec.bits <= MAX_BITS:
        raise ConfigurationError(f"bits must be in [2, {MAX_BITS}], got {spec.bits}")
    if spec.length != len(spec.labels) + 1:
        raise ConfigurationError(
            f"length {spec.length} must be len(labels) + 1 = {len(spec.labels) + 1}"
        )
    for name, value in (
        ("scale", spec.scale),
        ("clip_bound", spec.clip_bound),
        ("phase_timeout_s", spec.phase_timeout_s),
    ):
        if not math.isfinite(value) or value <= 0:
            raise ConfigurationError(f"{name} must be finite and > 0, got {value}")
