"""The coordinator's side of influence explanations: what each round is sent.

An influence kind (``group_influence``, ``influence_prototypes``, ``self_influence``,
``site_contribution``, ``loo_unfairness``) scores training records with second-order
factors that the federation released first — a ``hessian`` round for logistic models,
a ``kfac`` round for MLPs — or, with ``influence-method = "tracin"``, with the global
models of the training rounds. :func:`run_influence` runs the second-order round, reads
its release, checks that it belongs to the model being explained (refusing stale
factors), and runs the requested round with the factors as public arrays.

Everything sent here is public: released DP factors, global models, the coordinator's
own held-out data's loss gradient, and the analyst's query encoded with the public schema.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from explain import get_kind
from explain.local import RawValue, encode_record, validate_record
from explain.per_record import per_record_gradients
from explain.second_order import ekfac_labels, hessian_labels, kfac_labels, model_fingerprint
from explain.second_order_kinds import released_factors
from fedlens.datasets import Dataset
from fedlens.errors import ConfigurationError, ExplanationError
from fedlens.query_client import QueryClient
from fedlens.runconfig import RunConfig
from fedlens.settings import Settings
from fedlens.types import Release, RoundPhase, RoundStatus

__all__ = [
    "InfluenceInputs",
    "correction_inputs",
    "influence_params",
    "run_influence",
    "second_order_inputs",
    "tracin_inputs",
    "validation_inputs",
]

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
# run_explanation_round with the run, extra params and public arrays bound by the caller.
ExplainRound = Callable[[RunConfig, Mapping[str, str], Mapping[str, np.ndarray]], RoundStatus]


def _jsonable(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def influence_params(run: RunConfig, dataset: Dataset, site_names: Sequence[str]) -> dict[str, str]:
    """Parameters every influence round shares, the query validated and encoded.

    Raises
    ------
    ConfigurationError
        The query is not a JSON object, names unknown features, lacks some, or holds a
        value outside the schema.
    """
    if run.influence_query:
        try:
            raw = json.loads(run.influence_query)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"influence-query is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigurationError(f"influence-query must be a JSON object, got {raw!r}")
        record = validate_record(dataset.schema, raw)
    else:
        record = _default_query(dataset)
    pre = dataset.preprocessor
    encoded = encode_record(pre, record)
    params = {
        "query": json.dumps(encoded.tolist()),
        "query_record": json.dumps(record),
        "group_by": run.influence_group_by,
        "k": str(run.influence_k),
        "influence_clip": repr(run.influence_clip),
        "damping": repr(run.influence_damping),
        "sites": json.dumps(list(site_names)),
        "method": run.second_order_method or "tracin",
    }
    # The kind checks its own parameters (grouping, k, bins) now, before a second-order
    # round spends anything on factors a refused request would never use.
    check = params | {"noise": run.secagg_noise, "model": run.model}
    get_kind(run.explain_kind).coordinate_labels(pre.encoded_names, pre.groups, check)
    return params


def _default_query(dataset: Dataset) -> dict[str, RawValue]:
    """The first record of the coordinator's held-out split that lies in the schema's range."""
    for _, row in dataset.test.loc[:, list(dataset.schema.names)].head(1000).iterrows():
        try:
            return validate_record(dataset.schema, {k: _jsonable(v) for k, v in row.items()})
        except ConfigurationError:
            continue
    raise ConfigurationError("no held-out record fits the schema: set influence-query")


@dataclass(frozen=True)
class InfluenceInputs:
    params: dict[str, str]
    arrays: Arrays


def second_order_inputs(release: Release, model: nn.Module, damping: float) -> InfluenceInputs:
    """The released factors as a site needs them, refused if they belong to another model.

    Raises
    ------
    ExplanationError
        The release is not a second-order kind, was computed for another model (stale),
        or lacks coordinates.
    """
    if release.kind not in ("hessian", "kfac"):
        raise ExplanationError(f"release {release.release_id} is {release.kind}, not second order")
    current = model_fingerprint(model)
    computed_for = release.params.get("model_fingerprint", "")
    if computed_for != current:
        raise ExplanationError(
            f"release {release.release_id} holds factors of model {computed_for or '(unknown)'}, "
            f"not of the current model {current}: stale, release new factors first"
        )
    labels = hessian_labels(model) if release.kind == "hessian" else kfac_labels(model)
    params = {
        "method": release.kind,
        "second_order_release": release.release_id,
        "second_order_fingerprint": current,
        "second_order_count": repr(max(release.noised_count, 1.0)),
        "damping": repr(damping),
    }
    return InfluenceInputs(params, {"second_order": released_factors(release.values, labels)})


def correction_inputs(kfac: InfluenceInputs, release: Release, model: nn.Module) -> InfluenceInputs:
    """K-FAC inputs with the released EK-FAC eigenvalue corrections added.

    Raises
    ------
    ExplanationError
        The release is not an ``ekfac`` one, is stale, or lacks coordinates.
    """
    if release.kind != "ekfac":
        raise ExplanationError(f"release {release.release_id} is {release.kind}, not ekfac")
    current = model_fingerprint(model)
    if release.params.get("model_fingerprint", "") != current:
        raise ExplanationError(
            f"release {release.release_id} holds corrections for another model than {current}: "
            "stale, release new factors first"
        )
    params = kfac.params | {"method": "ekfac", "ekfac_release": release.release_id}
    arrays = kfac.arrays | {"ekfac": released_factors(release.values, ekfac_labels(model))}
    return InfluenceInputs(params, arrays)


def tracin_inputs(
    checkpoints: Sequence[Mapping[str, torch.Tensor]], rate: float
) -> InfluenceInputs:
    """Global models of the training rounds as TracIn checkpoints, each at ``rate``."""
    if not checkpoints:
        raise ExplanationError("TracIn needs the global models of training rounds; there are none")
    arrays = {
        f"checkpoint/{t}/{name}": tensor.detach().cpu().numpy()
        for t, state in enumerate(checkpoints)
        for name, tensor in state.items()
    }
    params = {"method": "tracin", "checkpoint_rates": json.dumps([rate] * len(checkpoints))}
    return InfluenceInputs(params, arrays)


def validation_inputs(model: nn.Module, dataset: Dataset) -> Arrays:
    """The mean loss gradient on the coordinator's held-out split (site valuation's target)."""
    test = dataset.test_data()
    gradient = per_record_gradients(model, test.features.astype(np.float64), test.labels).mean(
        axis=0
    )
    return {"validation_gradient": gradient}


def _failed(status: RoundStatus, what: str) -> RoundStatus:
    return RoundStatus(
        round_id=status.round_id,
        phase=RoundPhase.ABORTED,
        advertised=status.advertised,
        submitted=status.submitted,
        release_id="",
        reason=f"{what}: {status.reason}",
    )


def run_influence(
    run: RunConfig,
    dataset: Dataset,
    model: nn.Module,
    site_names: Sequence[str],
    checkpoints: Sequence[Mapping[str, torch.Tensor]],
    explain_round: ExplainRound,
) -> list[RoundStatus]:
    """The second-order round (unless TracIn), then the influence round; their statuses.

    A refusal (bad query, stale factors) or a failed second-order round ends the
    sequence with an aborted status naming why; nothing further is asked of the sites.
    """
    try:
        params = influence_params(run, dataset, site_names)
    except ConfigurationError as exc:
        return [_refused(f"refused before any site was asked: {exc}")]
    statuses: list[RoundStatus] = []
    method = run.second_order_method
    inputs = tracin_inputs(checkpoints, run.learning_rate) if not method else None
    # EK-FAC: the K-FAC factors first, then their eigenvalue corrections.
    for kind in {"hessian": ["hessian"], "kfac": ["kfac"], "ekfac": ["kfac", "ekfac"]}.get(
        method, []
    ):
        second_run = run.model_copy(
            update={"explain_kind": kind, "attribution_clip": run.second_order_clip}
        )
        extra = {"model_fingerprint": model_fingerprint(model)}
        status = explain_round(
            second_run,
            extra | (inputs.params if inputs else {}),
            inputs.arrays if inputs else {},
        )
        statuses.append(status)
        if status.phase is not RoundPhase.COMPLETE:
            return [*statuses, _failed(status, f"the {kind} round did not complete")]
        with QueryClient(run.aggregator, timeout_s=60, token=Settings().token_value) as client:
            release = client.get_release(status.release_id)
        try:
            inputs = (
                second_order_inputs(release, model, run.influence_damping)
                if inputs is None
                else correction_inputs(inputs, release, model)
            )
        except ExplanationError as exc:
            return [*statuses, _refused(str(exc))]
        logger.info("%s factors released as %s", kind, release.release_id)
    assert inputs is not None
    arrays = dict(inputs.arrays)
    if run.explain_kind == "site_contribution":
        arrays |= validation_inputs(model, dataset)
    statuses.append(explain_round(run, params | inputs.params, arrays))
    return statuses


def _refused(reason: str) -> RoundStatus:
    return RoundStatus(
        round_id="",
        phase=RoundPhase.ABORTED,
        advertised=(),
        submitted=(),
        release_id="",
        reason=reason,
    )
