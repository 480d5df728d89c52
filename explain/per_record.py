"""Per-record gradients of a binary model, flattened over its parameters.

Every model in :mod:`fedlens.models` maps ``(n, d)`` encoded features to one logit per
record. The influence kinds need, for each training record ``z = (x, y)``, the gradient
of its loss ``l(z; theta) = BCEWithLogits(f(x; theta), y)`` with respect to all
parameters, and for a query input the gradient of its logit ``f(x_q; theta)``. Both are
computed with :mod:`torch.func` (``vmap`` over ``grad``), in float64, in chunks so that
memory stays ``O(chunk * p)``.

Parameters are flattened in ``model.named_parameters()`` order, each tensor row-major:
:func:`parameter_layout` gives the slices, and every other influence module uses it.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from fedlens.errors import ExplanationError

__all__ = [
    "ParameterLayout",
    "gradient_dot",
    "parameter_layout",
    "per_record_gradients",
    "prediction_gradients",
    "tracin_scores",
]

_CHUNK = 2048
_FORWARD_AD = threading.Lock()


@dataclass(frozen=True)
class ParameterLayout:
    """Where each named parameter sits in the flat vector.

    Attributes
    ----------
    names, shapes
        ``model.named_parameters()`` order.
    offsets
        Start of each parameter in the flat vector; ``size`` is the total ``p``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    def slice(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + int(np.prod(self.shapes[i])))


def parameter_layout(model: nn.Module) -> ParameterLayout:
    names, shapes, offsets = [], [], []
    total = 0
    for name, param in model.named_parameters():
        names.append(name)
        shapes.append(tuple(param.shape))
        offsets.append(total)
        total += param.numel()
    return ParameterLayout(tuple(names), tuple(shapes), tuple(offsets), total)


def check_inputs(features: np.ndarray, labels: np.ndarray | None, dimension: int) -> None:
    """Refuse features of the wrong shape, non-finite values or labels outside {0, 1}."""
    if features.ndim != 2 or features.shape[1] != dimension:
        raise ExplanationError(
            f"expected features of shape (n, {dimension}), got {tuple(features.shape)}"
        )
    if not np.all(np.isfinite(features)):
        raise ExplanationError("features hold NaN or infinite values")
    if labels is not None:
        if labels.shape != (features.shape[0],):
            raise ExplanationError(
                f"expected {features.shape[0]} labels, got shape {tuple(labels.shape)}"
            )
        if labels.size and not np.all((labels == 0) | (labels == 1)):
            raise ExplanationError("labels must be 0 or 1")


def as_records(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A site's records as float64 ``(n, d)``, refused if malformed (see :func:`check_inputs`)."""
    x = np.asarray(features, dtype=np.float64)
    check_inputs(x, labels, x.shape[1] if x.ndim == 2 else -1)
    return x


def _double(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    twin = copy.deepcopy(model).double().eval()
    params = {k: v.detach() for k, v in twin.named_parameters()}
    return twin, params


def model_dimension(model: nn.Module) -> int:
    """Number of input features of a fedlens model (its first Linear layer's width)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return int(module.in_features)
    raise ExplanationError(f"{type(model).__name__} has no Linear layer to read its width from")


def per_record_gradients(
    model: nn.Module, features: np.ndarray, labels: np.ndarray, *, chunk: int = _CHUNK
) -> np.ndarray:
    """Gradient of each record's binary cross-entropy loss.

    Parameters
    ----------
    features
        ``(n, d)`` encoded records.
    labels
        ``(n,)`` in ``{0, 1}``.

    Returns
    -------
    numpy.ndarray
        ``(n, p)`` float64, row ``i`` the gradient of ``l(z_i)`` in the flat layout.
    """
    check_inputs(features, labels, model_dimension(model))
    twin, params = _double(model)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logit = functional_call(twin, p, (x.unsqueeze(0),)).reshape(())
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, y)

    per_record = vmap(grad(loss), in_dims=(None, 0, 0))
    return _chunked(per_record, params, features, labels.astype(np.float64), chunk)


def prediction_gradients(
    model: nn.Module, features: np.ndarray, *, chunk: int = _CHUNK
) -> np.ndarray:
    """Gradient of each input's logit: ``(n, d) -> (n, p)`` float64."""
    check_inputs(features, None, model_dimension(model))
    twin, params = _double(model)

    def logit(p: dict[str, torch.Tensor], x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(twin, p, (x.unsqueeze(0),))
        return out.reshape(())

    per_record = vmap(grad(logit), in_dims=(None, 0, 0))
    return _chunked(per_record, params, features, np.zeros(features.shape[0]), chunk)


def _chunked(
    fn: object,
    params: dict[str, torch.Tensor],
    features: np.ndarray,
    targets: np.ndarray,
    chunk: int,
) -> np.ndarray:
    n = features.shape[0]
    size = sum(p.numel() for p in params.values())
    out = np.empty((n, size), dtype=np.float64)
    x_all = torch.as_tensor(np.asarray(features, dtype=np.float64))
    y_all = torch.as_tensor(np.asarray(targets, dtype=np.float64))
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            grads = fn(params, x_all[start:stop], y_all[start:stop])  # type: ignore[operator]
            out[start:stop] = torch.cat(
                [g.reshape(stop - start, -1) for g in grads.values()], dim=1
            ).numpy()
    return out


def tracin_scores(
    model: nn.Module,
    checkpoints: Sequence[tuple[Mapping[str, torch.Tensor], float]],
    features: np.ndarray,
    labels: np.ndarray,
    query: np.ndarray,
) -> np.ndarray:
    """TracIn (Pruthi et al., NeurIPS 2020) of each record on a query input's logit.

    ``sum_t eta_t * grad f(x_q; theta_t) . grad l(z; theta_t)`` over checkpoints
    ``(state_t, eta_t)``: the first-order estimate of how much training on ``z`` with
    gradient descent moved the query's logit *down* (a descent step on ``z`` moves
    ``theta`` by ``-eta * grad l(z)``). It is returned with the opposite sign, so that,
    like :func:`explain.influence.influence_on_predictions`, a positive score means the
    record pushed the query's logit up. Each checkpoint costs one backward pass for the
    query and one forward-mode pass over the records (:func:`gradient_dot`).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` float64.
    """
    if not checkpoints:
        raise ExplanationError("TracIn needs at least one checkpoint")
    query = np.asarray(query, dtype=np.float64).reshape(1, -1)
    total = np.zeros(features.shape[0])
    twin = copy.deepcopy(model)
    for state, eta in checkpoints:
        twin.load_state_dict(dict(state))
        g_q = prediction_gradients(twin, query)
        total -= eta * gradient_dot(twin, features, labels, g_q)[:, 0]
    return total


def gradient_dot(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    directions: np.ndarray,
    *,
    chunk: int = _CHUNK,
) -> np.ndarray:
    """``grad l(z_i) . v_j`` for every record and direction, without the ``(n, p)`` gradients.

    Each product is the derivative of the record's loss along ``v_j``, so one forward-mode
    pass (:func:`torch.func.jvp`) per direction gives it for all records at once.

    Parameters
    ----------
    directions
        ``(k, p)`` in the flat layout of :func:`parameter_layout`.

    Returns
    -------
    numpy.ndarray
        ``(n, k)`` float64, equal to ``per_record_gradients(...) @ directions.T``.
    """
    check_inputs(features, labels, model_dimension(model))
    layout = parameter_layout(model)
    v = np.atleast_2d(np.asarray(directions, dtype=np.float64))
    if v.shape[1] != layout.size or not np.all(np.isfinite(v)):
        raise ExplanationError(
            f"directions must be finite with {layout.size} columns, got {v.shape}"
        )
    twin, params = _double(model)
    tangents = {
        name: torch.as_tensor(v[:, layout.slice(name)]).reshape(v.shape[0], *shape)
        for name, shape in zip(layout.names, layout.shapes, strict=True)
    }
    x_all = torch.as_tensor(np.asarray(features, dtype=np.float64))
    y_all = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    out = np.empty((features.shape[0], v.shape[0]))

    def logits(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(twin, p, (x,)).reshape(-1)
        return out

    # Forward-mode AD keeps its dual levels in process-wide state, so concurrent jvp
    # calls from several threads (sites simulated in one process) corrupt each other.
    with _FORWARD_AD, torch.no_grad():
        for start in range(0, features.shape[0], chunk):
            stop = min(start + chunk, features.shape[0])
            x, y = x_all[start:stop], y_all[start:stop]
            # d l / d theta = (sigmoid(f) - y) d f / d theta: only the logits go forward-mode.
            residual = torch.sigmoid(twin(x).reshape(-1)) - y

            def along(t: dict[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
                derivative: torch.Tensor = jvp(lambda p: logits(p, x), (params,), (t,))[1]
                return derivative

            out[start:stop] = (vmap(along)(tangents) * residual).T.numpy()
    return out
