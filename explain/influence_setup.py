"""What every influence kind reads from a request: the scorer, the query, the groups.

Parameters the influence kinds share (all strings, as the wire carries them):

``method``
    ``hessian`` (the exact Gauss-Newton Hessian, logistic models), ``kfac`` (Kronecker
    factors, MLPs), ``ekfac`` (K-FAC with released eigenvalue corrections, the public
    array ``ekfac``) or ``tracin`` (first order, over training checkpoints).
``second_order_fingerprint``, ``second_order_count``, ``damping``
    The released second-order factors' model (:func:`explain.second_order.model_fingerprint`),
    their noised record count ``N`` and the damping ``lambda``. The factors themselves,
    the released means, arrive as the public array ``second_order``.
``checkpoint_rates``
    For ``tracin``: a JSON list of learning rates, one per checkpoint; checkpoint ``t``'s
    parameters arrive as public arrays ``checkpoint/<t>/<parameter name>``.
``query``
    A JSON list of encoded query inputs (the coordinator validates and encodes the raw
    record), or one input.
``group_by``
    ``label``, ``site``, or a feature name (categories for categorical features,
    quartiles of the encoded value for numeric ones).
``influence_clip``
    ``B``: each record's score, in units of ``1 / N`` (see :class:`InfluenceScorer`), is
    clipped to ``[-B, B]`` before it is summed.

Every refusal here raises before the site spends anything: the contribution is
computed before the site's ledger is charged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from explain.influence import influence_on_predictions, loss_influence, self_influence
from explain.per_record import model_dimension, per_record_gradients, tracin_scores
from explain.registry import SiteContext
from explain.second_order import SecondOrder, model_fingerprint
from fedlens.errors import ConfigurationError, ExplanationError

__all__ = [
    "DEFAULT_INFLUENCE_CLIP",
    "METHODS",
    "Grouping",
    "InfluenceScorer",
    "grouping_of",
    "parse_query",
    "positive_number",
]

METHODS = ("hessian", "kfac", "ekfac", "tracin")
DEFAULT_INFLUENCE_CLIP = 10.0
WITHHELD = "(withheld)"


def positive_number(params: Mapping[str, str], key: str, default: float) -> float:
    raw = params.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{key} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{key} must be finite and > 0, got {raw!r}")
    return value


def parse_query(params: Mapping[str, str], dimension: int) -> np.ndarray:
    """The encoded query inputs, ``(k, dimension)`` float64.

    Raises
    ------
    ConfigurationError
        No query, malformed JSON, a shape other than ``(dimension,)`` or
        ``(k, dimension)``, or values that are not finite numbers.
    """
    raw = params.get("query")
    if raw is None:
        raise ConfigurationError("this kind explains a query input; the request has none")
    try:
        query = np.asarray(json.loads(raw), dtype=np.float64)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"query must be a JSON list of numbers: {exc}") from None
    if query.ndim == 1:
        query = query[None, :]
    if query.ndim != 2 or query.shape[1] != dimension or query.shape[0] == 0:
        raise ConfigurationError(
            f"query must hold {dimension} encoded values per input, got shape {query.shape}"
        )
    if not np.all(np.isfinite(query)):
        raise ConfigurationError("query holds NaN or infinite values")
    return query


@dataclass
class InfluenceScorer:
    """Scores records with the released second order, or with TracIn checkpoints.

    Scores are in units of ``1 / N``: a prediction score ``u`` means the record pushed
    the query's logit up by ``u / N``; a self score ``v`` means leaving the record out
    would raise its own loss by ``v / N``. ``N`` is the second order's noised record
    count; TracIn scores are its own (already absolute) values.
    """

    model: nn.Module
    method: str
    second: SecondOrder | None = None
    checkpoints: list[tuple[dict[str, torch.Tensor], float]] = field(default_factory=list)

    @property
    def count(self) -> float:
        return self.second.count if self.second is not None else 1.0

    @classmethod
    def from_request(
        cls, model: nn.Module, params: Mapping[str, str], context: SiteContext | None
    ) -> InfluenceScorer:
        """Build the scorer a request names; refuses stale or malformed factors.

        Raises
        ------
        ConfigurationError
            An unknown method, or checkpoint rates that are not a JSON list of numbers.
        ExplanationError
            The second-order factors were computed for another model than this one
            (stale), or are missing or do not fit the model.
        """
        method = params.get("method", "hessian")
        if method not in METHODS:
            raise ConfigurationError(f"unknown method {method!r}; expected one of {METHODS}")
        arrays = context.arrays if context is not None else {}
        if method == "tracin":
            return cls(model, method, checkpoints=_checkpoints(model, params, arrays))
        current = model_fingerprint(model)
        expected = params.get("second_order_fingerprint")
        if expected is None or "second_order" not in arrays:
            raise ExplanationError(
                f"the {method} method needs released {method} factors; the request has none"
            )
        if expected != current:
            raise ExplanationError(
                f"the second-order factors are stale: they were computed for model {expected}, "
                f"the current model is {current}; release new factors first"
            )
        count = positive_number(params, "second_order_count", 1.0)
        damping = positive_number(params, "damping", 1e-3)
        mean = np.asarray(arrays["second_order"], dtype=np.float64)
        form = "kfac" if method == "ekfac" else method
        second = SecondOrder.from_packed(model, form, mean * count, count, damping)
        if method == "ekfac":
            if "ekfac" not in arrays:
                raise ExplanationError("the ekfac method needs released eigenvalue corrections")
            second = second.corrected(np.asarray(arrays["ekfac"], dtype=np.float64))
        return cls(model, method, second=second)

    def prediction(
        self, features: np.ndarray, labels: np.ndarray, queries: np.ndarray
    ) -> np.ndarray:
        """``(n, k)``: how much each record pushed each query's logit up, times ``N``."""
        if self.second is None:
            return np.stack(
                [tracin_scores(self.model, self.checkpoints, features, labels, q) for q in queries],
                axis=1,
            )
        return (
            influence_on_predictions(self.model, self.second, features, labels, queries)
            * self.count
        )

    def self_scores(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``(n,)``: how much each record's own loss would rise without it, times ``N``."""
        if self.second is None:
            total = np.zeros(features.shape[0])
            twin = _twin(self.model)
            for state, eta in self.checkpoints:
                twin.load_state_dict(state)
                grads = per_record_gradients(twin, features, labels)
                total += eta * np.einsum("ij,ij->i", grads, grads)
            return total
        return self_influence(self.model, self.second, features, labels) * self.count

    def loss(
        self, features: np.ndarray, labels: np.ndarray, target_gradient: np.ndarray
    ) -> np.ndarray:
        """``(n,)``: how much the target loss would rise without each record, times ``N``."""
        if self.second is None:
            total = np.zeros(features.shape[0])
            twin = _twin(self.model)
            for state, eta in self.checkpoints:
                twin.load_state_dict(state)
                total += eta * (per_record_gradients(twin, features, labels) @ target_gradient)
            return total
        return (
            loss_influence(self.model, self.second, features, labels, target_gradient) * self.count
        )


def _twin(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _checkpoints(
    model: nn.Module, params: Mapping[str, str], arrays: Mapping[str, np.ndarray]
) -> list[tuple[dict[str, torch.Tensor], float]]:
    try:
        rates = [float(r) for r in json.loads(params.get("checkpoint_rates", "[]"))]
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"checkpoint_rates must be a JSON list of numbers: {exc}"
        ) from None
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ExplanationError("TracIn needs checkpoints with positive learning rates; none given")
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    out = []
    for t, rate in enumerate(rates):
        state: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            key = f"checkpoint/{t}/{name}"
            if key not in arrays:
                raise ExplanationError(f"TracIn checkpoint {t} lacks parameter {name!r}")
            value = np.asarray(arrays[key], dtype=np.float32)
            if value.shape != shape or not np.all(np.isfinite(value)):
                raise ExplanationError(
                    f"TracIn checkpoint {t}: {name!r} must be finite with shape {shape}, "
                    f"got {value.shape}"
                )
            state[name] = torch.as_tensor(value)
        out.append((state, rate))
    return out


@dataclass(frozen=True)
class Grouping:
    """How records fall into the groups a release breaks influence down by.

    ``names`` are public (from the encoding, the class labels or the round's sites);
    :meth:`assign` maps a site's records to indices into them.
    """

    key: str
    names: tuple[str, ...]
    columns: tuple[int, ...] = ()

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, str],
        encoded_names: Sequence[str],
        groups: Mapping[str, Sequence[int]],
    ) -> Grouping:
        """Raises ConfigurationError when ``group_by`` is neither label, site nor a feature."""
        key = params.get("group_by", "label")
        if key == "label":
            return cls(key, ("label=0", "label=1"))
        if key == "site":
            if params.get("noise", "local") != "local":
                raise ConfigurationError(
                    "a breakdown by site is released with local noise only; this round "
                    f"uses {params.get('noise')!r} noise"
                )
            try:
                sites = tuple(str(s) for s in json.loads(params.get("sites", "[]")))
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"sites must be a JSON list: {exc}") from None
            if not sites:
                raise ConfigurationError("grouping by site needs the round's sites")
            return cls(key, (*sites, WITHHELD))
        if key not in groups:
            raise ConfigurationError(
                f"group_by {key!r} is not a feature; choose label, site or one of: "
                f"{', '.join(groups)}"
            )
        columns = tuple(int(c) for c in groups[key])
        if len(columns) == 1 and encoded_names[columns[0]] == key:
            quartiles = ("[0, 0.25)", "[0.25, 0.5)", "[0.5, 0.75)", "[0.75, 1]")
            return cls(key, tuple(f"{key} in {q}" for q in quartiles), columns)
        return cls(key, (*(encoded_names[c] for c in columns), f"{key}=(other)"), columns)

    def assign(
        self, features: np.ndarray, labels: np.ndarray, context: SiteContext | None
    ) -> np.ndarray:
        """``(n,)`` int64 group index of each record."""
        n = features.shape[0]
        if self.key == "label":
            return np.asarray(labels, dtype=np.int64)
        if self.key == "site":
            if context is None or not context.site_id:
                raise ExplanationError("grouping by site needs to know which site computes")
            allowed = context.site_breakdown and context.site_id in self.names[:-1]
            index = self.names.index(context.site_id) if allowed else len(self.names) - 1
            return np.full(n, index, dtype=np.int64)
        block = features[:, list(self.columns)]
        if len(self.columns) == 1 and len(self.names) == 4:
            return np.asarray(np.clip(np.floor(block[:, 0] * 4), 0, 3), dtype=np.int64)
        hot = block.max(axis=1) > 0.5
        return np.where(hot, block.argmax(axis=1), len(self.columns)).astype(np.int64)


def grouping_of(
    params: Mapping[str, str],
    encoded_names: Sequence[str] = (),
    groups: Mapping[str, Sequence[int]] | None = None,
) -> Grouping:
    """The request's :class:`Grouping`, the layout read from params unless given."""
    try:
        names = list(encoded_names) or list(json.loads(params.get("feature_names", "[]")))
        layout = groups if groups is not None else json.loads(params.get("groups", "{}"))
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"malformed feature layout in params: {exc}") from None
    return Grouping.from_params(params, names, layout)


def check_dimension(model: nn.Module, features: np.ndarray) -> None:
    if features.ndim != 2 or features.shape[1] != model_dimension(model):
        raise ExplanationError(
            f"expected features of shape (n, {model_dimension(model)}), got {features.shape}"
        )
