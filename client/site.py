"""A site's work for the federation, with no Flower in it.

:mod:`client.flower_app` decodes Flower messages, calls these functions and encodes the
replies. Each function asks the site's ledger before doing anything that touches the
site's records.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from client.explanation import ExplainOutcome, ExplainRequest, contribute_explanation
from client.ledger_store import LedgerStore
from client.secagg_client import AggregationClient
from client.site_config import SiteConfig
from client.site_state import remember_factors, remember_model, remember_site
from client.training import planned_steps, train_dp
from fedlens.datasets import SiteData, load_dataset
from fedlens.errors import BudgetExceededError
from fedlens.identity import create_identity, load_identity_key
from fedlens.models import build_model
from fedlens.runconfig import RunConfig
from fedlens.types import SiteLedger
from privacy import LedgerEvent, NoiseSource, PrivacyLedger, SecureRandom, dpsgd_noise_multiplier
from privacy.planning import BudgetPlan, PlanRequest, check_plan

__all__ = ["Site", "TrainOutcome"]

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TrainOutcome:
    """What leaves the site after a round: the DP-trained weights and its ε so far.

    Record counts and training losses stay at the site: they are not noised.
    """

    state: dict[str, torch.Tensor]
    epsilon_total: float


class Site:
    """One site in one run: its configuration, its records and its ledger."""

    def __init__(self, run: RunConfig, config: SiteConfig) -> None:
        self.run = run
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        # Kept for the site operator's own tools (fedlens client review); never sent.
        remember_site(
            config.state_dir, run.to_flower(), config.model_dump(by_alias=True, mode="json")
        )
        if config.threads:
            torch.set_num_threads(config.threads)

    @property
    def name(self) -> str:
        return self.config.name

    def data(self) -> SiteData:
        dataset = load_dataset(self.run.dataset, seed=self.run.seed)
        return dataset.site(
            self.config.partition_id,
            self.config.num_partitions,
            partition=self.run.partition,
            alpha=self.run.alpha,
            seed=self.run.seed,
        )

    def ledger(self) -> tuple[LedgerStore, PrivacyLedger]:
        store = LedgerStore(self.config.ledger_path)
        return store, store.load(self.config.epsilon, self.config.delta)

    def ledger_snapshot(self) -> SiteLedger:
        """The site's whole ledger, as the coordinator mirrors it.

        It holds budgets and mechanism parameters only; the DP-SGD sampling rate
        ``1 / ceil(records / batch_size)`` does reveal the site's approximate record count.
        The events are read, not composed: the coordinator composes them itself.
        """
        budget, delta, events = LedgerStore(self.config.ledger_path).stored()
        return SiteLedger(site_id=self.name, budget_epsilon=budget, delta=delta, events=events)

    def model(self, dimension: int, state: StateDict) -> nn.Module:
        model = build_model(self.run.model, dimension, seed=self.run.seed)
        model.load_state_dict(state)
        return model

    def training_noise(self, q: float, total_steps: int) -> float:
        """DP-SGD noise multiplier for the planned training, calibrated once per plan.

        Calibration is deterministic in its inputs, so the site keeps the result beside its
        ledger instead of recomputing it in every round's fresh process.
        """
        path = self.config.state_dir / "noise.json"
        key = f"{self.run.train_epsilon!r}:{self.config.delta!r}:{q!r}:{total_steps}"
        cache: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        if key not in cache:
            cache[key] = dpsgd_noise_multiplier(
                self.run.train_epsilon, self.config.delta, q, total_steps
            )
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(path)
        return cache[key]

    def plan(self, records: int) -> BudgetPlan:
        """The whole run's plan at this site, checked against the site's budget alone.

        Raises
        ------
        ConfigurationError
            A setting is out of range for this site (δ must be below 1/records), or the
            run's training and releases compose to more than the site's budget.
        """
        run = self.run
        request = PlanRequest(
            budget_epsilon=self.config.epsilon,
            delta=self.config.delta,
            records=records,
            batch_size=run.batch_size,
            rounds=run.rounds,
            local_epochs=run.local_epochs,
            releases=run.releases,
        )
        q, steps = planned_steps(records, run.batch_size, run.local_epochs)
        return check_plan(
            request,
            run.train_epsilon,
            run.explain_epsilon,
            run.explain_delta,
            # The same calibration train() uses, cached: not computed twice in round 1.
            training_noise_multiplier=self.training_noise(q, steps * run.rounds),
        )

    def check_run_fits(self, records: int, *, now: datetime) -> BudgetPlan:
        """Refuse the run before any work unless all of it fits what the site has left.

        Raises
        ------
        ConfigurationError
            As :meth:`plan`.
        BudgetExceededError
            The run fits an empty ledger but not the events already recorded.
        """
        plan = self.plan(records)
        _, ledger = self.ledger()
        after = ledger.epsilon_with_all(plan.events(now))
        if after > ledger.budget_epsilon:
            raise BudgetExceededError(
                f"site {self.name}: budget ε = {ledger.budget_epsilon:g} at δ = "
                f"{ledger.delta:g}, spent ε = {ledger.epsilon_spent():.4g}; this run "
                f"({self.run.rounds} training rounds and {self.run.releases} release(s)) "
                f"would bring it to ε = {after:.4g}. Nothing was spent"
            )
        return plan

    def train(self, state: StateDict, server_round: int, *, now: datetime) -> TrainOutcome:
        """One FedAvg round of DP-SGD; refused before training if the budget cannot pay.

        In the first round the whole run is checked first (:meth:`check_run_fits`), so a
        run the site cannot finish is refused before it spends anything.
        """
        run = self.run
        data = self.data()
        remember_model(self.config.state_dir, state)
        if server_round == 1:
            self.check_run_fits(len(data.labels), now=now)
        q, steps = planned_steps(len(data.labels), run.batch_size, run.local_epochs)
        # Noise for the whole planned training, so that every round's spend is the same.
        z = self.training_noise(q, steps * run.rounds)
        event = LedgerEvent(
            kind="dpsgd",
            noise_multiplier=z,
            sampling_rate=q,
            steps=steps,
            label=f"training round {server_round}",
            created_at=now,
        )
        # Checked and stored in one transaction; BudgetExceededError spends nothing.
        epsilon_after = LedgerStore(self.config.ledger_path).spend(
            event, self.config.epsilon, self.config.delta
        )
        model = self.model(data.features.shape[1], state)
        result = train_dp(
            model,
            data.features,
            data.labels,
            epochs=run.local_epochs,
            batch_size=run.batch_size,
            learning_rate=run.learning_rate,
            noise_multiplier=z,
            max_grad_norm=run.max_grad_norm,
            noise_source=SecureRandom(),
        )
        logger.info(
            "%s round %d: %d steps, ε %.3f of %.3f",
            self.name,
            server_round,
            result.steps,
            epsilon_after,
            self.config.epsilon,
        )
        return TrainOutcome(state=model.state_dict(), epsilon_total=epsilon_after)

    def explain(
        self,
        request: ExplainRequest,
        state: StateDict,
        *,
        now: datetime,
        rng: NoiseSource | None = None,
    ) -> ExplainOutcome:
        """Contribute this site's clipped, noised, masked explanation to the aggregator."""
        data = self.data()
        model = self.model(data.features.shape[1], state)
        remember_model(self.config.state_dir, state)
        remember_factors(self.config.state_dir, request.params, request.public)
        store, ledger = self.ledger()
        return contribute_explanation(
            request,
            site_id=self.name,
            model=model,
            features=data.features,
            labels=data.labels,
            ledger=ledger,
            store=store,
            rng=rng or SecureRandom(),
            now=now,
            sensitive=data.sensitive,
            identity=self.identity(),
            connect=self._connect,
            site_breakdown=self.config.site_breakdown,
        )

    def _connect(self, address: str) -> AggregationClient:
        """A connection to the aggregator, over TLS when the site was given its CA."""
        return AggregationClient(address, tls_ca=self.config.aggregator_ca)

    def identity(self) -> Ed25519PrivateKey:
        """The site's Ed25519 identity key, created in its state directory on first use.

        Its public half (``<site>.pub`` beside it) is what an admin enrols at the
        coordinator; a coordinator with first-use enrolment records it at the first round.
        """
        directory = self.config.state_dir / "identity"
        key = directory / f"{self.name}.key"
        if not key.exists():
            directory.mkdir(parents=True, exist_ok=True)
            create_identity(directory, self.name)
        return load_identity_key(key)
