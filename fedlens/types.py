"""Shared domain types: what crosses the wire, in plain frozen dataclasses.

Only :mod:`fedlens.wire` converts these to and from protobuf messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedlens.errors import ConfigurationError
from fedlens.secagg_types import SecAggPhase

if TYPE_CHECKING:
    from privacy.ledger import LedgerEvent

__all__ = [
    "FeatureAttribution",
    "FeatureChange",
    "InputExplanation",
    "MaskedSubmission",
    "PrivacyCost",
    "Release",
    "ReleaseSummary",
    "ReleasedValue",
    "RoundPhase",
    "RoundSpec",
    "RoundStatus",
    "SiteLedger",
    "default_threshold",
]


RoundPhase = SecAggPhase
"""Where a secure-aggregation round stands (the phases of :class:`SecAggPhase`)."""


def default_threshold(num_sites: int) -> int:
    """``floor(2n/3) + 1``, capped at ``n``: a round then tolerates a third of its sites
    dropping out."""
    return min(num_sites, (2 * num_sites) // 3 + 1)


@dataclass(frozen=True)
class PrivacyCost:
    """What one site spent on one release: (epsilon, delta) alone, and its composed total."""

    site_id: str
    epsilon: float
    delta: float
    epsilon_total: float


@dataclass(frozen=True)
class RoundSpec:
    """Everything the aggregator needs to run a round and post-process its sum.

    Attributes
    ----------
    length
        Length of every contribution vector, ``len(labels) + 1`` (the last coordinate
        carries the record count times ``clip_bound``).
    bits, scale
        Fixed-point encoding modulo ``2**bits`` of ``value * scale``.
    threshold
        Least number of contributions the released sum may hold; 0 for the default.
    degree
        SecAgg+ neighbour degree (even), or 0 for masks between every pair of sites.
    noise, colluding
        ``"local"`` (each site adds the full noise) or ``"distributed"`` (each adds a
        discrete Gaussian share sized for ``threshold`` survivors of which ``colluding``
        may collude with the aggregator).
    """

    round_id: str
    kind: str
    site_ids: tuple[str, ...]
    length: int
    bits: int
    scale: float
    clip_bound: float
    labels: tuple[str, ...]
    phase_timeout_s: float = 120.0
    params: Mapping[str, str] = field(default_factory=dict)
    threshold: int = 0
    degree: int = 0
    noise: str = "local"
    colluding: int = 0

    @property
    def effective_threshold(self) -> int:
        """``threshold``, or ``floor(2n/3) + 1`` (at most ``n``) when it is 0."""
        return self.threshold or default_threshold(len(self.site_ids))


@dataclass(frozen=True)
class RoundStatus:
    round_id: str
    phase: RoundPhase
    advertised: tuple[str, ...] = ()
    submitted: tuple[str, ...] = ()
    release_id: str = ""
    reason: str = ""
    shared: tuple[str, ...] = ()
    unmasked: tuple[str, ...] = ()
    seconds_left: float = 0.0


@dataclass(frozen=True, eq=False)
class MaskedSubmission:
    """A site's masked fixed-point contribution, shape ``(length,)`` uint64."""

    round_id: str
    site_id: str
    values: np.ndarray
    cost: PrivacyCost
    noise_std: float

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskedSubmission):
            return NotImplemented
        return (
            (self.round_id, self.site_id, self.cost, self.noise_std)
            == (other.round_id, other.site_id, other.cost, other.noise_std)
            and self.values.dtype == other.values.dtype
            and np.array_equal(self.values, other.values)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class ReleasedValue:
    """One released number and the standard deviation of the privacy noise in it."""

    name: str
    value: float
    noise_std: float


@dataclass(frozen=True)
class Release:
    """An aggregated, noised, post-processed result with the privacy it cost each site."""

    release_id: str
    round_id: str
    kind: str
    created_at: str
    noised_count: float
    values: tuple[ReleasedValue, ...]
    grouped: tuple[ReleasedValue, ...]
    costs: tuple[PrivacyCost, ...]
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReleaseSummary:
    release_id: str
    round_id: str
    kind: str
    created_at: str
    num_sites: int


@dataclass(frozen=True)
class SiteLedger:
    """A site's privacy ledger as reported to, and mirrored by, the coordinator.

    ``epsilon_spent`` and ``accountant`` are the coordinator's own composition of
    ``events`` at ``delta``, and ``reserved_epsilon`` what the releases of its queued and
    running jobs add to ``epsilon_spent`` when composed with it; a site's report leaves
    them at their defaults.
    """

    site_id: str
    budget_epsilon: float
    delta: float
    events: tuple[LedgerEvent, ...]
    epsilon_spent: float = 0.0
    accountant: str = ""
    reserved_epsilon: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready; events as :meth:`privacy.LedgerEvent.to_dict`."""
        return {
            "site_id": self.site_id,
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "events": [event.to_dict() for event in self.events],
            "epsilon_spent": self.epsilon_spent,
            "accountant": self.accountant,
            "reserved_epsilon": self.reserved_epsilon,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SiteLedger:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ConfigurationError
            A field is missing or invalid; the message names it.
        """
        from privacy.ledger import LedgerEvent  # here, so that importing the kernel stays light

        try:
            events = data["events"]
            if not isinstance(events, list):
                raise TypeError("events must be a list")
            return cls(
                site_id=str(data["site_id"]),
                budget_epsilon=float(data["budget_epsilon"]),  # type: ignore[arg-type]
                delta=float(data["delta"]),  # type: ignore[arg-type]
                events=tuple(LedgerEvent.from_dict(event) for event in events),
                epsilon_spent=float(data.get("epsilon_spent", 0.0)),  # type: ignore[arg-type]
                accountant=str(data.get("accountant", "")),
                reserved_epsilon=float(data.get("reserved_epsilon", 0.0)),  # type: ignore[arg-type]
            )
        except KeyError as exc:
            raise ConfigurationError(f"site ledger lacks the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid site ledger: {exc}") from None


@dataclass(frozen=True)
class FeatureAttribution:
    """One original feature of an explained input: its raw value and attribution."""

    feature: str
    value: str
    attribution: float


@dataclass(frozen=True)
class FeatureChange:
    """One change a counterfactual proposes, as raw values."""

    feature: str
    original: str
    proposed: str


@dataclass(frozen=True)
class InputExplanation:
    """The explanation of one analyst's input by the global model; costs no privacy.

    Attributes
    ----------
    probability
        Probability the model gives ``predicted_label``.
    attributions
        Per original feature, by decreasing magnitude; positive pushes towards the
        dataset's positive class.
    changes
        A counterfactual: changes that flip the prediction (empty if none was found,
        and ``counterfactual_note`` says why).
    baseline
        What the attributions are relative to and where the counterfactual ranges come
        from: ``"feature_stats release ID"`` or ``"schema"``.
    """

    model_id: str
    predicted_label: str
    probability: float
    attributions: tuple[FeatureAttribution, ...]
    changes: tuple[FeatureChange, ...]
    counterfactual_label: str
    counterfactual_probability: float
    counterfactual_note: str
    card: str
    baseline: str
    method: str
