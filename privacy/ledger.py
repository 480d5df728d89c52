"""A site's privacy ledger: what has been spent, and whether the next release still fits.

The ledger is pure: events and the time they carry are passed in, nothing is read from the
clock or written anywhere (``client/ledger_store.py`` persists it).

Guarantee: :meth:`PrivacyLedger.record` appends an event only if the composition of every
recorded event and the new one is (ε, δ)-DP with ε at most the site's budget, for the
ledger's δ and add-or-remove-one neighbours. Composition is computed with privacy loss
distributions (``dp_accounting``'s PLD accountant with pessimistic discretisation, see
:mod:`privacy.gaussian`), which compose heterogeneous mechanisms tightly, as long as
every event is one PLD covers (DP-SGD steps and Gaussian releases). Once a discrete
Gaussian release is recorded (:mod:`privacy.discrete`), which PLD does not cover, the
ledger composes *all* its events in Rényi DP instead (``dp_accounting``'s RDP accountant),
which is looser but covers every kind; :attr:`PrivacyLedger.accountant` says which one is
in use. Either way ε is not additive across events, and :meth:`PrivacyLedger.remaining` is
only the difference of budget and spent ε, a figure for display.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from numbers import Integral, Real
from typing import Any, Literal

from fedlens.errors import BudgetExceededError, ConfigurationError
from privacy.discrete import discrete_gaussian_event
from privacy.gaussian import (
    PLD_VALUE_DISCRETIZATION,
    AccountantName,
    dpsgd_event,
    gaussian_event,
    new_accountant,
    pld_interval,
)

__all__ = ["EVENT_KINDS", "EventKind", "LedgerEvent", "PrivacyLedger"]

EventKind = Literal["dpsgd", "gaussian", "discrete_gaussian"]
EVENT_KINDS: tuple[EventKind, ...] = ("dpsgd", "gaussian", "discrete_gaussian")
# Kinds the PLD accountant composes; any other kind moves the whole ledger to RDP.
_PLD_KINDS = frozenset({"dpsgd", "gaussian"})


@dataclass(frozen=True)
class LedgerEvent:
    """One privacy-consuming release at a site.

    Attributes
    ----------
    kind
        ``"dpsgd"`` (``steps`` Poisson-subsampled Gaussian steps), ``"gaussian"`` (one
        Gaussian mechanism; ``sampling_rate`` and ``steps`` must stay 1) or
        ``"discrete_gaussian"`` (``steps`` discrete Gaussian releases, ``sampling_rate``
        1; accounted in RDP, see :mod:`privacy.discrete`).
    noise_multiplier
        Noise std divided by the L2 sensitivity, finite and > 0.
    sampling_rate
        Poisson sampling probability in (0, 1].
    steps
        Number of steps, >= 1.
    label
        Free text for people reading the ledger (round id, explanation kind).
    created_at
        When the event was recorded; passed in by the caller (timezone-aware UTC
        preferred).
    """

    kind: EventKind
    noise_multiplier: float
    sampling_rate: float = 1.0
    steps: int = 1
    label: str = ""
    created_at: datetime = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ConfigurationError(
                f"kind must be one of {', '.join(EVENT_KINDS)}, got {self.kind!r}"
            )
        z = self.noise_multiplier
        if isinstance(z, bool) or not isinstance(z, Real) or not math.isfinite(z) or z <= 0:
            raise ConfigurationError(f"noise_multiplier must be finite and > 0, got {z!r}")
        q = self.sampling_rate
        if isinstance(q, bool) or not isinstance(q, Real) or not 0 < q <= 1:
            raise ConfigurationError(f"sampling_rate must be in (0, 1], got {q!r}")
        steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
            raise ConfigurationError(f"steps must be an integer >= 1, got {steps!r}")
        # Plain Python numbers, so that events compare, hash and serialise alike.
        object.__setattr__(self, "noise_multiplier", float(z))
        object.__setattr__(self, "sampling_rate", float(q))
        object.__setattr__(self, "steps", int(steps))
        if self.kind == "gaussian" and (q != 1 or steps != 1):
            raise ConfigurationError("a 'gaussian' event has sampling_rate 1 and steps 1")
        if self.kind == "discrete_gaussian" and q != 1:
            raise ConfigurationError("a 'discrete_gaussian' event has sampling_rate 1")
        if not isinstance(self.label, str):
            raise ConfigurationError(f"label must be a string, got {self.label!r}")
        if not isinstance(self.created_at, datetime):
            raise ConfigurationError(f"created_at must be a datetime, got {self.created_at!r}")

    def pld_interval(self) -> float:
        """The PLD discretisation interval that resolves this event's steps."""
        return pld_interval(self.noise_multiplier, self.sampling_rate)

    def dp_event(self) -> Any:
        """The event in ``dp_accounting``'s vocabulary."""
        if self.kind == "gaussian":
            return gaussian_event(self.noise_multiplier)
        if self.kind == "discrete_gaussian":
            return discrete_gaussian_event(self.noise_multiplier, self.steps)
        return dpsgd_event(self.noise_multiplier, self.sampling_rate, self.steps)

    def to_dict(self) -> dict[str, str | float | int]:
        """A JSON-ready mapping; ``created_at`` in ISO 8601."""
        return {
            "kind": self.kind,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps": self.steps,
            "label": self.label,
            "created_at": self.created_at.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEvent:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ConfigurationError
            A field is missing or invalid; the message names it.
        """
        try:
            created_at = datetime.fromisoformat(str(data["created_at"]))
            return cls(
                kind=data["kind"],
                noise_multiplier=float(data["noise_multiplier"]),
                sampling_rate=float(data.get("sampling_rate", 1.0)),
                steps=_as_int(data.get("steps", 1)),
                label=str(data.get("label", "")),
                created_at=created_at,
            )
        except KeyError as exc:
            raise ConfigurationError(f"ledger event lacks the field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid ledger event {dict(data)!r}: {exc}") from exc


class PrivacyLedger:
    """The events a site has spent its (ε, δ) budget on, and the check for the next one.

    Parameters
    ----------
    budget_epsilon
        The site's total ε, finite and > 0.
    delta
        The site's δ, in (0, 1); every ε here is computed at this δ.
    events
        Events already spent (for example loaded from storage). They are accepted even if
        they exceed the budget (after a change of accountant, say): the ledger then refuses
        every new event.

    Notes
    -----
    The composed accountant is kept and extended event by event, so ``epsilon_spent`` is
    computed once per recorded event, and ``check`` followed by ``record`` of the same
    event composes it only once. Not thread-safe: callers hold a lock.
    """

    def __init__(
        self, budget_epsilon: float, delta: float, events: Sequence[LedgerEvent] = ()
    ) -> None:
        if not math.isfinite(budget_epsilon) or budget_epsilon <= 0:
            raise ConfigurationError(f"budget_epsilon must be finite and > 0, got {budget_epsilon}")
        if not 0 < delta < 1:
            raise ConfigurationError(f"delta must be in (0, 1), got {delta}")
        self._budget = float(budget_epsilon)
        self._delta = float(delta)
        self._events: list[LedgerEvent] = []
        self._accountant_name: AccountantName = "pld"
        self._interval = PLD_VALUE_DISCRETIZATION
        self._accountant: Any = new_accountant("pld")
        self._spent = 0.0
        self._pending: tuple[LedgerEvent, Any, float] | None = None
        for event in events:
            self._append(event, *self._compose(event))

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(budget_epsilon={self._budget}, delta={self._delta}, "
            f"events={len(self._events)}, spent={self._spent:.4g})"
        )

    @property
    def budget_epsilon(self) -> float:
        return self._budget

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def accountant(self) -> AccountantName:
        """``"pld"`` while every event is one PLD covers, ``"rdp"`` after any other."""
        return self._accountant_name

    @property
    def events(self) -> tuple[LedgerEvent, ...]:
        """The recorded events, oldest first."""
        return tuple(self._events)

    def epsilon_spent(self) -> float:
        """ε at the ledger's δ of all recorded events composed (0 for an empty ledger)."""
        return self._spent

    def remaining(self) -> float:
        """``max(0, budget - spent)``, for display (ε does not add up across events)."""
        return max(0.0, self._budget - self._spent)

    def epsilon_with(self, event: LedgerEvent) -> float:
        """ε at the ledger's δ if ``event`` were recorded too; records nothing."""
        return self._compose(event)[1]

    def epsilon_with_all(self, events: Sequence[LedgerEvent]) -> float:
        """ε at the ledger's δ if ``events`` were recorded too, in order; records nothing.

        Composes exactly as recording them one by one would, so the result is the ε the
        ledger would reach.
        """
        events = list(events)
        for event in events:
            if not isinstance(event, LedgerEvent):
                raise ConfigurationError(f"expected a LedgerEvent, got {type(event).__name__}")
        if not events:
            return self._spent
        accountant = self._accountant_for(events)
        for event in events:
            accountant.compose(event.dp_event())
        return float(accountant.get_epsilon(self._delta))

    def _accountant_for(self, new: Sequence[LedgerEvent]) -> Any:
        """A copy of the accountant, fit to compose ``new`` too; the ledger is unchanged.

        Rebuilt from every recorded event when ``new`` needs RDP (a kind PLD does not
        cover) or a finer PLD grid than the one in use; a copy otherwise.
        """
        name, interval = self._needs(new)
        if (name, interval) == (self._accountant_name, self._interval):
            return copy.deepcopy(self._accountant)
        accountant = new_accountant(name, interval=interval)
        for earlier in self._events:
            accountant.compose(earlier.dp_event())
        return accountant

    def _needs(self, new: Sequence[LedgerEvent]) -> tuple[AccountantName, float]:
        if self._accountant_name == "rdp" or any(e.kind not in _PLD_KINDS for e in new):
            return "rdp", self._interval
        return "pld", min([self._interval, *(e.pld_interval() for e in new)])

    def check(self, event: LedgerEvent) -> float:
        """The ε that recording ``event`` would bring the site to, if it fits the budget.

        Raises
        ------
        BudgetExceededError
            The composition would exceed the budget; nothing is recorded.
        """
        after = self.epsilon_with(event)
        if not after <= self._budget:
            raise BudgetExceededError(
                f"site budget ε = {self._budget:.4g} at δ = {self._delta:.3g}: "
                f"spent ε = {self._spent:.4g}; {event.kind} event {event.label!r} "
                f"(noise multiplier {event.noise_multiplier:.4g}, sampling rate "
                f"{event.sampling_rate:.4g}, {event.steps} steps) would bring it to "
                f"ε = {after:.4g}"
            )
        return after

    def record(self, event: LedgerEvent) -> float:
        """Check ``event`` against the budget and append it; returns the new spent ε.

        Raises
        ------
        BudgetExceededError
            As :meth:`check`; the ledger is unchanged.
        """
        self.check(event)
        self._append(event, *self._compose(event))
        return self._spent

    def _compose(self, event: LedgerEvent) -> tuple[Any, float]:
        """The accountant with ``event`` composed onto the recorded ones, and its ε."""
        if not isinstance(event, LedgerEvent):
            raise ConfigurationError(f"expected a LedgerEvent, got {type(event).__name__}")
        pending = self._pending
        if pending is not None and pending[0] == event:
            return pending[1], pending[2]
        # One accountant covers the whole history: RDP once any event needs it, else PLD
        # on a grid fine enough for every event.
        accountant = self._accountant_for([event])
        accountant.compose(event.dp_event())
        epsilon = float(accountant.get_epsilon(self._delta))
        self._pending = (event, accountant, epsilon)
        return accountant, epsilon

    def _append(self, event: LedgerEvent, accountant: Any, epsilon: float) -> None:
        self._accountant_name, self._interval = self._needs([event])
        self._events.append(event)
        self._accountant = accountant
        self._spent = epsilon
        self._pending = None


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"steps must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"steps must be an integer, got {value!r}")
        return int(value)
    return int(value)
