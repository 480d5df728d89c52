"""The aggregator: opens secure-aggregation rounds and stores what they release.

No gRPC here: :mod:`server.grpc_server` decodes requests, calls these methods and encodes
the answers. Every accepted message and every refusal is written to the audit log. The
rounds themselves are run by :mod:`server.rounds`; analysts' reads are
:mod:`server.query_handler`.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch

from explain import get_kind
from fedlens.errors import (
    BudgetExceededError,
    ConfigurationError,
    DuplicateSubmissionError,
    FedlensError,
    IntegrityError,
)
from fedlens.types import RoundSpec, RoundStatus, SiteLedger
from privacy import LedgerEvent, PrivacyLedger, gaussian_noise_multiplier
from privacy.secagg_server import ServerSession
from server.identities import IdentityRegistry
from server.input_explanation import publish_model
from server.query_handler import QueryHandler, with_epsilon
from server.round_journal import JournalEntry
from server.rounds import LiveRound, RoundTable, protocol_params
from server.storage import Store, StoredModel

__all__ = ["Aggregator", "QueryHandler", "Reservation"]  # QueryHandler: server.query_handler

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class Reservation:
    """Releases that accepted work (a queued or running job) will make at a site but that
    its ledger does not hold yet: ``releases`` Gaussian releases at (ε, δ).

    Attributes
    ----------
    label
        What reserves them, e.g. ``"job 1f0c..."``.
    epsilon, delta
        The (ε, δ) of each release.
    releases
        How many releases.
    """

    label: str
    epsilon: float
    delta: float
    releases: int = 1


class Aggregator(RoundTable):
    """The coordinator's side of the aggregator: opens rounds (after checking their
    parameters and the mirrored budgets), mirrors ledgers and stores the trained model;
    the site-facing half, with journaling and restart, is :class:`RoundTable`.

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
        clock: Callable[[], float] = time.time,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(
            store, identities=identities, enrolment=enrolment, clock=clock, wall_clock=wall_clock
        )

    @property
    def store(self) -> Store:
        """The store rounds, releases, mirrored ledgers and models go to."""
        return self._store

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
        params = protocol_params(spec)
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
            live = LiveRound(spec, session)
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

    def _check_budgets(self, spec: RoundSpec) -> None:
        epsilon, delta = spec.params.get("epsilon"), spec.params.get("delta")
        if epsilon is None or delta is None:
            return
        try:
            eps, dlt = float(epsilon), float(delta)
        except ValueError as exc:
            raise ConfigurationError(
                f"round {spec.round_id}: bad epsilon or delta: {exc}"
            ) from None
        self.check_budgets(spec.site_ids, eps, dlt, what=f"round {spec.round_id}")

    def check_budgets(
        self,
        site_ids: Sequence[str],
        epsilon: float,
        delta: float,
        *,
        releases: int = 1,
        what: str = "the round",
        reserved: Sequence[Reservation] = (),
    ) -> None:
        """Refuse ``releases`` Gaussian releases at (ε, δ) that some site's mirrored ledger
        could not pay for, on top of the ``reserved`` releases of work already accepted.

        Each site composes (PLD) its mirrored events, then every reserved release, then the
        new ones, exactly as its own ledger would record them: the check passes only if
        the site could pay for the reserved work and this together.

        Raises
        ------
        ConfigurationError
            ε or δ (of the new releases or of a reservation) is out of range.
        BudgetExceededError
            Some site of ``site_ids`` would go past its budget; the message names each
            such site with its budget, what it has spent, what the reservations hold and
            what the releases would bring it to.
        """
        event = self._gaussian(epsilon, delta, what)
        held = [
            self._gaussian(r.epsilon, r.delta, r.label) for r in reserved for _ in range(r.releases)
        ]
        short = []
        for mirrored in self._store.site_ledgers():
            if mirrored.site_id not in site_ids:
                continue
            ledger = PrivacyLedger(mirrored.budget_epsilon, mirrored.delta, mirrored.events)
            after = ledger.epsilon_with_all([*held, *[event] * releases])
            if after <= ledger.budget_epsilon:
                continue
            detail = f"budget ε = {ledger.budget_epsilon:g}, spent ε = {ledger.epsilon_spent():.3f}"
            if held:
                committed = ledger.epsilon_with_all(held) - ledger.epsilon_spent()
                detail += (
                    f", reserved ε = {committed:.3f} by {len(reserved)} queued or running job(s)"
                )
            detail += f"; the release would bring it to {after:.3f}"
            if held:
                alone = ledger.epsilon_with_all([event] * releases)
                detail += f", without the reserved jobs to {alone:.3f}"
            short.append(f"{mirrored.site_id} ({detail})")
        if short:
            count = "a release" if releases == 1 else f"{releases} releases"
            raise BudgetExceededError(
                f"{what} refused: {count} at ε = {epsilon:g}, δ = {delta:g} "
                f"does not fit the mirrored ledger of {', '.join(short)}"
            )

    def reserved_epsilon(self, reserved: Sequence[Reservation]) -> dict[str, float]:
        """The ε ``reserved`` holds at each mirrored site, by site id.

        That is the ε the site's mirrored events and every reserved release compose to,
        less the ε it has spent (PLD composition is not additive, so this is what the
        reservations add on top of the spent ε, not their ε alone); 0 with nothing
        reserved.
        """
        held = [
            self._gaussian(r.epsilon, r.delta, r.label) for r in reserved for _ in range(r.releases)
        ]
        amounts = {}
        for mirrored in self._store.site_ledgers():
            ledger = PrivacyLedger(mirrored.budget_epsilon, mirrored.delta, mirrored.events)
            amounts[mirrored.site_id] = (
                ledger.epsilon_with_all(held) - ledger.epsilon_spent() if held else 0.0
            )
        return amounts

    def _gaussian(self, epsilon: float, delta: float, what: str) -> LedgerEvent:
        try:
            return LedgerEvent(
                kind="gaussian",
                noise_multiplier=gaussian_noise_multiplier(epsilon, delta),
                label=what,
                created_at=self._wall(),
            )
        except ValueError as exc:
            raise ConfigurationError(f"{what}: bad epsilon or delta: {exc}") from None

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
        return with_epsilon(ledger, composed)

    def get_model(self, model_id: str = "") -> tuple[StoredModel, bytes]:
        """A stored model (the latest if ``model_id`` is empty) and its weights as
        ``torch.save`` bytes; :class:`NotFoundError` if there is none."""
        stored = self._store.get_model(model_id) if model_id else self._store.latest_model()
        buffer = io.BytesIO()
        torch.save(dict(stored.state), buffer)
        return stored, buffer.getvalue()

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
