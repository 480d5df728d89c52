"""Read access for analysts: releases, mirrored budgets, and explanations of their own
inputs with the stored model. Nothing here costs privacy."""

from __future__ import annotations

from collections.abc import Mapping

from fedlens.types import InputExplanation, Release, ReleaseSummary, SiteLedger
from privacy import PrivacyLedger
from server.input_explanation import explain_stored_input
from server.storage import Store

__all__ = ["QueryHandler", "with_epsilon"]


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
            with_epsilon(m, PrivacyLedger(m.budget_epsilon, m.delta, m.events))
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


def with_epsilon(ledger: SiteLedger, composed: PrivacyLedger) -> SiteLedger:
    return SiteLedger(
        site_id=ledger.site_id,
        budget_epsilon=ledger.budget_epsilon,
        delta=ledger.delta,
        events=ledger.events,
        epsilon_spent=composed.epsilon_spent(),
        accountant=composed.accountant,
    )
