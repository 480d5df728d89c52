"""The one conversion boundary between protobuf messages and domain types.

Every ``x_to_proto`` has an ``x_from_proto`` and each pair is round-tripped in
``tests/fedlens/test_wire.py``. Decoding validates shape-independent facts only (types,
enum values); range checks belong to the handlers that know the round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedlens.errors import ConfigurationError, IntegrityError
from fedlens.jobs import Job, JobRequest, JobState
from fedlens.secagg_types import EncryptedShare, RevealedShare, ShareKind, SignedKeys
from fedlens.types import (
    FeatureAttribution,
    FeatureChange,
    InputExplanation,
    MaskedSubmission,
    PrivacyCost,
    Release,
    ReleasedValue,
    ReleaseSummary,
    RoundPhase,
    RoundSpec,
    RoundStatus,
    SiteLedger,
)
from fedlens.v1 import aggregation_pb2, common_pb2, query_pb2

if TYPE_CHECKING:
    from privacy.ledger import LedgerEvent

__all__ = [
    "explain_input_request_from_proto",
    "explain_input_request_to_proto",
    "input_explanation_from_proto",
    "input_explanation_to_proto",
    "job_from_proto",
    "job_request_from_proto",
    "job_request_to_proto",
    "job_to_proto",
    "ledger_event_from_proto",
    "ledger_event_to_proto",
    "masked_submission_from_proto",
    "masked_submission_to_proto",
    "privacy_cost_from_proto",
    "privacy_cost_to_proto",
    "release_from_proto",
    "release_summary_from_proto",
    "release_summary_to_proto",
    "release_to_proto",
    "revealed_shares_from_proto",
    "revealed_shares_to_proto",
    "round_spec_from_proto",
    "round_spec_to_proto",
    "round_status_from_proto",
    "round_status_to_proto",
    "sealed_shares_from_proto",
    "sealed_shares_to_proto",
    "signed_keys_from_proto",
    "signed_keys_to_proto",
    "site_ledger_from_proto",
    "site_ledger_to_proto",
]

_PHASE_TO_PROTO = {
    RoundPhase.ADVERTISING: aggregation_pb2.ROUND_PHASE_ADVERTISING,
    RoundPhase.SHARING: aggregation_pb2.ROUND_PHASE_SHARING,
    RoundPhase.COLLECTING: aggregation_pb2.ROUND_PHASE_COLLECTING,
    RoundPhase.UNMASKING: aggregation_pb2.ROUND_PHASE_UNMASKING,
    RoundPhase.COMPLETE: aggregation_pb2.ROUND_PHASE_COMPLETE,
    RoundPhase.ABORTED: aggregation_pb2.ROUND_PHASE_ABORTED,
}
_PHASE_FROM_PROTO = {v: k for k, v in _PHASE_TO_PROTO.items()}


def privacy_cost_to_proto(cost: PrivacyCost) -> common_pb2.PrivacyCost:
    return common_pb2.PrivacyCost(
        site_id=cost.site_id,
        epsilon=cost.epsilon,
        delta=cost.delta,
        epsilon_total=cost.epsilon_total,
    )


def privacy_cost_from_proto(msg: common_pb2.PrivacyCost) -> PrivacyCost:
    return PrivacyCost(
        site_id=msg.site_id,
        epsilon=msg.epsilon,
        delta=msg.delta,
        epsilon_total=msg.epsilon_total,
    )


def round_spec_to_proto(spec: RoundSpec) -> aggregation_pb2.RoundSpec:
    return aggregation_pb2.RoundSpec(
        round_id=spec.round_id,
        kind=spec.kind,
        site_ids=list(spec.site_ids),
        length=spec.length,
        bits=spec.bits,
        scale=spec.scale,
        clip_bound=spec.clip_bound,
        labels=list(spec.labels),
        phase_timeout_s=spec.phase_timeout_s,
        params=dict(spec.params),
        threshold=spec.threshold,
        degree=spec.degree,
        noise=spec.noise,
        colluding=spec.colluding,
    )


def round_spec_from_proto(msg: aggregation_pb2.RoundSpec) -> RoundSpec:
    return RoundSpec(
        round_id=msg.round_id,
        kind=msg.kind,
        site_ids=tuple(msg.site_ids),
        length=msg.length,
        bits=msg.bits,
        scale=msg.scale,
        clip_bound=msg.clip_bound,
        labels=tuple(msg.labels),
        phase_timeout_s=msg.phase_timeout_s,
        params=dict(msg.params),
        threshold=msg.threshold,
        degree=msg.degree,
        noise=msg.noise or "local",
        colluding=msg.colluding,
    )


def round_status_to_proto(status: RoundStatus) -> aggregation_pb2.RoundStatus:
    return aggregation_pb2.RoundStatus(
        round_id=status.round_id,
        phase=_PHASE_TO_PROTO[status.phase],
        advertised=list(status.advertised),
        submitted=list(status.submitted),
        release_id=status.release_id,
        reason=status.reason,
        shared=list(status.shared),
        unmasked=list(status.unmasked),
        seconds_left=status.seconds_left,
    )


def round_status_from_proto(msg: aggregation_pb2.RoundStatus) -> RoundStatus:
    try:
        phase = _PHASE_FROM_PROTO[msg.phase]
    except KeyError:
        raise IntegrityError(f"round status has an unknown phase {msg.phase}") from None
    return RoundStatus(
        round_id=msg.round_id,
        phase=phase,
        advertised=tuple(msg.advertised),
        submitted=tuple(msg.submitted),
        release_id=msg.release_id,
        reason=msg.reason,
        shared=tuple(msg.shared),
        unmasked=tuple(msg.unmasked),
        seconds_left=msg.seconds_left,
    )


def masked_submission_to_proto(sub: MaskedSubmission) -> aggregation_pb2.SubmitMaskedRequest:
    return aggregation_pb2.SubmitMaskedRequest(
        round_id=sub.round_id,
        site_id=sub.site_id,
        values=np.ascontiguousarray(sub.values, dtype="<u8").tobytes(),
        cost=privacy_cost_to_proto(sub.cost),
        noise_std=sub.noise_std,
    )


def masked_submission_from_proto(msg: aggregation_pb2.SubmitMaskedRequest) -> MaskedSubmission:
    """Raises :class:`IntegrityError` if the values are not whole uint64 words."""
    if len(msg.values) % 8:
        raise IntegrityError(
            f"masked values from {msg.site_id!r} are {len(msg.values)} bytes, not whole "
            f"uint64 words"
        )
    return MaskedSubmission(
        round_id=msg.round_id,
        site_id=msg.site_id,
        # A read-only view of the message's bytes, not a copy.
        values=np.frombuffer(msg.values, dtype="<u8").view(np.uint64),
        cost=privacy_cost_from_proto(msg.cost),
        noise_std=msg.noise_std,
    )


def signed_keys_to_proto(keys: SignedKeys, identity_public: bytes) -> aggregation_pb2.SignedKeys:
    return aggregation_pb2.SignedKeys(
        site_id=keys.site_id,
        cipher_public=keys.cipher_public,
        mask_public=keys.mask_public,
        signature=keys.signature,
        identity_public=identity_public,
    )


def signed_keys_from_proto(round_id: str, msg: aggregation_pb2.SignedKeys) -> SignedKeys:
    return SignedKeys(
        round_id=round_id,
        site_id=msg.site_id,
        cipher_public=bytes(msg.cipher_public),
        mask_public=bytes(msg.mask_public),
        signature=bytes(msg.signature),
    )


def sealed_shares_to_proto(shares: Sequence[EncryptedShare]) -> list[aggregation_pb2.SealedShare]:
    return [
        aggregation_pb2.SealedShare(
            sender=item.sender, receiver=item.receiver, ciphertext=item.ciphertext
        )
        for item in shares
    ]


def sealed_shares_from_proto(
    round_id: str, shares: Sequence[aggregation_pb2.SealedShare]
) -> tuple[EncryptedShare, ...]:
    return tuple(
        EncryptedShare(round_id, item.sender, item.receiver, bytes(item.ciphertext))
        for item in shares
    )


_KIND_TO_PROTO = {
    ShareKind.SELF_MASK: aggregation_pb2.SHARE_KIND_SELF_MASK,
    ShareKind.PAIR_KEY: aggregation_pb2.SHARE_KIND_PAIR_KEY,
}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}


def revealed_shares_to_proto(
    shares: Sequence[RevealedShare],
) -> list[aggregation_pb2.RevealedShare]:
    return [
        aggregation_pb2.RevealedShare(
            owner=item.owner, kind=_KIND_TO_PROTO[item.kind], share=item.share
        )
        for item in shares
    ]


def revealed_shares_from_proto(
    round_id: str, site_id: str, shares: Sequence[aggregation_pb2.RevealedShare]
) -> tuple[RevealedShare, ...]:
    """Raises :class:`IntegrityError` for a share of unknown kind."""
    revealed = []
    for item in shares:
        kind = _KIND_FROM_PROTO.get(item.kind)
        if kind is None:
            raise IntegrityError(f"revealed share of {item.owner!r} has an unknown kind")
        revealed.append(RevealedShare(round_id, site_id, item.owner, kind, bytes(item.share)))
    return tuple(revealed)


def _value_to_proto(value: ReleasedValue) -> query_pb2.ReleasedValue:
    return query_pb2.ReleasedValue(name=value.name, value=value.value, noise_std=value.noise_std)


def _value_from_proto(msg: query_pb2.ReleasedValue) -> ReleasedValue:
    return ReleasedValue(name=msg.name, value=msg.value, noise_std=msg.noise_std)


def release_to_proto(release: Release) -> query_pb2.Release:
    return query_pb2.Release(
        release_id=release.release_id,
        round_id=release.round_id,
        kind=release.kind,
        created_at=release.created_at,
        noised_count=release.noised_count,
        values=[_value_to_proto(v) for v in release.values],
        grouped=[_value_to_proto(v) for v in release.grouped],
        costs=[privacy_cost_to_proto(c) for c in release.costs],
        params=dict(release.params),
    )


def release_from_proto(msg: query_pb2.Release) -> Release:
    return Release(
        release_id=msg.release_id,
        round_id=msg.round_id,
        kind=msg.kind,
        created_at=msg.created_at,
        noised_count=msg.noised_count,
        values=tuple(_value_from_proto(v) for v in msg.values),
        grouped=tuple(_value_from_proto(v) for v in msg.grouped),
        costs=tuple(privacy_cost_from_proto(c) for c in msg.costs),
        params=dict(msg.params),
    )


def release_summary_to_proto(summary: ReleaseSummary) -> query_pb2.ReleaseSummary:
    return query_pb2.ReleaseSummary(
        release_id=summary.release_id,
        round_id=summary.round_id,
        kind=summary.kind,
        created_at=summary.created_at,
        num_sites=summary.num_sites,
    )


def release_summary_from_proto(msg: query_pb2.ReleaseSummary) -> ReleaseSummary:
    return ReleaseSummary(
        release_id=msg.release_id,
        round_id=msg.round_id,
        kind=msg.kind,
        created_at=msg.created_at,
        num_sites=msg.num_sites,
    )


def ledger_event_to_proto(event: LedgerEvent) -> common_pb2.LedgerEvent:
    return common_pb2.LedgerEvent(
        kind=event.kind,
        noise_multiplier=event.noise_multiplier,
        sampling_rate=event.sampling_rate,
        steps=event.steps,
        label=event.label,
        created_at=event.created_at.isoformat(),
    )


def ledger_event_from_proto(msg: common_pb2.LedgerEvent) -> LedgerEvent:
    """Raises :class:`IntegrityError` naming the field if the event is invalid."""
    from privacy.ledger import LedgerEvent  # here, so that importing the kernel stays light

    try:
        return LedgerEvent.from_dict(
            {
                "kind": msg.kind,
                "noise_multiplier": msg.noise_multiplier,
                "sampling_rate": msg.sampling_rate,
                "steps": msg.steps,
                "label": msg.label,
                "created_at": msg.created_at,
            }
        )
    except ConfigurationError as exc:
        raise IntegrityError(f"malformed ledger event: {exc}") from None


def site_ledger_to_proto(ledger: SiteLedger) -> common_pb2.SiteLedger:
    return common_pb2.SiteLedger(
        site_id=ledger.site_id,
        budget_epsilon=ledger.budget_epsilon,
        delta=ledger.delta,
        events=[ledger_event_to_proto(event) for event in ledger.events],
        epsilon_spent=ledger.epsilon_spent,
        accountant=ledger.accountant,
        reserved_epsilon=ledger.reserved_epsilon,
    )


def site_ledger_from_proto(msg: common_pb2.SiteLedger) -> SiteLedger:
    return SiteLedger(
        site_id=msg.site_id,
        budget_epsilon=msg.budget_epsilon,
        delta=msg.delta,
        events=tuple(ledger_event_from_proto(event) for event in msg.events),
        epsilon_spent=msg.epsilon_spent,
        accountant=msg.accountant,
        reserved_epsilon=msg.reserved_epsilon,
    )


def explain_input_request_to_proto(
    record: Mapping[str, str], *, model_id: str = "", top: int = 0
) -> query_pb2.ExplainInputRequest:
    return query_pb2.ExplainInputRequest(record=dict(record), model_id=model_id, top=top)


def explain_input_request_from_proto(
    msg: query_pb2.ExplainInputRequest,
) -> tuple[dict[str, str], str, int]:
    """``(record, model_id, top)`` of a request."""
    return dict(msg.record), msg.model_id, msg.top


def input_explanation_to_proto(explanation: InputExplanation) -> query_pb2.ExplainInputResponse:
    return query_pb2.ExplainInputResponse(
        model_id=explanation.model_id,
        predicted_label=explanation.predicted_label,
        probability=explanation.probability,
        attributions=[
            query_pb2.FeatureAttribution(
                feature=a.feature, value=a.value, attribution=a.attribution
            )
            for a in explanation.attributions
        ],
        changes=[
            query_pb2.FeatureChange(feature=c.feature, original=c.original, proposed=c.proposed)
            for c in explanation.changes
        ],
        counterfactual_label=explanation.counterfactual_label,
        counterfactual_probability=explanation.counterfactual_probability,
        counterfactual_note=explanation.counterfactual_note,
        card=explanation.card,
        baseline=explanation.baseline,
        method=explanation.method,
    )


def input_explanation_from_proto(msg: query_pb2.ExplainInputResponse) -> InputExplanation:
    return InputExplanation(
        model_id=msg.model_id,
        predicted_label=msg.predicted_label,
        probability=msg.probability,
        attributions=tuple(
            FeatureAttribution(feature=a.feature, value=a.value, attribution=a.attribution)
            for a in msg.attributions
        ),
        changes=tuple(
            FeatureChange(feature=c.feature, original=c.original, proposed=c.proposed)
            for c in msg.changes
        ),
        counterfactual_label=msg.counterfactual_label,
        counterfactual_probability=msg.counterfactual_probability,
        counterfactual_note=msg.counterfactual_note,
        card=msg.card,
        baseline=msg.baseline,
        method=msg.method,
    )


def job_request_to_proto(request: JobRequest) -> query_pb2.SubmitJobRequest:
    return query_pb2.SubmitJobRequest(
        kind=request.kind,
        params=dict(request.params),
        cohort=request.cohort,
        query_input=request.query_input,
    )


def job_request_from_proto(msg: query_pb2.SubmitJobRequest) -> JobRequest:
    return JobRequest(
        kind=msg.kind,
        params=dict(msg.params),
        cohort=msg.cohort,
        query_input=msg.query_input,
    )


def job_to_proto(job: Job) -> query_pb2.Job:
    return query_pb2.Job(
        job_id=job.job_id,
        kind=job.kind,
        state=job.state.value,
        reason=job.reason,
        release_id=job.release_id,
        submitted_by=job.submitted_by,
        created_at=job.created_at,
        updated_at=job.updated_at,
        from_cache=job.from_cache,
    )


def job_from_proto(msg: query_pb2.Job) -> Job:
    """Raises IntegrityError for an unknown state."""
    try:
        state = JobState.parse(msg.state)
    except ConfigurationError as exc:
        raise IntegrityError(str(exc)) from None
    return Job(
        job_id=msg.job_id,
        kind=msg.kind,
        state=state,
        reason=msg.reason,
        release_id=msg.release_id,
        submitted_by=msg.submitted_by,
        created_at=msg.created_at,
        updated_at=msg.updated_at,
        from_cache=msg.from_cache,
    )
