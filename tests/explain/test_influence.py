"""Influence math: leave-one-out ground truth, exact Hessians, K-FAC solves, TracIn by hand.

Ground truth is computed independently of :mod:`explain`: a logistic model fitted with
Newton's method in float64 and refitted once per left-out record, autograd Hessians, and
explicit Kronecker products.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from explain.influence import influence_on_predictions, loss_influence, self_influence
from explain.per_record import (
    parameter_layout,
    per_record_gradients,
    prediction_gradients,
    tracin_scores,
)
from explain.second_order import (
    MAX_HESSIAN_PARAMETERS,
    SecondOrder,
    ekfac_labels,
    ekfac_terms_sum,
    hessian_labels,
    hessian_terms_sum,
    kfac_labels,
    kfac_terms_sum,
    linear_layers,
    pack_symmetric,
    unpack_symmetric,
)
from fedlens.errors import ExplanationError
from fedlens.models import build_model

TermsSum = Callable[[nn.Module, np.ndarray, float], tuple[np.ndarray, int]]


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


def with_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, mu: float, start: np.ndarray | None = None
) -> np.ndarray:
    """Minimiser of ``sum BCE + (mu / 2) ||theta||^2`` (bias included), by Newton, float64."""
    xt = with_bias(x)
    theta = np.zeros(xt.shape[1]) if start is None else start.copy()
    for _ in range(100):
        p = sigmoid(xt @ theta)
        gradient = xt.T @ (p - y) + mu * theta
        hessian = (xt * (p * (1 - p))[:, None]).T @ xt + mu * np.eye(xt.shape[1])
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-13:
            break
    return theta


def logistic_model(theta: np.ndarray) -> nn.Module:
    """fedlens' logistic model in float64 with ``theta = (w, b)``."""
    model = build_model("logistic", theta.size - 1).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.as_tensor(theta[:-1] if name.endswith("weight") else theta[-1:]))
    return model


def bce(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    logits = with_bias(x) @ theta
    return np.asarray(np.logaddexp(0.0, logits) - y * logits)


def mlp(dimension: int, seed: int = 0) -> nn.Module:
    return build_model("mlp", dimension, seed=seed).double()


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


# -- known answer: leave-one-out retraining ------------------------------------------------------


@dataclass(frozen=True)
class LeaveOneOut:
    x: np.ndarray
    y: np.ndarray
    theta: np.ndarray
    mu: float
    queries: np.ndarray
    validation: tuple[np.ndarray, np.ndarray]
    logit_drop: np.ndarray  # (n, k): f_q(theta) - f_q(theta_{-i})
    own_loss_rise: np.ndarray  # (n,): l_i(theta_{-i}) - l_i(theta)
    validation_rise: np.ndarray  # (n,): L(theta_{-i}) - L(theta)


@functools.lru_cache(maxsize=1)
def leave_one_out() -> LeaveOneOut:
    """A well-conditioned problem (N = 200, d = 3, mu = 5) refitted without each record."""
    rng = np.random.default_rng(0)
    n, d, mu = 200, 3, 5.0
    truth = np.array([1.5, -1.0, 0.5, 0.3])
    x = rng.normal(size=(n, d))
    y = (rng.random(n) < sigmoid(with_bias(x) @ truth)).astype(np.float64)
    xv = rng.normal(size=(50, d))
    yv = (rng.random(50) < sigmoid(with_bias(xv) @ truth)).astype(np.float64)
    queries = rng.normal(size=(4, d))
    theta = fit_logistic(x, y, mu)
    drop = np.empty((n, queries.shape[0]))
    own = np.empty(n)
    val = np.empty(n)
    for i in range(n):
        keep = np.arange(n) != i
        refit = fit_logistic(x[keep], y[keep], mu, start=theta)
        drop[i] = with_bias(queries) @ theta - with_bias(queries) @ refit
        own[i] = (
            bce(refit, x[i : i + 1], y[i : i + 1])[0] - bce(theta, x[i : i + 1], y[i : i + 1])[0]
        )
        val[i] = bce(refit, xv, yv).sum() - bce(theta, xv, yv).sum()
    return LeaveOneOut(x, y, theta, mu, queries, (xv, yv), drop, own, val)


def exact_second_order(case: LeaveOneOut) -> tuple[nn.Module, SecondOrder]:
    model = logistic_model(case.theta)
    packed, count = hessian_terms_sum(model, case.x)
    return model, SecondOrder.from_packed(model, "hessian", packed, count, case.mu / count)


def test_the_newton_fit_is_a_minimiser() -> None:
    case = leave_one_out()
    xt = with_bias(case.x)
    gradient = xt.T @ (sigmoid(xt @ case.theta) - case.y) + case.mu * case.theta
    assert np.abs(gradient).max() < 1e-10


def test_influence_on_predictions_matches_leave_one_out_retraining() -> None:
    case = leave_one_out()
    model, second = exact_second_order(case)
    estimate = influence_on_predictions(model, second, case.x, case.y, case.queries)
    assert estimate.shape == case.logit_drop.shape
    for k in range(case.queries.shape[0]):
        assert pearson(estimate[:, k], case.logit_drop[:, k]) >= 0.99
    assert np.abs(case.logit_drop).max() > 0.05  # the records do move the queries
    assert np.abs(estimate - case.logit_drop).max() < 0.015


def test_self_influence_matches_leave_one_out_retraining() -> None:
    case = leave_one_out()
    model, second = exact_second_order(case)
    estimate = self_influence(model, second, case.x, case.y)
    assert estimate.shape == (case.x.shape[0],)
    assert np.all(estimate >= 0)
    assert pearson(estimate, case.own_loss_rise) >= 0.99
    assert np.abs(estimate - case.own_loss_rise).max() < 0.03


def test_loss_influence_matches_leave_one_out_retraining() -> None:
    case = leave_one_out()
    model, second = exact_second_order(case)
    xv, yv = case.validation
    xvt = with_bias(xv)
    target = xvt.T @ (sigmoid(xvt @ case.theta) - yv)  # gradient of the summed validation BCE
    estimate = loss_influence(model, second, case.x, case.y, target)
    assert pearson(estimate, case.validation_rise) >= 0.99
    assert np.abs(case.validation_rise).max() > 0.1
    assert np.abs(estimate - case.validation_rise).max() < 0.03


def test_precomputed_gradients_give_the_same_influence() -> None:
    case = leave_one_out()
    model, second = exact_second_order(case)
    grads = per_record_gradients(model, case.x, case.y)
    np.testing.assert_allclose(
        influence_on_predictions(model, second, case.x, case.y, case.queries, gradients=grads),
        influence_on_predictions(model, second, case.x, case.y, case.queries),
        rtol=1e-12,
        atol=1e-15,
    )
    # A gradient that is not the record's own gives another answer: the argument is used.
    other = influence_on_predictions(
        model, second, case.x, case.y, case.queries, gradients=grads[::-1].copy()
    )
    assert not np.allclose(
        other, influence_on_predictions(model, second, case.x, case.y, case.queries)
    )


# -- the exact Hessian and clipping --------------------------------------------------------------


def test_hessian_terms_sum_is_autograds_hessian_of_the_summed_loss() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(25, 4))
    y = (rng.random(25) < 0.5).astype(np.float64)
    theta = rng.normal(size=5)
    model = logistic_model(theta)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        logits = xt @ flat[:-1] + flat[-1]
        return nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="sum")

    hessian = torch.autograd.functional.hessian  # untyped in torch's stubs
    expected = hessian(loss, torch.as_tensor(theta)).numpy()  # type: ignore[no-untyped-call]
    packed, count = hessian_terms_sum(model, x)
    assert count == 25
    assert packed.shape == (len(hessian_labels(model)),) == (15,)
    np.testing.assert_allclose(unpack_symmetric(packed, 5), expected, rtol=1e-12, atol=1e-14)


def records_and_model(form: str) -> tuple[np.ndarray, nn.Module, TermsSum]:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(21, 4)) * rng.uniform(0.1, 3.0, size=(21, 1))  # norms over a wide range
    if form == "hessian":
        return x, logistic_model(rng.normal(size=5) * 0.5), hessian_terms_sum
    return x, mlp(4), kfac_terms_sum


@pytest.mark.parametrize("form", ["hessian", "kfac"])
def test_each_records_clipped_term_has_norm_at_most_the_bound(form: str) -> None:
    x, model, terms = records_and_model(form)
    raw = np.stack([terms(model, x[i : i + 1], math.inf)[0] for i in range(x.shape[0])])
    norms = np.linalg.norm(raw, axis=1)
    ordered = np.sort(norms)
    bound = float(ordered[10] + ordered[11]) / 2  # about half the records exceed it
    clipped = np.stack([terms(model, x[i : i + 1], bound)[0] for i in range(x.shape[0])])
    big = norms > bound
    assert 5 <= big.sum() <= 15

    assert np.all(np.linalg.norm(clipped, axis=1) <= bound)
    # Terms within the bound are untouched, longer ones are scaled down to it.
    np.testing.assert_array_equal(clipped[~big], raw[~big])
    np.testing.assert_allclose(np.linalg.norm(clipped[big], axis=1), bound, rtol=1e-9)
    np.testing.assert_allclose(
        clipped[big], raw[big] * (bound / norms[big])[:, None], rtol=1e-9, atol=1e-15
    )
    # The site's sum is the sum of the records' clipped terms.
    total, count = terms(model, x, bound)
    assert count == x.shape[0]
    np.testing.assert_allclose(total, clipped.sum(axis=0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["hessian", "kfac"])
def test_a_bound_above_every_norm_changes_nothing(form: str) -> None:
    x, model, terms = records_and_model(form)
    unclipped, _ = terms(model, x, math.inf)
    largest = max(float(np.linalg.norm(terms(model, x[i : i + 1], math.inf)[0])) for i in range(21))
    np.testing.assert_array_equal(terms(model, x, 1.01 * largest)[0], unclipped)
    # ... and a bound just below the largest norm does.
    assert not np.allclose(terms(model, x, 0.9 * largest)[0], unclipped, rtol=1e-6, atol=0)


@pytest.mark.parametrize("form", ["hessian", "kfac", "ekfac"])
def test_a_float32_models_terms_do_not_depend_on_the_other_records(form: str) -> None:
    x = np.random.default_rng(13).uniform(0.0, 1.0, size=(64, 30))
    model = build_model("logistic" if form == "hessian" else "mlp", 30, seed=2)
    terms: TermsSum = hessian_terms_sum if form == "hessian" else kfac_terms_sum
    if form == "ekfac":
        kfac = kfac_solver(mlp(30, seed=2), x, 0.1)

        def terms(model: nn.Module, x: np.ndarray, clip: float) -> tuple[np.ndarray, int]:
            return ekfac_terms_sum(model, x, kfac, clip)

    batch, _ = terms(model, x, math.inf)
    alone = np.sum([terms(model, x[i : i + 1], math.inf)[0] for i in range(64)], axis=0)
    assert np.abs(batch - alone).max() <= 1e-11 * np.abs(batch).max()


def test_a_model_too_large_for_a_full_hessian_is_refused() -> None:
    model = build_model("mlp", 30)  # 1 025 parameters
    assert parameter_layout(model).size > MAX_HESSIAN_PARAMETERS
    with pytest.raises(ExplanationError, match="kfac"):
        hessian_labels(model)
    with pytest.raises(ExplanationError, match="kfac"):
        hessian_terms_sum(model, np.zeros((3, 30)))


# -- packing symmetric matrices ------------------------------------------------------------------


def symmetric(n: int, values: list[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(n, n)
    return (a + a.T) / 2.0


@st.composite
def symmetric_matrices(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(min_value=1, max_value=8))
    values = draw(
        st.lists(
            st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
            min_size=n * n,
            max_size=n * n,
        )
    )
    return symmetric(n, values)


@settings(max_examples=80, deadline=None)
@given(symmetric_matrices())
def test_pack_then_unpack_is_the_identity_and_keeps_the_frobenius_norm(matrix: np.ndarray) -> None:
    n = matrix.shape[0]
    packed = pack_symmetric(matrix)
    assert packed.shape == (n * (n + 1) // 2,)
    np.testing.assert_allclose(unpack_symmetric(packed, n), matrix, rtol=1e-14, atol=1e-9)
    np.testing.assert_allclose(
        np.linalg.norm(packed), np.linalg.norm(matrix, "fro"), rtol=1e-12, atol=1e-9
    )


@settings(max_examples=80, deadline=None)
@given(
    st.integers(min_value=1, max_value=8).flatmap(
        lambda n: st.lists(
            st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
            min_size=n * (n + 1) // 2,
            max_size=n * (n + 1) // 2,
        )
    )
)
def test_unpack_then_pack_is_the_identity(values: list[float]) -> None:
    packed = np.asarray(values)
    n = int((math.isqrt(8 * packed.size + 1) - 1) // 2)
    matrix = unpack_symmetric(packed, n)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_allclose(pack_symmetric(matrix), packed, rtol=1e-14, atol=1e-9)


def test_pack_puts_the_diagonal_first_and_scales_the_upper_triangle() -> None:
    matrix = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    s = math.sqrt(2.0)
    np.testing.assert_allclose(pack_symmetric(matrix), [1, 4, 6, 2 * s, 3 * s, 5 * s])
    batch = np.stack([matrix, 2 * matrix])
    np.testing.assert_allclose(pack_symmetric(batch)[1], 2 * pack_symmetric(matrix))


def test_unpack_refuses_a_vector_of_the_wrong_length() -> None:
    with pytest.raises(ExplanationError, match="6 values"):
        unpack_symmetric(np.zeros(5), 3)


# -- K-FAC ---------------------------------------------------------------------------------------


def kfac_blocks(
    model: nn.Module, packed: np.ndarray, count: float
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per layer: name, ``A / N`` and ``G / N`` read from the packed vector by hand."""
    out, at = [], 0
    for name, layer in linear_layers(model):
        n_a, n_g = layer.in_features + 1, layer.out_features
        size_a, size_g = n_a * (n_a + 1) // 2, n_g * (n_g + 1) // 2
        a = unpack_symmetric(packed[at : at + size_a], n_a) / count
        g = unpack_symmetric(packed[at + size_a : at + size_a + size_g], n_g) / count
        out.append((name, a, g))
        at += size_a + size_g
    assert at == packed.size
    return out


def layer_matrix(model: nn.Module, name: str, flat: np.ndarray) -> np.ndarray:
    """The layer's slice of a flat ``(p,)`` vector as ``(out, in + 1)``: weight, then bias."""
    layout = parameter_layout(model)
    weight = flat[layout.slice(f"{name}.weight")].reshape(
        layout.shapes[layout.names.index(f"{name}.weight")]
    )
    bias = flat[layout.slice(f"{name}.bias")]
    return np.concatenate([weight, bias[:, None]], axis=1)


def test_kfac_factors_of_one_record_are_its_gauss_newton_block() -> None:
    model = mlp(4)
    x = np.random.default_rng(3).normal(size=(1, 4))
    packed, count = kfac_terms_sum(model, x)
    assert count == 1 and packed.shape == (len(kfac_labels(model)),)
    jac = prediction_gradients(model, x)[0]
    with torch.no_grad():
        logit = float(model(torch.as_tensor(x))[0, 0])
    h = float(sigmoid(np.array(logit)) * (1 - sigmoid(np.array(logit))))
    for name, a, g in kfac_blocks(model, packed, 1.0):
        j = layer_matrix(model, name, jac).reshape(-1)  # row-major (out, in + 1)
        np.testing.assert_allclose(np.kron(g, a), h * np.outer(j, j), rtol=1e-9, atol=1e-14)
    # The first layer's A factor is the input with a trailing 1.
    first = kfac_blocks(model, packed, 1.0)[0][1]
    np.testing.assert_allclose(first, np.outer(with_bias(x)[0], with_bias(x)[0]), rtol=1e-12)


def test_kfac_solve_is_an_explicit_kronecker_solve_per_layer() -> None:
    model = mlp(4)
    x = np.random.default_rng(4).normal(size=(50, 4))
    packed, count = kfac_terms_sum(model, x)
    damping = 0.05
    second = SecondOrder.from_packed(model, "kfac", packed, count, damping)
    rhs = np.random.default_rng(5).normal(size=(parameter_layout(model).size, 3))
    solved = second.solve(rhs)
    layout = parameter_layout(model)
    expected = np.empty_like(rhs)
    for name, a, g in kfac_blocks(model, packed, count):
        matrix = np.kron(g, a) + damping * np.eye(a.shape[0] * g.shape[0])
        out, width = g.shape[0], a.shape[0]
        for column in range(rhs.shape[1]):
            v = layer_matrix(model, name, rhs[:, column]).reshape(-1)
            w = np.linalg.solve(matrix, v).reshape(out, width)
            expected[layout.slice(f"{name}.weight"), column] = w[:, :-1].reshape(-1)
            expected[layout.slice(f"{name}.bias"), column] = w[:, -1]
    np.testing.assert_allclose(solved, expected, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(second.solve(rhs[:, 1]), expected[:, 1], rtol=1e-8, atol=1e-12)


def indefinite(n: int, eigenvalues: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q @ np.diag(eigenvalues) @ q.T, q


def test_hessian_solve_projects_an_indefinite_noised_matrix_onto_the_psd_cone() -> None:
    model = logistic_model(np.zeros(4))
    values = [-5.0, 0.5, 2.0, 3.0]
    matrix, q = indefinite(4, values, seed=6)
    damping, count = 0.1, 7.0
    second = SecondOrder.from_packed(
        model, "hessian", pack_symmetric(matrix) * count, count, damping
    )
    v = np.random.default_rng(7).normal(size=(4, 20))
    solved = second.solve(v)
    assert np.all(np.isfinite(solved))
    assert np.all(np.einsum("ij,ij->j", v, solved) > 0)
    projected = q @ np.diag(np.maximum(values, 0.0)) @ q.T
    np.testing.assert_allclose(
        solved, np.linalg.solve(projected + damping * np.eye(4), v), rtol=1e-9, atol=1e-12
    )
    # Along the negative direction only the damping is left.
    np.testing.assert_allclose(second.solve(q[:, 0]), q[:, 0] / damping, rtol=1e-9, atol=1e-9)


def test_kfac_solve_projects_indefinite_noised_factors() -> None:
    model = mlp(2)  # layers.0: A 3x3, G 32x32; layers.2: A 33x33, G 1x1
    layers = linear_layers(model)
    parts, negatives = [], []
    for i, (_, layer) in enumerate(layers):
        n_a, n_g = layer.in_features + 1, layer.out_features
        a, q_a = indefinite(n_a, [-4.0] + [1.0] * (n_a - 1), seed=10 + i)
        g, q_g = indefinite(n_g, [2.0] * n_g, seed=20 + i)
        parts += [pack_symmetric(a), pack_symmetric(g)]
        negatives.append((q_a[:, 0], q_g[:, 0]))
    packed = np.concatenate(parts)
    damping = 0.1
    second = SecondOrder.from_packed(model, "kfac", packed, 1.0, damping)
    p = parameter_layout(model).size
    v = np.random.default_rng(8).normal(size=(p, 10))
    solved = second.solve(v)
    assert np.all(np.isfinite(solved))
    assert np.all(np.einsum("ij,ij->j", v, solved) > 0)
    # The raw product has eigenvalue -8 < -damping there; projected, only the damping remains.
    layout = parameter_layout(model)
    for (name, _), (qa, qg) in zip(layers, negatives, strict=True):
        block = np.outer(qg, qa)  # (out, in + 1) in the row-major layout
        flat = np.zeros(p)
        flat[layout.slice(f"{name}.weight")] = block[:, :-1].reshape(-1)
        flat[layout.slice(f"{name}.bias")] = block[:, -1]
        np.testing.assert_allclose(second.solve(flat), flat / damping, rtol=1e-9, atol=1e-9)


# -- EK-FAC --------------------------------------------------------------------------------------


def kfac_solver(model: nn.Module, x: np.ndarray, damping: float) -> SecondOrder:
    packed, count = kfac_terms_sum(model, x)
    return SecondOrder.from_packed(model, "kfac", packed, count, damping)


def test_ekfac_terms_are_squared_per_record_gradients_in_the_kfac_eigenbasis() -> None:
    model = mlp(4)
    x = np.random.default_rng(14).normal(size=(30, 4))
    kfac = kfac_solver(model, x, 0.1)
    packed, count = ekfac_terms_sum(model, x, kfac)
    assert count == 30 and packed.shape == (len(ekfac_labels(model)),)
    assert packed.size == parameter_layout(model).size
    # Each record's layer gradient in Gauss-Newton form, sqrt(h) d f / d W, from autograd.
    jac = prediction_gradients(model, x)
    with torch.no_grad():
        logits = model(torch.as_tensor(x)).numpy()[:, 0]
    root_h = np.sqrt(sigmoid(logits) * (1 - sigmoid(logits)))
    expected = []
    for (name, _), block in zip(linear_layers(model), kfac.blocks, strict=True):
        total = np.zeros((block.basis_g.shape[0], block.basis_a.shape[0]))
        for i in range(30):
            gradient = root_h[i] * layer_matrix(model, name, jac[i])  # (out, in + 1)
            total += (block.basis_g.T @ gradient @ block.basis_a) ** 2
        expected.append(total.reshape(-1))
    np.testing.assert_allclose(packed, np.concatenate(expected), rtol=1e-9, atol=1e-14)


def test_ekfac_terms_are_clipped_per_record() -> None:
    model = mlp(4)
    x = np.random.default_rng(15).normal(size=(20, 4)) * 3
    kfac = kfac_solver(model, x, 0.1)
    raw = np.stack([ekfac_terms_sum(model, x[i : i + 1], kfac)[0] for i in range(20)])
    norms = np.linalg.norm(raw, axis=1)
    bound = float(np.median(norms))
    clipped = np.stack([ekfac_terms_sum(model, x[i : i + 1], kfac, bound)[0] for i in range(20)])
    assert np.all(np.linalg.norm(clipped, axis=1) <= bound)
    big = norms > bound
    np.testing.assert_allclose(np.linalg.norm(clipped[big], axis=1), bound, rtol=1e-9)
    np.testing.assert_array_equal(clipped[~big], raw[~big])


def test_corrected_solve_divides_by_the_new_eigenvalues_in_the_kfac_eigenbasis() -> None:
    model = mlp(3)
    x = np.random.default_rng(16).normal(size=(40, 3))
    damping = 0.05
    kfac = kfac_solver(model, x, damping)
    packed, count = ekfac_terms_sum(model, x, kfac)
    ekfac = kfac.corrected(packed / count)
    assert ekfac.form == "ekfac"
    rhs = np.random.default_rng(17).normal(size=(parameter_layout(model).size, 2))
    solved = ekfac.solve(rhs)
    at = 0
    for (name, _), block in zip(linear_layers(model), kfac.blocks, strict=True):
        size = block.basis_g.shape[0] * block.basis_a.shape[0]
        basis = np.kron(block.basis_g, block.basis_a)  # row-major (out, in + 1)
        matrix = basis @ np.diag(packed[at : at + size] / count + damping) @ basis.T
        at += size
        for column in range(2):
            v = layer_matrix(model, name, rhs[:, column]).reshape(-1)
            w = np.linalg.solve(matrix, v)
            got = layer_matrix(model, name, solved[:, column]).reshape(-1)
            np.testing.assert_allclose(got, w, rtol=1e-8, atol=1e-12)
    assert at == packed.size
    # With K-FAC's own eigenvalues the correction changes nothing.
    same = kfac.corrected(np.concatenate([b.eigenvalues.reshape(-1) for b in kfac.blocks]))
    np.testing.assert_allclose(same.solve(rhs), kfac.solve(rhs), rtol=1e-10, atol=1e-14)
    assert not np.allclose(solved, kfac.solve(rhs), rtol=1e-3)


def test_negative_noised_corrections_are_floored_at_zero() -> None:
    model = mlp(2)
    kfac = kfac_solver(model, np.random.default_rng(18).normal(size=(30, 2)), 0.1)
    p = parameter_layout(model).size
    values = np.full(p, 2.0)
    values[0] = -50.0  # the first eigen-direction of the first layer
    solved = kfac.corrected(values).solve(np.eye(p))
    assert np.all(np.isfinite(solved))
    assert np.all(np.linalg.eigvalsh((solved + solved.T) / 2) > 0)
    block = kfac.blocks[0]
    direction = np.outer(block.basis_g[:, 0], block.basis_a[:, 0])
    flat = np.zeros(p)
    name = linear_layers(model)[0][0]
    flat[parameter_layout(model).slice(f"{name}.weight")] = direction[:, :-1].reshape(-1)
    flat[parameter_layout(model).slice(f"{name}.bias")] = direction[:, -1]
    np.testing.assert_allclose(kfac.corrected(values).solve(flat), flat / 0.1, rtol=1e-9, atol=1e-9)


def test_only_fitting_corrections_of_kfac_factors_are_accepted() -> None:
    model = mlp(2)
    kfac = kfac_solver(model, np.random.default_rng(19).normal(size=(10, 2)), 0.1)
    p = parameter_layout(model).size
    with pytest.raises(ExplanationError, match=f"EK-FAC needs {p} finite eigenvalues"):
        kfac.corrected(np.ones(p + 1))
    bad = np.ones(p)
    bad[3] = np.inf
    with pytest.raises(ExplanationError, match="finite eigenvalues"):
        kfac.corrected(bad)
    hessian = SecondOrder.from_packed(
        logistic_model(np.zeros(3)), "hessian", pack_symmetric(np.eye(3)), 1.0, 0.1
    )
    with pytest.raises(ExplanationError, match="only K-FAC factors can be corrected"):
        hessian.corrected(np.ones(3))


@pytest.mark.parametrize(
    ("form", "count", "damping", "fill", "length", "message"),
    [
        ("hessian", 0.5, 0.1, 0.0, 15, "count must be >= 1"),
        ("hessian", math.nan, 0.1, 0.0, 15, "count must be >= 1"),
        ("hessian", 10.0, 0.0, 0.0, 15, "damping must be finite and > 0"),
        ("hessian", 10.0, math.inf, 0.0, 15, "damping must be finite and > 0"),
        ("hessian", 10.0, 0.1, math.nan, 15, "NaN or infinite"),
        ("hessian", 10.0, 0.1, 0.0, 14, "15 packed values"),
        ("newton", 10.0, 0.1, 0.0, 15, "unknown second-order form"),
    ],
)
def test_second_order_refuses_bad_factors(
    form: str, count: float, damping: float, fill: float, length: int, message: str
) -> None:
    model = logistic_model(np.zeros(5))
    with pytest.raises(ExplanationError, match=message):
        SecondOrder.from_packed(model, form, np.full(length, fill), count, damping)


def test_kfac_refuses_factors_of_the_wrong_length() -> None:
    model = mlp(3)
    expected = len(kfac_labels(model))
    with pytest.raises(ExplanationError, match=f"{expected} packed values"):
        SecondOrder.from_packed(model, "kfac", np.zeros(expected - 1), 10.0, 0.1)


# -- TracIn --------------------------------------------------------------------------------------


def test_tracin_is_the_hand_computed_sum_over_two_checkpoints() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(12, 3))
    y = (rng.random(12) < 0.5).astype(np.int64)
    query = rng.normal(size=3)
    thetas = [rng.normal(size=4), rng.normal(size=4)]
    rates = [0.3, 0.05]
    model = build_model("logistic", 3)
    checkpoints = [
        (
            {
                "linear.weight": torch.tensor(t[None, :3], dtype=torch.float32),
                "linear.bias": torch.tensor(t[3:], dtype=torch.float32),
            },
            eta,
        )
        for t, eta in zip(thetas, rates, strict=True)
    ]
    expected = np.zeros(12)
    for theta, eta in zip(thetas, rates, strict=True):
        theta32 = theta.astype(np.float32).astype(np.float64)  # the checkpoints are float32
        loss_gradients = (sigmoid(with_bias(x) @ theta32) - y)[:, None] * with_bias(x)
        logit_gradient = with_bias(query[None, :])[0]
        # A descent step on z moves the query's logit by -eta * grad f . grad l(z): that push
        # is the score.
        expected -= eta * loss_gradients @ logit_gradient
    scores = tracin_scores(model, checkpoints, x, y, query)
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-12)
    # The model passed in is left as it was.
    assert not torch.equal(model.state_dict()["linear.bias"], checkpoints[1][0]["linear.bias"])


def test_tracin_needs_a_checkpoint() -> None:
    with pytest.raises(ExplanationError, match="at least one checkpoint"):
        tracin_scores(build_model("logistic", 2), [], np.zeros((1, 2)), np.zeros(1), np.zeros(2))


# -- per-record gradients ------------------------------------------------------------------------


def autograd_gradient(model: nn.Module, x: np.ndarray, y: float | None) -> np.ndarray:
    """One record's loss gradient (or, with ``y`` None, its logit's), flat, by autograd."""
    params = list(model.parameters())
    logit = model(torch.as_tensor(x[None, :]))[0, 0]
    target = (
        logit
        if y is None
        else nn.functional.binary_cross_entropy_with_logits(
            logit, torch.tensor(y, dtype=logit.dtype)
        )
    )
    grads = torch.autograd.grad(target, params)
    return torch.cat([g.reshape(-1) for g in grads]).detach().numpy()


def test_per_record_gradients_equal_a_loop_of_single_record_autograd() -> None:
    rng = np.random.default_rng(11)
    model = mlp(5, seed=3)
    x = rng.normal(size=(13, 5))
    y = (rng.random(13) < 0.5).astype(np.int64)
    expected = np.stack([autograd_gradient(model, x[i], float(y[i])) for i in range(13)])
    # Chunks of 5 cut the records into 5 + 5 + 3.
    np.testing.assert_allclose(
        per_record_gradients(model, x, y, chunk=5), expected, rtol=1e-10, atol=1e-12
    )
    logits = np.stack([autograd_gradient(model, x[i], None) for i in range(13)])
    np.testing.assert_allclose(
        prediction_gradients(model, x, chunk=4), logits, rtol=1e-10, atol=1e-12
    )


def test_per_record_gradients_of_a_float32_model_are_float64_in_named_parameter_order() -> None:
    model = build_model("mlp", 3)
    layout = parameter_layout(model)
    assert layout.names == ("layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias")
    x = np.random.default_rng(12).normal(size=(4, 3)).astype(np.float32)
    grads = per_record_gradients(model, x, np.array([0, 1, 1, 0]))
    assert grads.dtype == np.float64 and grads.shape == (4, layout.size)
    expected = autograd_gradient(copy.deepcopy(model).double(), x[2].astype(np.float64), 1.0)
    np.testing.assert_allclose(grads[2], expected, rtol=1e-12, atol=1e-14)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not converted


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.zeros((3, 4)), np.zeros(3), r"shape \(n, 3\)"),
        (np.array([[0.0, np.nan, 1.0]]), np.zeros(1), "NaN or infinite"),
        (np.array([[0.0, np.inf, 1.0]]), np.zeros(1), "NaN or infinite"),
        (np.zeros((2, 3)), np.array([0, 2]), "labels must be 0 or 1"),
        (np.zeros((2, 3)), np.array([0.0, 0.5]), "labels must be 0 or 1"),
        (np.zeros((2, 3)), np.zeros(3), "expected 2 labels"),
    ],
)
def test_per_record_gradients_refuse_bad_records(
    features: np.ndarray, labels: np.ndarray, message: str
) -> None:
    with pytest.raises(ExplanationError, match=message):
        per_record_gradients(build_model("logistic", 3), features, labels)
