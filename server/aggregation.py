"""The aggregator: runs secure-aggregation rounds and stores what they release.

No gRPC here: :mod:`server.grpc_server` decodes requests, calls these methods and encodes
the answers. Every accepted or refused message is written to the audit log.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from explain import get_kind
from fedlens.errors import (
    AuthenticationError,
    BudgetExceededError,
    ConfigurationError,
    DuplicateSubmissionError,
    FedlensError,
    IntegrityError,
    NotFoundError,
    StaleRoundError,
    StorageError,
    UnknownRoundError,
)
from fedlens.secagg_types import EncryptedShare, RevealedShare, SignedKeys, UnmaskRequest
from fedlens.types import (
    InputExplanation,
    MaskedSubmission,
    PrivacyCost,
    Release,
    ReleaseSummary,
    RoundPhase,
    RoundSpec,
    RoundStatus,
    SiteLedger,
)
from privacy import FixedPointCodec, LedgerEvent, PrivacyLedger, gaussian_noise_multiplier
from privacy.secagg_params import SecAggParams
from privacy.secagg_server import ServerSession
from server.identities import IdentityRegistry
from server.input_explanation import explain_stored_input, publish_model
from server.round_journal import (
    JournalEntry,
    RoundJournal,
    keys_from_payload,
    keys_payload,
    revealed_from_payload,
    revealed_payload,
    shares_from_payload,
    shares_payload,
)
from server.storage import Store

__all__ = ["Aggregator", "QueryHandler"]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass
class _LiveRound:
    """An open round: its state machine and what the aggregator keeps beside it."""

    spec: RoundSpec
    session: ServerSession
    identities: dict[str, bytes] = field(default_factory=dict)
    costs: dict[str, tuple[PrivacyCost, float]] = field(default_factory=dict)
    release_id: str = ""
    failure: str = ""
    replaying: bool = False


class Aggregator:
    """Holds the open rounds, one lock each, and finishes them into releases.

    Open rounds are journaled in the store (:mod:`server.round_journal`); a new
    aggregator on the same store resumes every round that had not finished.

    Parameters
    ----------
    store
        Where rounds, releases, journals and the audit log go.
    identities
        The registry of enrolled site identity keys; ``None`` accepts any signed keys
        (tests of the protocol alone).
    enrolment
        ``"strict"``: sites must be enrolled beforehand. ``"first-use"``: an unknown site
        is enrolled with the identity key it first presents, and must present the same
        key from then on.
    clock
        Wall-clock seconds (deadlines survive a restart). ``time.time`` by default.
    wall_clock
        Timestamps for stored rows. ``datetime.now(UTC)`` by default.
    """

    def __init__(
        self,
        store: Store,
        *,
        identities: IdentityRegistry | None = None,
        enrolment: str = "first-use",
        clock: Clock = time.time,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
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
        self._rounds: dict[str, tuple[_LiveRound, threading.Lock]] = {}
        self._registry_lock = threading.Lock()
        self._resume()

    # -- coordinator ---------------------------------------------------------------

    def open_round(self, spec: RoundSpec, *, actor: str = "coordinator") -> RoundStatus:
        """Open a round, unless its parameters are malformed or a site cannot afford it.

        Raises
        ------
        ConfigurationError
            The post-processor rejects the round's parameters, or the protocol's
            (threshold, degree, noise placement).
        BudgetExceededError
            The round's release would take some site past its budget, judging by the
            site's mirrored ledger (:meth:`report_ledger`); sites that never reported
            are not judged here, and every site still checks its own ledger.
        """
        _check_postprocessor(spec)  # refused before anything is stored
        params = _protocol_params(spec)
        try:
            self._check_budgets(spec)
        except BudgetExceededError as exc:
            self._audit(actor, "open_round", spec.round_id, "refused", str(exc))
            raise
        with self._registry_lock:
            if spec.round_id in self._rounds or self._store.round_exists(spec.round_id):
                self._audit(actor, "open_round", spec.round_id, "refused", "round id in use")
                raise DuplicateSubmissionError(f"round {spec.round_id} already exists")
            now = self._clock()
            session = ServerSession(params, now=now, phase_timeout_s=spec.phase_timeout_s)
            live = _LiveRound(spec, session)
            self._store.save_round(spec, session.phase.value, now=self._wall())
            self._journal_store.append(spec.round_id, JournalEntry(now, "", "open", {}))
            self._rounds[spec.round_id] = (live, threading.Lock())
        self._audit(
            actor,
            "open_round",
            spec.round_id,
            "ok",
            f"sites={list(spec.site_ids)} threshold={params.threshold} degree={params.degree}",
        )
        logger.info(
            "opened round %s (%s) for %d sites, threshold %d",
            spec.round_id,
            spec.kind,
            len(spec.site_ids),
            params.threshold,
        )
        return self._status(live, now)

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

    def _replay(self, spec: RoundSpec, entries: list[JournalEntry]) -> _LiveRound:
        if not entries or entries[0].action != "open":
            raise IntegrityError("its journal does not start with the opening")
        params = _protocol_params(spec)
        session = ServerSession(params, now=entries[0].at, phase_timeout_s=spec.phase_timeout_s)
        live = _LiveRound(spec, session, replaying=True)
        rid = spec.round_id
        for entry in entries[1:]:
            site, p, at = entry.site_id, entry.payload, entry.at
            if entry.action == "advertise":
                keys, identity = keys_from_payload(rid, site, p)
                session.advertise(keys, identity, now=at)
                live.identities[site] = identity
            elif entry.action == "share":
                session.share(site, shares_from_payload(rid, site, p), now=at)
            elif entry.action == "submit":
                session.submit(site, None, now=at)
                cost = PrivacyCost(site, p["epsilon"], p["delta"], p["epsilon_total"])
                live.costs[site] = (cost, float(p["noise_std"]))
            elif entry.action == "unmask":
                session.unmask(site, revealed_from_payload(rid, site, p), now=at)
            elif entry.action == "withdraw":
                session.withdraw(site, str(p.get("reason", "")), now=at)
            else:
                raise IntegrityError(f"its journal holds an unknown action {entry.action!r}")
        if session.phase.finished:
            raise IntegrityError(f"its journal ends with the round {session.phase.value}")
        stored = self._journal_store.running_sum(rid)
        if session.submitted:
            if stored is None:
                raise IntegrityError("submissions are journaled but no running sum is stored")
            session.restore_sum(stored)
        live.replaying = False
        return live

    def _check_budgets(self, spec: RoundSpec) -> None:
        epsilon, delta = spec.params.get("epsilon"), spec.params.get("delta")
        if epsilon is None or delta is None:
            return
        try:
            release = LedgerEvent(
                kind="gaussian",
                noise_multiplier=gaussian_noise_multiplier(float(epsilon), float(delta)),
                label=f"round {spec.round_id}",
                created_at=self._wall(),
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"round {spec.round_id}: bad epsilon or delta: {exc}"
            ) from None
        short = []
        for mirrored in self._store.site_ledgers():
            if mirrored.site_id not in spec.site_ids:
                continue
            ledger = PrivacyLedger(mirrored.budget_epsilon, mirrored.delta, mirrored.events)
            after = ledger.epsilon_with(release)
            if after > ledger.budget_epsilon:
                short.append(
                    f"{mirrored.site_id} (spent ε = {ledger.epsilon_spent():.3f} of "
                    f"{ledger.budget_epsilon:g}; the release would bring it to {after:.3f})"
                )
        if short:
            raise BudgetExceededError(
                f"round {spec.round_id} refused: a release at ε = {epsilon}, δ = {delta} "
                f"does not fit the mirrored ledger of {', '.join(short)}"
            )

    def report_ledger(self, ledger: SiteLedger, *, actor: str = "") -> SiteLedger:
        """Mirror a site's ledger; returns the mirror with its composed ε.

        Raises
        ------
        IntegrityError
            The report is malformed, or drops or rewrites mirrored events; nothing is
            stored and the refusal is audited.
        """
        actor = actor or ledger.site_id
        try:
            composed = PrivacyLedger(ledger.budget_epsilon, ledger.delta, ledger.events)
            added = self._store.mirror_ledger(ledger, now=self._wall())
        except ConfigurationError as exc:
            self._audit(actor, "report_ledger", "", "refused", str(exc))
            raise IntegrityError(f"malformed ledger of site {ledger.site_id}: {exc}") from None
        except IntegrityError as exc:
            self._audit(actor, "report_ledger", "", "refused", str(exc))
            raise
        self._audit(actor, "report_ledger", "", "ok", f"site={ledger.site_id} added={added}")
        return _with_epsilon(ledger, composed)

    def publish_model(
        self, *, dataset: str, model: str, state: bytes, params: Mapping[str, str]
    ) -> str:
        """Store the run's trained global model (:func:`server.input_explanation.publish_model`)."""
        try:
            model_id = publish_model(
                self._store,
                dataset=dataset,
                model=model,
                state=state,
                params=params,
                now=self._wall(),
            )
        except FedlensError as exc:
            self._audit("coordinator", "publish_model", "", "refused", str(exc))
            raise
        self._audit("coordinator", "publish_model", "", "ok", f"model={model_id}")
        return model_id

    # -- sites -----------------------------------------------------------------------

    def advertise(self, keys: SignedKeys, identity_public: bytes) -> RoundStatus:
        """Accept a site's signed keys if its identity matches the registry.

        Raises
        ------
        AuthenticationError
            The site is not enrolled (with strict enrolment) or presents another key.
        """

        def step(live: _LiveRound, now: float) -> None:
            self._check_identity(keys.site_id, identity_public, keys.round_id)
            live.session.advertise(keys, identity_public, now=now)
            self._journal(live, now, keys.site_id, "advertise", keys_payload(keys, identity_public))

        return self._apply(keys.round_id, keys.site_id, "advertise_keys", step, audit_ok=False)

    def peer_keys(
        self, round_id: str, site_id: str
    ) -> tuple[RoundStatus, dict[str, tuple[SignedKeys, bytes]]]:
        """The signed keys and identity keys of the site's neighbours, once all are in."""
        found: dict[str, tuple[SignedKeys, bytes]] = {}

        def step(live: _LiveRound, now: float) -> None:
            keys = live.session.keys_for(site_id, now=now)
            for site, signed in (keys or {}).items():
                found[site] = (signed, live.identities[site])

        status = self._apply(round_id, site_id, "get_peer_keys", step, audit_ok=False)
        return status, found

    def share(self, round_id: str, site_id: str, shares: Sequence[EncryptedShare]) -> RoundStatus:
        def step(live: _LiveRound, now: float) -> None:
            live.session.share(site_id, shares, now=now)
            self._journal(live, now, site_id, "share", shares_payload(shares))

        return self._apply(round_id, site_id, "share_keys", step, audit_ok=False)

    def shares_for(
        self, round_id: str, site_id: str
    ) -> tuple[RoundStatus, tuple[EncryptedShare, ...] | None]:
        found: list[tuple[EncryptedShare, ...] | None] = [None]

        def step(live: _LiveRound, now: float) -> None:
            found[0] = live.session.shares_for(site_id, now=now)

        status = self._apply(round_id, site_id, "get_shares", step, audit_ok=False)
        return status, found[0]

    def submit(self, sub: MaskedSubmission) -> RoundStatus:
        """Validate a masked vector and add it to the round's running sum, durably."""

        def step(live: _LiveRound, now: float) -> None:
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

        def step(live: _LiveRound, now: float) -> None:
            found[0] = live.session.unmask_request(site_id, now=now)

        status = self._apply(round_id, site_id, "get_unmask_request", step, audit_ok=False)
        return status, found[0]

    def unmask(self, round_id: str, site_id: str, shares: Sequence[RevealedShare]) -> RoundStatus:
        def step(live: _LiveRound, now: float) -> None:
            live.session.unmask(site_id, shares, now=now)
            self._journal(live, now, site_id, "unmask", revealed_payload(shares))

        return self._apply(round_id, site_id, "unmask", step, audit_ok=False)

    def decline(self, round_id: str, site_id: str, reason: str) -> RoundStatus:
        def step(live: _LiveRound, now: float) -> None:
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

        def tick(live: _LiveRound, now: float) -> None:
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

    def _check_identity(self, site_id: str, presented: bytes, round_id: str) -> None:
        if self._identities is None:
            return
        try:
            enrolled = self._identities.public_key(site_id)
        except NotFoundError:
            if self._enrolment == "strict":
                raise AuthenticationError(
                    f"site {site_id} is not enrolled; an admin enrols it with `fedlens keys enroll`"
                ) from None
            self._identities.enroll(site_id, presented, now=self._wall())
            self._audit(site_id, "enroll", round_id, "ok", "enrolled on first use")
            return
        if not hmac.compare_digest(enrolled, presented):
            raise AuthenticationError(
                f"site {site_id} presented an identity key that differs from its enrolment"
            )

    def _journal(
        self,
        live: _LiveRound,
        now: float,
        site_id: str,
        action: str,
        payload: dict[str, Any],
        *,
        running_sum: np.ndarray | None = None,
    ) -> None:
        if action == "advertise":
            live.identities[site_id] = bytes.fromhex(payload["identity_public"])
        if not live.replaying:
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
        step: Callable[[_LiveRound, float], None],
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

    def _status(self, live: _LiveRound, now: float) -> RoundStatus:
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

    def _after(self, live: _LiveRound, before: RoundPhase, now: float) -> None:
        """Persist a phase change; finish a completed round into a release."""
        session = live.session
        if session.phase is before or live.replaying:
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

    def _finish(self, live: _LiveRound) -> None:
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


def _protocol_params(spec: RoundSpec) -> SecAggParams:
    """The protocol parameters of a round spec; ConfigurationError names a bad one."""
    if spec.noise not in ("local", "distributed"):
        raise ConfigurationError(f"noise must be local or distributed, got {spec.noise!r}")
    if spec.colluding >= spec.effective_threshold:
        raise ConfigurationError(
            f"colluding ({spec.colluding}) must be below the threshold ({spec.effective_threshold})"
        )
    return SecAggParams(
        round_id=spec.round_id,
        site_ids=tuple(spec.site_ids),
        threshold=spec.effective_threshold,
        length=spec.length,
        bits=spec.bits,
        degree=spec.degree,
    )


def _check_postprocessor(spec: RoundSpec) -> None:
    """Refuse a round whose kind is unknown or whose parameters its post-processor rejects.

    The post-processor runs once on a zero sum, so that malformed parameters fail here,
    at ``OpenRound``, and not after every site has spent its budget.
    """
    kind = get_kind(spec.kind)
    try:
        kind.postprocess(
            np.zeros(max(spec.length, 1)), 0.0, spec.clip_bound or 1.0, spec.labels, spec.params
        )
    except Exception as exc:
        raise ConfigurationError(
            f"round {spec.round_id}: parameters rejected by {spec.kind}: {exc}"
        ) from None


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
    {"dataset", "delta", "epsilon", "model", "n_steps", "noise", "training_rounds"}
)


class QueryHandler:
    """Answers analysts from stored releases; costs no privacy."""

    def __init__(self, store: Store, *, max_limit: int = 1000) -> None:
        self._store = store
        self._max_limit = max_limit

    def list_releases(self, *, limit: int = 0, kind: str = "") -> list[ReleaseSummary]:
        limit = self._max_limit if limit <= 0 else min(limit, self._max_limit)
        return self._store.list_releases(limit=limit, kind=kind)

    def get_release(self, release_id: str) -> Release:
        return self._store.get_release(release_id)

    def list_budgets(self, *, site_id: str = "") -> list[SiteLedger]:
        """Every mirrored site ledger (or one site's), with its composed ε."""
        return [
            _with_epsilon(m, PrivacyLedger(m.budget_epsilon, m.delta, m.events))
            for m in self._store.site_ledgers(site_id=site_id)
        ]

    def explain_input(
        self, record: Mapping[str, str], *, model_id: str = "", top: int = 0
    ) -> InputExplanation:
        """Explain one input with a stored global model (the latest if ``model_id`` is empty).

        Uses the model and the latest fitting ``feature_stats`` release only: no privacy
        is spent. See :func:`server.input_explanation.explain_stored_input`.
        """
        return explain_stored_input(self._store, record, model_id=model_id, top=top)


def _with_epsilon(ledger: SiteLedger, composed: PrivacyLedger) -> SiteLedger:
    return SiteLedger(
        site_id=ledger.site_id,
        budget_epsilon=ledger.budget_epsilon,
        delta=ledger.delta,
        events=ledger.events,
        epsilon_spent=composed.epsilon_spent(),
        accountant=composed.accountant,
    )
