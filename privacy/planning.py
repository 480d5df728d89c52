"""Planning a site's budget before anything runs: how much goes to training, how much to releases.

A run at a site is ``rounds`` FedAvg rounds of DP-SGD (each ``local_epochs`` expected
passes with Poisson batches of expected size ``batch_size``) followed by ``releases``
Gaussian explanation releases. :func:`plan_budget` turns a site budget (ε, δ) into the
noise multipliers of both, and :func:`check_plan` checks explicit per-part ε against a
budget. Both compose the planned events exactly as the site ledger will
(:class:`privacy.ledger.PrivacyLedger`, PLD accounting), so a plan that is accepted here
is one the ledger accepts event by event, on an empty ledger.

Splitting. Under PLD, ε is not additive: a DP-SGD part calibrated alone to
``training_share * ε`` and releases calibrated alone to the rest would together spend
less than ε. :func:`plan_budget` therefore calibrates training alone to its share and
then gives the releases the *smallest* noise for which the whole composition still fits
ε, so the budget is used, not wasted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from fedlens.errors import ConfigurationError
from privacy.gaussian import (
    _smallest_within,
    dpsgd_noise_multiplier,
    epsilon_of_gaussian,
    gaussian_noise_multiplier,
)
from privacy.ledger import LedgerEvent, PrivacyLedger

__all__ = ["BudgetPlan", "PlanRequest", "check_plan", "plan_budget", "training_schedule"]

# A release noise multiplier beyond this leaves nothing to read in the release (its noise
# std is this many times the largest possible change of one record); a plan that needs
# more does not fit the budget.
MAX_RELEASE_NOISE_MULTIPLIER = 1e3


@dataclass(frozen=True)
class PlanRequest:
    """What a site is asked to pay for in one run.

    Attributes
    ----------
    budget_epsilon, delta
        The site's budget; ``0 < delta < 1 / records``.
    records
        Records at the site (the DP-SGD sampling rate is ``batch_size / records``).
    batch_size, rounds, local_epochs
        The DP-SGD schedule.
    releases
        Gaussian explanation releases after training, >= 0.
    training_share
        Fraction of ε given to training when splitting, in (0, 1]; 1 only without releases.
    """

    budget_epsilon: float
    delta: float
    records: int
    batch_size: int
    rounds: int
    local_epochs: int
    releases: int = 1
    training_share: float = 0.7

    def __post_init__(self) -> None:
        _check_budget(self.budget_epsilon, self.delta, self.records)
        for name, low in (("batch_size", 1), ("rounds", 1), ("local_epochs", 1), ("releases", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 < self.training_share <= 1:
            raise ConfigurationError(f"training_share must be in (0, 1], got {self.training_share}")
        if self.releases and self.training_share == 1:
            raise ConfigurationError(
                "training_share must be below 1 when releases > 0: the releases need "
                "a share of the budget"
            )


@dataclass(frozen=True)
class BudgetPlan:
    """How a site's budget is spent by one run, with the noise of every part.

    Attributes
    ----------
    sampling_rate, steps_per_round
        DP-SGD's Poisson rate ``q`` and steps per FedAvg round.
    training_noise_multiplier, training_epsilon
        DP-SGD's noise (std / clip bound) and the ε of all its steps alone, at δ.
    release_noise_multiplier, release_epsilon
        One release's noise (std / L2 sensitivity) and its ε alone at δ; ``None`` and 0
        without releases.
    epsilon_total
        ε at δ of the whole run composed (PLD), at most ``budget_epsilon``.
    """

    request: PlanRequest
    sampling_rate: float
    steps_per_round: int
    training_noise_multiplier: float
    training_epsilon: float
    release_noise_multiplier: float | None
    release_epsilon: float
    epsilon_total: float

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.request.rounds

    def events(self, now: datetime) -> list[LedgerEvent]:
        """The ledger events of the run, in the order the site spends them."""
        events = [
            LedgerEvent(
                kind="dpsgd",
                noise_multiplier=self.training_noise_multiplier,
                sampling_rate=self.sampling_rate,
                steps=self.steps_per_round,
                label=f"training round {r}",
                created_at=now,
            )
            for r in range(1, self.request.rounds + 1)
        ]
        if self.release_noise_multiplier is not None:
            events += [
                LedgerEvent(
                    kind="gaussian",
                    noise_multiplier=self.release_noise_multiplier,
                    label=f"release {k}",
                    created_at=now,
                )
                for k in range(1, self.request.releases + 1)
            ]
        return events


def training_schedule(records: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """``(q, steps per round)``: Poisson rate and steps of ``local_epochs`` expected passes.

    With ``b = ceil(records / batch_size)`` batches per pass, ``q = 1 / b`` (the rate
    Opacus's Poisson sampler uses, expected batch size ``records / b <= batch_size``) and
    ``local_epochs * b`` steps.
    """
    if isinstance(records, bool) or not isinstance(records, int) or records < 1:
        raise ConfigurationError(f"a site needs at least one record to train, got {records!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batches = math.ceil(records / batch_size)
    return 1.0 / batches, local_epochs * batches


def plan_budget(request: PlanRequest) -> BudgetPlan:
    """Split ``request.budget_epsilon`` between DP-SGD and the releases.

    Training is calibrated alone to ``training_share * budget``; the releases then get the
    smallest noise for which the composed run fits the budget (see the module docstring).

    Raises
    ------
    ConfigurationError
        The request is invalid, or the releases would need more noise than
        :data:`MAX_RELEASE_NOISE_MULTIPLIER`; the message names the setting to change.
    """
    q, steps = training_schedule(request.records, request.batch_size, request.local_epochs)
    total_steps = steps * request.rounds
    budget, delta = request.budget_epsilon, request.delta
    train_eps = request.training_share * budget if request.releases else budget
    z_train = dpsgd_noise_multiplier(train_eps, delta, q, total_steps)
    composed = _Composer(request, q, steps, z_train)
    training_only = composed(None)
    if not request.releases:
        return BudgetPlan(request, q, steps, z_train, training_only, None, 0.0, training_only)

    start = gaussian_noise_multiplier((1 - request.training_share) * budget, delta)
    # The composition is decreasing in the release noise; at least the standalone guess fits.
    z_release = _smallest_within(composed, budget, start, 1e-4)
    if z_release > MAX_RELEASE_NOISE_MULTIPLIER:
        raise ConfigurationError(
            f"the plan does not fit ε = {budget:g}: each of {request.releases} releases "
            f"would need noise {z_release:.3g} times its sensitivity; raise the budget, "
            "lower training_share or the number of releases"
        )
    return BudgetPlan(
        request,
        q,
        steps,
        z_train,
        training_only,
        z_release,
        epsilon_of_gaussian(z_release, delta),
        composed(z_release),
    )


def check_plan(
    request: PlanRequest,
    train_epsilon: float,
    release_epsilon: float,
    release_delta: float,
    *,
    training_noise_multiplier: float | None = None,
) -> BudgetPlan:
    """The plan with explicit ε for training and for each release, if it fits the budget.

    ``train_epsilon`` is DP-SGD's ε alone at the site's δ; each release is a Gaussian
    mechanism calibrated to ``(release_epsilon, release_delta)`` alone. A caller that has
    already calibrated DP-SGD for ``train_epsilon`` over the whole schedule passes that
    ``training_noise_multiplier`` instead of having it calibrated again.

    Raises
    ------
    ConfigurationError
        A setting is out of range, or the composed run exceeds the budget (the message
        gives the composed ε and the budget).
    """
    for name, value in (("train_epsilon", train_epsilon), ("release_epsilon", release_epsilon)):
        if not math.isfinite(value) or value <= 0:
            raise ConfigurationError(f"{name} must be finite and > 0, got {value}")
    if not 0 < release_delta < 1:
        raise ConfigurationError(f"release_delta must be in (0, 1), got {release_delta}")
    q, steps = training_schedule(request.records, request.batch_size, request.local_epochs)
    z_train = training_noise_multiplier or dpsgd_noise_multiplier(
        train_epsilon, request.delta, q, steps * request.rounds
    )
    z_release = gaussian_noise_multiplier(release_epsilon, release_delta)
    with_releases = z_release if request.releases else None
    composed = _Composer(request, q, steps, z_train)
    total = composed(with_releases)
    if total > request.budget_epsilon:
        raise ConfigurationError(
            f"the plan does not fit the site budget ε = {request.budget_epsilon:g} at "
            f"δ = {request.delta:g}: {request.rounds} training rounds at ε = {train_epsilon:g} "
            f"and {request.releases} release(s) at ε = {release_epsilon:g} compose to "
            f"ε = {total:.4g}; lower train_epsilon, release_epsilon or the number of rounds "
            "or releases, or raise the budget"
        )
    return BudgetPlan(
        request,
        q,
        steps,
        z_train,
        composed(None),
        with_releases,
        epsilon_of_gaussian(z_release, request.delta) if request.releases else 0.0,
        total,
    )


class _Composer:
    """ε of the run as a function of the release noise, the training part composed once."""

    def __init__(self, request: PlanRequest, q: float, steps: int, z_train: float) -> None:
        self._plan = BudgetPlan(request, q, steps, z_train, 0.0, None, 0.0, 0.0)
        self._releases = request.releases
        # A ledger with an unreachable budget: only its ε is wanted.
        self._ledger = PrivacyLedger(1e12, request.delta, self._plan.events(_EPOCH))

    def __call__(self, z_release: float | None) -> float:
        if z_release is None or not self._releases:
            return self._ledger.epsilon_spent()
        release = LedgerEvent(kind="gaussian", noise_multiplier=z_release, created_at=_EPOCH)
        return self._ledger.epsilon_with_all([release] * self._releases)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _check_budget(epsilon: float, delta: float, records: int) -> None:
    if isinstance(records, bool) or not isinstance(records, int) or records < 1:
        raise ConfigurationError(f"records must be an integer >= 1, got {records!r}")
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise ConfigurationError(f"epsilon must be finite and > 0, got {epsilon}")
    if not 0 < delta < 1 / records:
        raise ConfigurationError(
            f"delta must be in (0, 1/records) = (0, {1 / records:.3g}) for {records} records, "
            f"got {delta:g}: a larger δ allows releasing a record outright"
        )
