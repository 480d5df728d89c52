"""The site-facing half of the aggregator: open rounds, their messages, and releases.

Each open round is a :class:`privacy.secagg_server.ServerSession` with a lock. Every
accepted message is journaled with its audit row in one commit
(:mod:`server.round_journal`), and a new :class:`RoundTable` on the same store replays
the journals of unfinished rounds, so a restarted aggregator resumes them. A round that
completes is decoded, post-processed by its explanation kind and stored as a release. No
gRPC here: :mod:`server.grpc_server` decodes requests and calls these methods.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from explain import get_kind
from fedlens.errors import (
    ConfigurationError,
    FedlensError,
    IntegrityError,
    StaleRoundError,
    StorageError,
    UnknownRoundError,
)
from fedlens.secagg_types import EncryptedShare, RevealedShare, SignedKeys, UnmaskRequest
from fedlens.types import (
    MaskedSubmission,
    PrivacyCost,
    Release,
    RoundPhase,
    RoundSpec,
    RoundStatus,
)
from privacy import FixedPointCodec
from privacy.secagg_params import SecAggParams
from privacy.secagg_server import ServerSession
from server.identities import IdentityRegistry
from server.round_journal import (
    JournalEntry,
    RoundJournal,
    keys_payload,
    replay,
    revealed_payload,
    shares_payload,
)
from server.storage import Store

__all__ = ["LiveRound", "RoundTable", "protocol_params"]

logger = logging.getLogger(__name__)


@dataclass
class LiveRound:
    """An open round: its state machine and what the aggregator keeps beside it."""

    spec: RoundSpec
    session: ServerSession
    identities: dict[str, bytes] = field(default_factory=dict)
    costs: dict[str, tuple[PrivacyCost, float]] = field(default_factory=dict)
    release_id: str = ""
    failure: str = ""


class RoundTable:
    """The open rounds, one lock each; see the module docstring.

    Parameters are those of :class:`server.aggregation.Aggregator`, which extends this
    class with the coordinator's operations.
    """

    def __init__(
        self,
        store: Store,
        *,
        identities: IdentityRegistry | None,
        enrolment: str,
        clock: Callable[[], float],
        wall_clock: Callable[[], datetime],
    ) -> None:
        if enrolment not in ("strict", "first-use"):
            raise ConfigurationError(f"enrolment must be strict or first-use, got {enrolment!r}")
        self._store = store
        self._identities = identities
        self._enrolment = enrolment
        self._journal_store = RoundJournal(store)
        self._clock = clock
        self._wall = wall_clock
        # One entry per open round, its state and the lock that serialises it.
        self._rounds: dict[str, tuple[LiveRound, threading.Lock]] = {}
        self._registry_lock = threading.Lock()
        self._resume()

    def _resume(self) -> None:
        """Rebuild every unfinished round from its journal, or abort it if that fails."""
        for spec in self._store.unfinished_rounds():
            entries = self._journal_store.entries(spec.round_id)
            try:
                live = self._replay(spec, entries)
            except (FedlensError, KeyError, ValueError) as exc:
                reason = f"could not be resumed after a restart: {exc}"
                self._store.update_round(spec.round_id, "aborted", now=self._wall(), reason=reason)
                self._forget(spec.round_id)
                self._audit("coordinator", "resume_round", spec.round_id, "aborted", reason)
                logger.warning("round %s %s", spec.round_id, reason)
                continue
            self._rounds[spec.round_id] = (live, threading.Lock())
            self._audit(
                "coordinator",
                "resume_round",
                spec.round_id,
                "ok",
                f"phase={live.session.phase.value} entries={len(entries)}",
            )
            logger.info("resumed round %s in phase %s", spec.round_id, live.session.phase.value)

    def _replay(self, spec: RoundSpec, entries: list[JournalEntry]) -> LiveRound:
        params = protocol_params(spec)
        replayed = replay(
            params, spec.phase_timeout_s, entries, self._journal_store.running_sum(spec.round_id)
        )
        return LiveRound(spec, replayed.session, replayed.identities, replayed.costs)

    # -- site messages -----------------------------------------------------------------------

    def advertise(self, keys: SignedKeys, identity_public: bytes) -> RoundStatus:
        """Accept a site's signed keys if its identity matches the registry.

        Raises
        ------
        AuthenticationError
            The site is not enrolled (with strict enrolment) or presents another key.
        """

        def step(live: LiveRound, now: float) -> None:
            if self._identities is not None:
                self._identities.admit(
                    keys.site_id,
                    identity_public,
                    strict=self._enrolment == "strict",
                    now=self._wall(),
                )
            live.session.advertise(keys, identity_public, now=now)
            self._journal(live, now, keys.site_id, "advertise", keys_payload(keys, identity_public))

        return self._apply(keys.round_id, keys.site_id, "advertise_keys", step, audit_ok=False)

    def peer_keys(
        self, round_id: str, site_id: str
    ) -> tuple[RoundStatus, dict[str, tuple[SignedKeys, bytes]]]:
        """The signed keys and identity keys of the site's neighbours, once all are in."""
        found: dict[str, tuple[SignedKeys, bytes]] = {}

        def step(live: LiveRound, now: float) -> None:
            keys = live.session.keys_for(site_id, now=now)
            for site, signed in (keys or {}).items():
                found[site] = (signed, live.identities[site])

        status = self._apply(round_id, site_id, "get_peer_keys", step, audit_ok=False)
        return status, found

    def share(self, round_id: str, site_id: str, shares: Sequence[EncryptedShare]) -> RoundStatus:
        def step(live: LiveRound, now: float) -> None:
            live.session.share(site_id, shares, now=now)
            self._journal(live, now, site_id, "share", shares_payload(shares))

        return self._apply(round_id, site_id, "share_keys", step, audit_ok=False)

    def shares_for(
        self, round_id: str, site_id: str
    ) -> tuple[RoundStatus, tuple[EncryptedShare, ...] | None]:
        found: list[tuple[EncryptedShare, ...] | None] = [None]

        def step(live: LiveRound, now: float) -> None:
            found[0] = live.session.shares_for(site_id, now=now)

        status = self._apply(round_id, site_id, "get_shares", step, audit_ok=False)
        return status, found[0]

    def submit(self, sub: MaskedSubmission) -> RoundStatus:
        """Validate a masked vector and add it to the round's running sum, durably."""

        def step(live: LiveRound, now: float) -> None:
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
                    f"cost names site {sub.cost.site_id!r}, not the submitter {sub.site_id!r}"
                )
            live.session.submit(sub.site_id, sub.values, now=now)
            live.costs[sub.site_id] = (sub.cost, sub.noise_std)
            payload = {
                "epsilon": sub.cost.epsilon,
                "delta": sub.cost.delta,
                "epsilon_total": sub.cost.epsilon_total,
                "noise_std": sub.noise_std,
            }
            self._journal(
                live, now, sub.site_id, "submit", payload, running_sum=live.session.running_sum
            )

        return self._apply(sub.round_id, sub.site_id, "submit_masked", step, audit_ok=False)

    def unmask_request(
        self, round_id: str, site_id: str
    ) -> tuple[RoundStatus, UnmaskRequest | None]:
        found: list[UnmaskRequest | None] = [None]

        def step(live: LiveRound, now: float) -> None:
            found[0] = live.session.unmask_request(site_id, now=now)

        status = self._apply(round_id, site_id, "get_unmask_request", step, audit_ok=False)
        return status, found[0]

    def unmask(self, round_id: str, site_id: str, shares: Sequence[RevealedShare]) -> RoundStatus:
        def step(live: LiveRound, now: float) -> None:
            live.session.unmask(site_id, shares, now=now)
            self._journal(live, now, site_id, "unmask", revealed_payload(shares))

        return self._apply(round_id, site_id, "unmask", step, audit_ok=False)

    def decline(self, round_id: str, site_id: str, reason: str) -> RoundStatus:
        def step(live: LiveRound, now: float) -> None:
            live.session.withdraw(site_id, reason, now=now)
            self._journal(live, now, site_id, "withdraw", {"reason": reason})

        return self._apply(round_id, site_id, "decline_round", step, audit_ok=False)

    def status(self, round_id: str) -> RoundStatus:
        """The round's status; a phase whose deadline has passed is closed first.

        So a round every site has left (or whose deadline passed while the aggregator
        was down) still ends, continuing or aborting, when the coordinator polls it.
        """
        entry = self._rounds.get(round_id)
        if entry is None:
            if self._store.round_exists(round_id):
                phase, reason, release_id = self._store.round_phase(round_id)
                return RoundStatus(
                    round_id, RoundPhase(phase), release_id=release_id, reason=reason
                )
            raise UnknownRoundError(f"no round {round_id!r}")

        def tick(live: LiveRound, now: float) -> None:
            live.session.tick(now)

        return self._apply(round_id, "", "round_status", tick, audit_ok=False)

    @contextmanager
    def audited(self, action: str, round_id: str, actor: str) -> Iterator[None]:
        """Audit a refusal raised while decoding a message, before it reaches a round."""
        try:
            yield
        except FedlensError as exc:
            self._audit(actor, action, round_id, "refused", f"{type(exc).__name__}: {exc}")
            raise

    # -- internals ---------------------------------------------------------------------

    def _journal(
        self,
        live: LiveRound,
        now: float,
        site_id: str,
        action: str,
        payload: dict[str, Any],
        *,
        running_sum: np.ndarray | None = None,
    ) -> None:
        if action == "advertise":
            live.identities[site_id] = bytes.fromhex(payload["identity_public"])
        # The accepted message's audit row goes into the journal's commit.
        audit = {
            "now": self._wall(),
            "actor": site_id or "-",
            "action": _AUDIT_ACTIONS[action],
            "round_id": live.spec.round_id,
            "outcome": "ok",
        }
        self._journal_store.append(
            live.spec.round_id,
            JournalEntry(now, site_id, action, payload),
            running_sum=running_sum,
            audit=audit,
        )

    def _apply(
        self,
        round_id: str,
        actor: str,
        action: str,
        step: Callable[[LiveRound, float], None],
        *,
        audit_ok: bool = True,
    ) -> RoundStatus:
        entry = self._rounds.get(round_id)
        if entry is None:
            if self._store.round_exists(round_id):
                phase, reason, _ = self._store.round_phase(round_id)
                self._audit(actor, action, round_id, "refused", f"round is {phase}")
                raise StaleRoundError(
                    f"round {round_id} is {phase}{': ' + reason if reason else ''}"
                )
            self._audit(actor, action, round_id, "refused", "unknown round")
            raise UnknownRoundError(f"no open round {round_id!r}")
        live, lock = entry
        with lock:
            now = self._clock()
            before = live.session.phase
            try:
                step(live, now)
            except FedlensError as exc:
                self._after(live, before, now)
                self._audit(actor, action, round_id, "refused", f"{type(exc).__name__}: {exc}")
                raise
            except Exception:
                live.session.abort(f"internal error during {action}")
                self._after(live, before, now)
                raise
            self._after(live, before, now)
            if audit_ok:
                self._audit(actor, action, round_id, "ok")
            return self._status(live, now)

    def _status(self, live: LiveRound, now: float) -> RoundStatus:
        session = live.session
        left = 0.0 if session.phase.finished else max(0.0, session.deadline - now)
        return RoundStatus(
            round_id=live.spec.round_id,
            phase=RoundPhase.ABORTED if live.failure else session.phase,
            advertised=session.advertised,
            submitted=session.submitted,
            release_id=live.release_id,
            reason=live.failure or session.reason,
            shared=session.shared,
            unmasked=session.unmasked,
            seconds_left=left,
        )

    def _after(self, live: LiveRound, before: RoundPhase, now: float) -> None:
        """Persist a phase change; finish a completed round into a release."""
        session = live.session
        if session.phase is before:
            return
        if session.phase is RoundPhase.COMPLETE:
            try:
                self._finish(live)
            except Exception as exc:
                # Nothing was released: end the round rather than leave it waiting.
                reason = f"finishing the round failed: {exc}"
                live.failure = reason
                self._store.update_round(
                    live.spec.round_id, "aborted", now=self._wall(), reason=reason
                )
                self._forget(live.spec.round_id)
                if isinstance(exc, FedlensError):
                    raise
                raise StorageError(f"round {live.spec.round_id}: {reason}") from exc
            self._forget(live.spec.round_id)
            return
        self._store.update_round(
            live.spec.round_id, session.phase.value, now=self._wall(), reason=session.reason
        )
        if session.phase is RoundPhase.ABORTED:
            logger.warning("round %s aborted: %s", live.spec.round_id, session.reason)
            self._forget(live.spec.round_id)

    def _forget(self, round_id: str) -> None:
        self._journal_store.forget(round_id)

    def _finish(self, live: LiveRound) -> None:
        spec, session = live.spec, live.session
        codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)
        noised_sum = codec.decode(session.result())
        survivors = session.submitted
        noise_std = math.sqrt(sum(live.costs[site][1] ** 2 for site in survivors))
        post = get_kind(spec.kind).postprocess(
            noised_sum, noise_std, spec.clip_bound, spec.labels, spec.params
        )
        created = self._wall()
        params = {k: v for k, v in spec.params.items() if k in _PUBLIC_PARAMS}
        params["sites_in_sum"] = str(len(survivors))
        release = Release(
            release_id=uuid.uuid4().hex,
            round_id=spec.round_id,
            kind=spec.kind,
            created_at=created.isoformat(timespec="seconds"),
            noised_count=post.noised_count,
            values=post.values,
            grouped=post.grouped,
            costs=tuple(live.costs[site][0] for site in sorted(survivors)),
            params=params,
        )
        self._store.save_release(release, created_at=created)
        self._store.update_round(
            spec.round_id, "complete", now=created, release_id=release.release_id
        )
        live.release_id = release.release_id
        logger.info(
            "round %s complete with %d of %d sites: release %s",
            spec.round_id,
            len(survivors),
            len(spec.site_ids),
            release.release_id,
        )

    def _audit(
        self, actor: str, action: str, round_id: str, outcome: str, detail: str = ""
    ) -> None:
        self._store.audit(
            now=self._wall(),
            actor=actor or "-",
            action=action,
            round_id=round_id,
            outcome=outcome,
            detail=detail,
        )


def protocol_params(spec: RoundSpec) -> SecAggParams:
    """The protocol parameters of a round spec; ConfigurationError names a bad one."""
    if spec.noise not in ("local", "distributed"):
        raise ConfigurationError(f"noise must be local or distributed, got {spec.noise!r}")
    if spec.colluding >= spec.effective_threshold:
        raise ConfigurationError(
            f"colluding ({spec.colluding}) must be below the threshold ({spec.effective_threshold})"
        )
    return SecAggParams.for_round(spec)


# Audit log action of each journaled message.
_AUDIT_ACTIONS = {
    "advertise": "advertise_keys",
    "share": "share_keys",
    "submit": "submit_masked",
    "unmask": "unmask",
    "withdraw": "decline_round",
}

# Spec parameters worth keeping with a release (the rest are encodings for the post-processor).
_PUBLIC_PARAMS = frozenset(
    {
        *("dataset", "delta", "epsilon", "model", "n_steps", "noise", "training_rounds"),
        # Influence: the model the factors belong to, the question asked, and which
        # released factors answered it.
        *("model_fingerprint", "method", "query", "query_record", "group_by", "k"),
        *("influence_clip", "damping", "second_order_release", "second_order_count"),
        *("second_order_fingerprint", "ekfac_release", "bins", "suspicious"),
    }
)
