"""The aggregator: runs secure-aggregation rounds and stores what they release.

No gRPC here: :mod:`server.grpc_server` decodes requests, calls these methods and encodes
the answers. Every accepted or refused message is written to the audit log.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import numpy as np

from explain import get_kind
from fedlens.errors import (
    BudgetExceededError,
    ConfigurationError,
    DuplicateSubmissionError,
    FedlensError,
    IntegrityError,
    StorageError,
    UnknownRoundError,
)
from fedlens.types import (
    InputExplanation,
    KeyAdvertisement,
    MaskedSubmission,
    Release,
    ReleaseSummary,
    RoundPhase,
    RoundSpec,
    RoundStatus,
    SiteLedger,
)
from privacy import FixedPointCodec, LedgerEvent, PrivacyLedger, gaussian_noise_multiplier
from privacy.aggregation_round import AggregationRound
from server.input_explanation import explain_stored_input, publish_model
from server.storage import Store

__all__ = ["Aggregator", "QueryHandler"]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


class Aggregator:
    """Holds the open rounds, one lock each, and finishes them into releases.

    Parameters
    ----------
    store
        Where rounds, releases and the audit log go.
    clock
        Monotonic seconds; deadlines are measured with it. ``time.monotonic`` by default.
    wall_clock
        Timestamps for stored rows. ``datetime.now(UTC)`` by default.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._clock = clock
        self._wall = wall_clock
        # One entry per open round, its state and the lock that serialises it.
        self._rounds: dict[str, tuple[AggregationRound, threading.Lock]] = {}
        self._registry_lock = threading.Lock()

    # -- coordinator ---------------------------------------------------------------

    def open_round(self, spec: RoundSpec, *, actor: str = "coordinator") -> RoundStatus:
        """Open a round, unless its parameters are malformed or a site cannot afford it.

        Raises
        ------
        ConfigurationError
            The post-processor rejects the round's parameters.
        BudgetExceededError
            The round's release would take some site past its budget, judging by the
            site's mirrored ledger (:meth:`report_ledger`); sites that never reported
            are not judged here, and every site still checks its own ledger.
        """
        _check_postprocessor(spec)  # refused before anything is stored
        try:
            self._check_budgets(spec)
        except BudgetExceededError as exc:
            self._audit(actor, "open_round", spec.round_id, "refused", str(exc))
            raise
        with self._registry_lock:
            if spec.round_id in self._rounds or self._store.round_exists(spec.round_id):
                self._audit(actor, "open_round", spec.round_id, "refused", "round id in use")
                raise DuplicateSubmissionError(f"round {spec.round_id} already exists")
            state = AggregationRound(spec, now=self._clock())
            self._store.save_round(spec, state.phase.value, now=self._wall())
            self._rounds[spec.round_id] = (state, threading.Lock())
        self._audit(actor, "open_round", spec.round_id, "ok", f"sites={list(spec.site_ids)}")
        logger.info(
            "opened round %s (%s) for %d sites", spec.round_id, spec.kind, len(spec.site_ids)
        )
        return state.status(self._clock())

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

    def advertise(self, adv: KeyAdvertisement) -> RoundStatus:
        def step(state: AggregationRound) -> RoundStatus:
            return state.advertise(adv, now=self._clock())

        return self._apply(adv.round_id, adv.site_id, "advertise_key", step)

    def peer_keys(self, round_id: str, site_id: str) -> tuple[RoundStatus, dict[str, bytes]]:
        keys: dict[str, bytes] = {}

        def step(state: AggregationRound) -> RoundStatus:
            keys.update(state.peer_keys(site_id, now=self._clock()))
            return state.status(self._clock())

        status = self._apply(round_id, site_id, "get_peer_keys", step, audit_ok=False)
        return status, keys

    def submit(self, sub: MaskedSubmission) -> RoundStatus:
        def step(state: AggregationRound) -> RoundStatus:
            status = state.submit(sub, now=self._clock())
            if state.ready:
                try:
                    self._finish(state)
                except Exception as exc:
                    # Nothing was released: end the round rather than leave it waiting.
                    state.abort(f"finishing the round failed: {exc}")
                    if isinstance(exc, FedlensError):
                        raise
                    raise StorageError(
                        f"round {sub.round_id} could not be finished: {exc}"
                    ) from exc
                status = state.status(self._clock())
            return status

        return self._apply(sub.round_id, sub.site_id, "submit_masked", step)

    def decline(self, round_id: str, site_id: str, reason: str) -> RoundStatus:
        def step(state: AggregationRound) -> RoundStatus:
            return state.decline(site_id, reason, now=self._clock())

        return self._apply(round_id, site_id, "decline_round", step)

    def status(self, round_id: str) -> RoundStatus:
        def step(state: AggregationRound) -> RoundStatus:
            return state.status(self._clock())

        return self._apply(round_id, "", "round_status", step, audit_ok=False)

    # -- internals ---------------------------------------------------------------------

    def _apply(
        self,
        round_id: str,
        actor: str,
        action: str,
        step: Callable[[AggregationRound], RoundStatus],
        *,
        audit_ok: bool = True,
    ) -> RoundStatus:
        entry = self._rounds.get(round_id)
        if entry is None:
            self._audit(actor, action, round_id, "refused", "unknown round")
            raise UnknownRoundError(f"no open round {round_id!r}")
        state, lock = entry
        with lock:
            before = state.phase
            try:
                status = step(state)
            except FedlensError as exc:
                self._persist_phase(state, before)
                self._audit(actor, action, round_id, "refused", f"{type(exc).__name__}: {exc}")
                raise
            self._persist_phase(state, before)
            if audit_ok:
                self._audit(actor, action, round_id, "ok")
            return status

    def _persist_phase(self, state: AggregationRound, before: RoundPhase) -> None:
        if state.phase is before:
            return
        status = state.status(self._clock())
        self._store.update_round(
            state.spec.round_id,
            state.phase.value,
            now=self._wall(),
            reason=status.reason,
            release_id=status.release_id,
        )
        if state.phase is RoundPhase.ABORTED:
            logger.warning("round %s aborted: %s", state.spec.round_id, status.reason)

    def _finish(self, state: AggregationRound) -> None:
        spec = state.spec
        result = state.result()
        codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)
        noised_sum = codec.decode(result.encoded_sum)
        post = get_kind(spec.kind).postprocess(
            noised_sum, result.noise_std, spec.clip_bound, spec.labels, spec.params
        )
        created = self._wall()
        release = Release(
            release_id=uuid.uuid4().hex,
            round_id=spec.round_id,
            kind=spec.kind,
            created_at=created.isoformat(timespec="seconds"),
            noised_count=post.noised_count,
            values=post.values,
            grouped=post.grouped,
            costs=state.costs,
            params={k: v for k, v in spec.params.items() if k in _PUBLIC_PARAMS},
        )
        self._store.save_release(release, created_at=created)
        state.mark_complete(release.release_id)
        logger.info("round %s complete: release %s", spec.round_id, release.release_id)

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
