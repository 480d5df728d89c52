"""A site's part in an explanation round, independent of Flower.

Order matters for privacy: the ledger is asked first (nothing is computed for a request
the budget cannot pay), the spend is recorded before any noised value leaves the site,
and only the masked, noised, fixed-point vector is sent. The contribution is computed
before the site advertises its key, so a site whose explanation refuses its data (a
cohort below the round's minimum size) declines before taking any part in the protocol.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from client.ledger_store import LedgerStore
from client.secagg_client import AggregationClient, SiteInput, run_secure_round
from explain import Contribution, ExplanationKind, SiteContext, get_kind, l2_sensitivity
from fedlens.errors import ConfigurationError, FedlensError, ProtocolError
from fedlens.types import PrivacyCost, RoundStatus
from privacy import (
    FixedPointCodec,
    LedgerEvent,
    NoiseSource,
    PrivacyLedger,
    calibrate_shares,
    discrete_gaussian_noise_multiplier,
    encoded_sensitivity,
    epsilon_of_discrete_gaussian,
    gaussian_noise_multiplier,
    sample_discrete_gaussian,
)
from privacy.secagg_params import SecAggParams, default_threshold
from privacy.secagg_site import SiteSession

__all__ = ["ExplainOutcome", "ExplainRequest", "contribute_explanation"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplainRequest:
    """What the coordinator asks of every site in an explanation round.

    Attributes
    ----------
    epsilon, delta
        Privacy of this release at each site (local noise: each site's noised
        contribution is (epsilon, delta)-DP on its own).
    clip_bound
        Per-record L2 bound of the explanation term.
    bits, scale
        Fixed-point encoding chosen by the coordinator for the whole round.
    public
        Public arrays the kind reads besides the model (released second-order factors,
        TracIn checkpoints, a validation-loss gradient); never site data.
    """

    round_id: str
    kind: str
    site_ids: tuple[str, ...]
    aggregator: str
    epsilon: float
    delta: float
    clip_bound: float
    bits: int
    scale: float
    timeout_s: float
    params: Mapping[str, str] = field(default_factory=dict)
    threshold: int = 0
    degree: int = 0
    noise: str = "local"
    colluding: int = 0
    public: Mapping[str, np.ndarray] = field(default_factory=dict)

    def protocol_params(self, length: int) -> SecAggParams:
        """The secure-aggregation parameters of this round, as the aggregator derives them."""
        return SecAggParams(
            round_id=self.round_id,
            site_ids=tuple(self.site_ids),
            threshold=self.effective_threshold,
            length=length,
            bits=self.bits,
            degree=self.degree,
        )

    def __post_init__(self) -> None:
        for name in ("epsilon", "clip_bound", "scale", "timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigurationError(f"{name} must be finite and > 0, got {value}")
        if not 0 < self.delta < 1:
            raise ConfigurationError(f"delta must be in (0, 1), got {self.delta}")
        if self.noise not in ("local", "distributed"):
            raise ConfigurationError(f"noise must be local or distributed, got {self.noise!r}")

    @property
    def effective_threshold(self) -> int:
        return self.threshold or default_threshold(len(self.site_ids))


@dataclass(frozen=True)
class ExplainOutcome:
    site_id: str
    records: int
    noise_std: float
    cost: PrivacyCost
    status: RoundStatus


def contribute_explanation(
    request: ExplainRequest,
    *,
    site_id: str,
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    ledger: PrivacyLedger,
    store: LedgerStore,
    rng: NoiseSource,
    now: datetime,
    connect: Callable[[str], AggregationClient] = AggregationClient,
    sensitive: Mapping[str, np.ndarray] | None = None,
    identity: Ed25519PrivateKey | None = None,
    site_breakdown: bool = False,
) -> ExplainOutcome:
    """Compute, clip, noise, account, encode, mask and submit this site's contribution.

    ``sensitive`` (attribute -> ``(n,)`` raw values of the site's records) is handed to
    the kind's ``contribute`` for kinds that break results down by sensitive group; like
    the features, it reaches the aggregator only inside the clipped, noised, masked sum.
    ``site_breakdown`` is the site's policy on releases broken down by site.

    The spend is recorded only once every site of the round has advertised its key, so
    a round that never gathers its sites costs nobody anything; it is recorded before
    any noised value leaves the site.

    Raises
    ------
    BudgetExceededError
        The release does not fit the site's remaining budget; nothing was computed.
    ProtocolError
        The round failed (a site missing, the round aborted, keys that do not match the
        round); nothing was submitted.
    ExplanationError
        The kind refused this site's data (for instance a cohort smaller than the
        round's ``min_cohort_size``); no key was advertised and nothing was spent.

    Any other refusal (budget, explanation) is also sent to the aggregator as a decline,
    so the round aborts at once instead of keeping the other sites waiting.
    """
    if site_id not in request.site_ids:
        raise ConfigurationError(f"site {site_id!r} is not among the round's sites")
    kind = get_kind(request.kind)
    distributed = request.noise == "distributed"
    if distributed:
        # The target of the noise in the sum; the site's ledger records the slightly
        # smaller effective multiplier of the sum of shares once the length is known.
        z = discrete_gaussian_noise_multiplier(request.epsilon, request.delta)
    else:
        z = gaussian_noise_multiplier(request.epsilon, request.delta)
    event = LedgerEvent(
        kind="discrete_gaussian" if distributed else "gaussian",
        noise_multiplier=z,
        label=f"{request.kind} {request.round_id}",
        created_at=now,
    )
    with connect(request.aggregator) as client:
        try:
            ledger.check(event)  # refuse before doing any work
            contribution, cost, std, status = _contribute(
                request,
                site_id,
                kind,
                z,
                event,
                model,
                features,
                labels,
                sensitive,
                ledger,
                store,
                rng,
                client,
                identity or Ed25519PrivateKey.generate(),
                SiteContext(
                    site_id=site_id,
                    site_ids=tuple(request.site_ids),
                    site_breakdown=site_breakdown,
                    arrays=request.public,
                ),
            )
        except FedlensError as exc:
            if not isinstance(exc, ProtocolError):
                # Tell the aggregator, so the other sites stop waiting for this one.
                with contextlib.suppress(FedlensError):
                    client.decline(request.round_id, site_id, f"{type(exc).__name__}: {exc}")
            raise
    logger.info(
        "site %s contributed to round %s (noise std %.3g, ε total %.3f)",
        site_id,
        request.round_id,
        std,
        cost.epsilon_total,
    )
    return ExplainOutcome(
        site_id=site_id, records=contribution.count, noise_std=std, cost=cost, status=status
    )


def _contribute(
    request: ExplainRequest,
    site_id: str,
    kind: ExplanationKind,
    z: float,
    event: LedgerEvent,
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    sensitive: Mapping[str, np.ndarray] | None,
    ledger: PrivacyLedger,
    store: LedgerStore,
    rng: NoiseSource,
    client: AggregationClient,
    identity: Ed25519PrivateKey,
    context: SiteContext,
) -> tuple[Contribution, PrivacyCost, float, RoundStatus]:
    # Computed before the keys are advertised: a site that cannot contribute (a cohort
    # below its minimum size, parameters its data do not fit) declines without ever
    # joining the key exchange, and the computation reveals nothing by itself.
    contribution = kind.contribute(
        model, features, labels, request.params, request.clip_bound, sensitive, context
    )
    session = SiteSession(request.protocol_params(contribution.vector.size), site_id, identity)
    spent: list[tuple[PrivacyCost, float]] = []

    def make_input() -> SiteInput:
        # Called once the neighbours have shared keys: a round that never gathers its
        # sites costs nobody anything. The spend is recorded before anything noised
        # leaves the site.
        codec = FixedPointCodec(bits=request.bits, scale=request.scale)
        limit = codec.site_limit(len(request.site_ids))
        if request.noise == "distributed":
            encoded, std, cost = _distributed_input(
                request, site_id, contribution.vector, event, ledger, store, rng, codec, limit
            )
        else:
            epsilon_total = store.spend(event, ledger.budget_epsilon, ledger.delta)
            std = z * l2_sensitivity(request.clip_bound)
            noised = contribution.vector + rng.normal(contribution.vector.size, std)
            # Clamping to the range the round's encoding reserves for one site is
            # post-processing of a DP value; it rules out wrap-around in the sum.
            encoded = codec.encode(np.clip(noised, -limit, limit), rng)
            cost = PrivacyCost(
                site_id=site_id,
                epsilon=request.epsilon,
                delta=request.delta,
                epsilon_total=epsilon_total,
            )
        spent.append((cost, std))
        return SiteInput(encoded, cost, std)

    status = run_secure_round(client, session, make_input, timeout_s=request.timeout_s)
    if not spent:  # pragma: no cover - run_secure_round returns only after submitting
        raise ProtocolError(f"round {request.round_id} ended before this site submitted")
    cost, std = spent[0]
    return contribution, cost, std, status


def _distributed_input(
    request: ExplainRequest,
    site_id: str,
    vector: np.ndarray,
    target: LedgerEvent,
    ledger: PrivacyLedger,
    store: LedgerStore,
    rng: NoiseSource,
    codec: FixedPointCodec,
    limit: float,
) -> tuple[np.ndarray, float, PrivacyCost]:
    """Encode the clipped sum and add this site's discrete Gaussian share of the noise.

    The share is sized (:func:`privacy.calibrate_shares`) so that the at least
    ``threshold - colluding`` honest sites in any released sum carry the target noise;
    the ledger records the sum's effective noise multiplier (Kairouz, Liu, Steinke 2021).
    Clamping the raw sum to the site's range is 1-Lipschitz per coordinate, so it does
    not raise the sensitivity.
    """
    dimension = vector.size
    calibration = calibrate_shares(
        noise_multiplier=target.noise_multiplier,
        sensitivity=encoded_sensitivity(
            l2_sensitivity(request.clip_bound), request.scale, dimension
        ),
        dimension=dimension,
        threshold=request.effective_threshold,
        colluding=request.colluding,
    )
    event = replace(target, noise_multiplier=calibration.effective_noise_multiplier)
    epsilon_total = store.spend(event, ledger.budget_epsilon, ledger.delta)
    encoded = codec.encode(np.clip(vector, -limit, limit), rng)
    share = sample_discrete_gaussian(dimension, calibration.share_sigma, rng)
    encoded = (encoded + share.view(np.uint64)) & np.uint64(codec.modulus - 1)
    cost = PrivacyCost(
        site_id=site_id,
        epsilon=epsilon_of_discrete_gaussian(calibration.effective_noise_multiplier, request.delta),
        delta=request.delta,
        epsilon_total=epsilon_total,
    )
    return encoded, calibration.share_sigma / request.scale, cost
