"""Second-order information summed over records: the Gauss-Newton Hessian and K-FAC.

Influence functions (Koh & Liang, ICML 2017) need the Hessian ``H`` of the training
objective. For a binary model with one logit ``f`` and cross-entropy loss, each record's
Gauss-Newton term is

    H_z = h_z * J_z J_z^T,   J_z = d f(x_z) / d theta,   h_z = s(f)(1 - s(f)),

which is the exact Hessian of the loss when ``f`` is linear in ``theta`` (logistic
regression) and its positive semi-definite Gauss-Newton part otherwise. For an MLP the
``p x p`` matrix is too large to sum across sites, so each Linear layer keeps two
Kronecker factors instead (K-FAC; Martens & Grosse 2015, George et al. 2018):

    A = sum_z a_z a_z^T   (the layer's input with a trailing 1 for the bias)
    G = sum_z g_z g_z^T   (g_z = sqrt(h_z) * d f / d s, s the layer's output)

and the layer's block of ``H`` is approximated by ``(A / N) (x) (G / N)``.

Both are sums over records, so sites add them up with secure aggregation. Each record's
term is packed as the scaled half-vectorisation of its matrices (diagonal entries, then
``sqrt(2)`` times the entries above it: the vector's L2 norm equals the matrices'
Frobenius norm) and clipped to L2 norm ``C``; the term's norm is ``h_z ||J_z||^2`` for the
Hessian and ``sqrt(sum_layers ||a||^4 + ||g||^4)`` for K-FAC, computed without forming it.

Solving
-------
The released sums are noised, so the mean factors a site receives may be indefinite.
:class:`SecondOrder` projects each one onto the positive semi-definite cone (eigenvalues
floored at 0, the Euclidean projection) and adds the damping ``lambda``: it solves
``(H / N + lambda I) v = b``. With a model trained to minimise
``sum_z l(z) + (mu / 2) ||theta||^2``, ``lambda = mu / N`` makes this the exact Hessian of
the objective divided by ``N``.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from explain.per_record import check_inputs, model_dimension, parameter_layout, prediction_gradients
from fedlens.errors import ExplanationError

__all__ = [
    "MAX_HESSIAN_PARAMETERS",
    "KroneckerBlock",
    "SecondOrder",
    "ekfac_labels",
    "ekfac_terms_sum",
    "hessian_labels",
    "hessian_terms_sum",
    "kfac_labels",
    "kfac_terms_sum",
    "linear_layers",
    "model_fingerprint",
    "pack_symmetric",
    "unpack_symmetric",
]

# A full Hessian has p (p + 1) / 2 coordinates: 4 005 for logistic regression on adult.
MAX_HESSIAN_PARAMETERS = 400


def pack_symmetric(matrix: np.ndarray) -> np.ndarray:
    """Scaled half-vectorisation: diagonal, then ``sqrt(2)`` times the upper triangle."""
    n = matrix.shape[-1]
    upper = np.triu_indices(n, 1)
    return np.concatenate(
        [np.diagonal(matrix, axis1=-2, axis2=-1), math.sqrt(2.0) * matrix[..., upper[0], upper[1]]],
        axis=-1,
    )


def unpack_symmetric(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_symmetric`: ``(n (n + 1) / 2,) -> (n, n)``."""
    if packed.shape != (n * (n + 1) // 2,):
        raise ExplanationError(
            f"a packed {n}x{n} symmetric matrix has {n * (n + 1) // 2} values, got {packed.shape}"
        )
    out = np.diag(packed[:n].astype(np.float64))
    upper = np.triu_indices(n, 1)
    out[upper] = packed[n:] / math.sqrt(2.0)
    out[upper[1], upper[0]] = out[upper]
    return out


def _packed_names(prefix: str, n: int) -> list[str]:
    upper = np.triu_indices(n, 1)
    return [f"{prefix}[{i},{i}]" for i in range(n)] + [
        f"{prefix}[{i},{j}]" for i, j in zip(upper[0].tolist(), upper[1].tolist(), strict=True)
    ]


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the parameters (float32, ``named_parameters`` order), hex, 16 digits.

    Second-order factors are tied to the model they were computed on; a request that
    names factors of another model is refused as stale.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's Linear layers in order; K-FAC needs every parameter to sit in one."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    covered = sum(
        m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for _, m in layers
    )
    if any(m.bias is None for _, m in layers) or covered != parameter_layout(model).size:
        raise ExplanationError(
            f"K-FAC needs a model whose parameters are all Linear layers with biases; "
            f"{type(model).__name__} is not"
        )
    return layers


def hessian_labels(model: nn.Module) -> tuple[str, ...]:
    p = parameter_layout(model).size
    if p > MAX_HESSIAN_PARAMETERS:
        raise ExplanationError(
            f"{type(model).__name__} has {p} parameters; a full Hessian is summed for at most "
            f"{MAX_HESSIAN_PARAMETERS} (use the kfac kind)"
        )
    return tuple(_packed_names("H", p))


def kfac_labels(model: nn.Module) -> tuple[str, ...]:
    names: list[str] = []
    for name, layer in linear_layers(model):
        names += _packed_names(f"{name}/A", layer.in_features + 1)
        names += _packed_names(f"{name}/G", layer.out_features)
    return tuple(names)


def _curvature(logits: np.ndarray) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-logits))
    return np.asarray(p * (1.0 - p))


def _float64(model: nn.Module) -> nn.Module:
    """A float64 copy: float32 rounding in a batched matmul depends on the batch, and a
    record's clipped term must depend on that record alone (the sensitivity argument)."""
    return copy.deepcopy(model).double().eval()


def _logits(model: nn.Module, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = _float64(model)(torch.as_tensor(features, dtype=torch.float64))
    return np.asarray(out.detach().numpy().reshape(-1))


def hessian_terms_sum(
    model: nn.Module, features: np.ndarray, clip_bound: float = math.inf
) -> tuple[np.ndarray, int]:
    """Packed sum of the records' Gauss-Newton terms, each clipped to Frobenius norm ``C``.

    Returns
    -------
    (numpy.ndarray, int)
        ``(p (p + 1) / 2,)`` float64 and the number of records.
    """
    hessian_labels(model)  # refuses models too large for a full Hessian
    check_inputs(features, None, model_dimension(model))
    jac = prediction_gradients(model, features)
    h = _curvature(_logits(model, features))
    norms = h * np.einsum("ij,ij->i", jac, jac)
    weights = h * _clip_factors(norms, clip_bound)
    return pack_symmetric(jac.T @ (jac * weights[:, None])), features.shape[0]


def _clip_factors(norms: np.ndarray, clip_bound: float) -> np.ndarray:
    if math.isinf(clip_bound):
        return np.ones_like(norms)
    # Shrunk a hair below the bound, so that rounding never lifts a term above it.
    bound = clip_bound * (1.0 - 2.0**-40)
    return np.where(norms > bound, bound / np.maximum(norms, 1e-300), 1.0)


def _layer_statistics(
    model: nn.Module, features: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer: the inputs with a bias column ``(n, in + 1)`` and ``g`` ``(n, out)``."""
    model = _float64(model)
    layers = linear_layers(model)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in layers:

        def hook(
            _: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name
        ) -> None:
            inputs[name] = args[0].detach()
            out.retain_grad()
            outputs[name] = out

        hooks.append(layer.register_forward_hook(hook))
    try:
        x = torch.as_tensor(features, dtype=torch.float64)
        logits = model(x).reshape(-1)
        # Records are independent, so the gradient of the summed logits with respect to
        # a layer's outputs holds each record's own d f / d s in its row.
        logits.sum().backward()
    finally:
        for handle in hooks:
            handle.remove()
        model.zero_grad(set_to_none=True)
    root_h = np.sqrt(_curvature(logits.detach().double().numpy()))
    stats = []
    for name, _ in layers:
        a = inputs[name].double().numpy()
        grad_out = outputs[name].grad
        if grad_out is None:  # pragma: no cover - every layer lies on the logit's path
            raise ExplanationError(f"layer {name} does not reach the model's output")
        a1 = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
        stats.append((a1, grad_out.double().numpy() * root_h[:, None]))
    return stats


def kfac_terms_sum(
    model: nn.Module, features: np.ndarray, clip_bound: float = math.inf
) -> tuple[np.ndarray, int]:
    """Packed sums of every layer's ``a a^T`` and ``g g^T``, each record's term clipped.

    Returns
    -------
    (numpy.ndarray, int)
        The packed factors in :func:`kfac_labels` order, and the number of records.
    """
    check_inputs(features, None, model_dimension(model))
    stats = _layer_statistics(model, features)
    norms_sq = sum(
        np.einsum("ij,ij->i", a, a) ** 2 + np.einsum("ij,ij->i", g, g) ** 2 for a, g in stats
    )
    c = _clip_factors(np.sqrt(np.asarray(norms_sq)), clip_bound)
    parts = []
    for a, g in stats:
        parts.append(pack_symmetric(a.T @ (a * c[:, None])))
        parts.append(pack_symmetric(g.T @ (g * c[:, None])))
    return np.concatenate(parts), features.shape[0]


@dataclass(frozen=True)
class KroneckerBlock:
    """One Linear layer's curvature in its Kronecker eigenbasis.

    ``basis_a`` ``(in + 1, in + 1)`` and ``basis_g`` ``(out, out)`` are the eigenvectors of
    the mean factors; ``eigenvalues`` ``(out, in + 1)`` the curvature in that basis
    (``outer(eig_G, eig_A)`` for K-FAC, measured per entry for EK-FAC).
    """

    basis_a: np.ndarray
    basis_g: np.ndarray
    eigenvalues: np.ndarray
    weight: slice
    bias: slice


def ekfac_labels(model: nn.Module) -> tuple[str, ...]:
    names: list[str] = []
    for name, layer in linear_layers(model):
        names += [
            f"{name}/E[{i},{j}]"
            for i in range(layer.out_features)
            for j in range(layer.in_features + 1)
        ]
    return tuple(names)


def ekfac_terms_sum(
    model: nn.Module, features: np.ndarray, kfac: SecondOrder, clip_bound: float = math.inf
) -> tuple[np.ndarray, int]:
    """Sum over records of each layer's squared gradient in the K-FAC eigenbasis.

    A record's layer gradient (Gauss-Newton form) is ``g a^T``; in the eigenbasis it is
    ``(Q_G^T g)(Q_A^T a)^T``, so its entrywise square is the outer product of the squares
    ``u = (Q_G^T g)^2`` and ``v = (Q_A^T a)^2``, with Frobenius norm ``||u|| ||v||``. The
    record's whole term (every layer) is clipped to L2 norm ``C``.

    Returns
    -------
    (numpy.ndarray, int)
        ``(p,)`` float64 in :func:`ekfac_labels` order, and the number of records.
    """
    check_inputs(features, None, model_dimension(model))
    stats = _layer_statistics(model, features)
    squares = [
        ((g @ block.basis_g) ** 2, (a @ block.basis_a) ** 2)
        for (a, g), block in zip(stats, kfac.blocks, strict=True)
    ]
    norms_sq = sum(np.einsum("ij,ij->i", u, u) * np.einsum("ij,ij->i", v, v) for u, v in squares)
    c = _clip_factors(np.sqrt(np.asarray(norms_sq)), clip_bound)
    parts = [((u * c[:, None]).T @ v).reshape(-1) for u, v in squares]
    return np.concatenate(parts), features.shape[0]


@dataclass
class SecondOrder:
    """Damped, PSD-projected mean curvature, ready to solve ``(H / N + lambda I) v = b``.

    Build it with :meth:`from_packed` from a released (or locally computed) packed sum.

    Attributes
    ----------
    form
        ``"hessian"`` or ``"kfac"``.
    count
        ``N``, the (noised) number of records the sums cover.
    damping
        ``lambda`` > 0.
    """

    form: str
    count: float
    damping: float
    # hessian: (eigenvalues, eigenvectors). kfac and ekfac, per layer: the eigenbases of
    # A and G, the (out, in + 1) eigenvalues in that basis, the weight and bias slices.
    _eig: tuple[np.ndarray, np.ndarray] | None = None
    _layers: list[KroneckerBlock] = field(default_factory=list)

    @classmethod
    def from_packed(
        cls, model: nn.Module, form: str, packed: np.ndarray, count: float, damping: float
    ) -> SecondOrder:
        """The solver for ``model`` from packed sums of :func:`hessian_terms_sum` or
        :func:`kfac_terms_sum` over ``count`` records.

        Raises
        ------
        ExplanationError
            A form other than hessian/kfac, a packed vector whose length does not fit
            the model, non-finite values, ``count < 1`` or ``damping <= 0``.
        """
        if not math.isfinite(count) or count < 1:
            raise ExplanationError(f"second-order count must be >= 1, got {count!r}")
        if not math.isfinite(damping) or damping <= 0:
            raise ExplanationError(f"damping must be finite and > 0, got {damping!r}")
        packed = np.asarray(packed, dtype=np.float64)
        if not np.all(np.isfinite(packed)):
            raise ExplanationError("second-order factors hold NaN or infinite values")
        if form == "hessian":
            labels = hessian_labels(model)
            if packed.shape != (len(labels),):
                raise ExplanationError(
                    f"a Hessian of this model has {len(labels)} packed values, got {packed.shape}"
                )
            p = parameter_layout(model).size
            return cls(form, count, damping, _eig=_psd_eig(unpack_symmetric(packed, p) / count))
        if form != "kfac":
            raise ExplanationError(f"unknown second-order form {form!r}; expected hessian or kfac")
        expected = len(kfac_labels(model))
        if packed.shape != (expected,):
            raise ExplanationError(
                f"K-FAC factors of this model have {expected} packed values, got {packed.shape}"
            )
        layout = parameter_layout(model)
        layers, at = [], 0
        for name, layer in linear_layers(model):
            n_a, n_g = layer.in_features + 1, layer.out_features
            size_a, size_g = n_a * (n_a + 1) // 2, n_g * (n_g + 1) // 2
            a = unpack_symmetric(packed[at : at + size_a], n_a) / count
            g = unpack_symmetric(packed[at + size_a : at + size_a + size_g], n_g) / count
            at += size_a + size_g
            eig_a, q_a = _psd_eig(a)
            eig_g, q_g = _psd_eig(g)
            layers.append(
                KroneckerBlock(
                    q_a,
                    q_g,
                    np.outer(eig_g, eig_a),
                    layout.slice(f"{name}.weight"),
                    layout.slice(f"{name}.bias"),
                )
            )
        return cls(form, count, damping, _layers=layers)

    def corrected(self, eigenvalues: np.ndarray) -> SecondOrder:
        """EK-FAC (George et al. 2018): the K-FAC eigenbases with the eigenvalues replaced by
        the mean squared per-record gradients in those bases (:func:`ekfac_terms_sum`
        divided by the record count), flattened layer by layer like the parameters.

        Raises
        ------
        ExplanationError
            This is not a K-FAC solver, or the eigenvalues do not fit it or are not finite.
        """
        if self.form != "kfac":
            raise ExplanationError(f"only K-FAC factors can be corrected, not {self.form}")
        values = np.asarray(eigenvalues, dtype=np.float64)
        expected = sum(block.eigenvalues.size for block in self._layers)
        if values.shape != (expected,) or not np.all(np.isfinite(values)):
            raise ExplanationError(
                f"EK-FAC needs {expected} finite eigenvalues, got shape {values.shape}"
            )
        blocks, at = [], 0
        for block in self._layers:
            size = block.eigenvalues.size
            fixed = np.maximum(values[at : at + size].reshape(block.eigenvalues.shape), 0.0)
            blocks.append(replace(block, eigenvalues=fixed))
            at += size
        return SecondOrder("ekfac", self.count, self.damping, _layers=blocks)

    @property
    def blocks(self) -> tuple[KroneckerBlock, ...]:
        return tuple(self._layers)

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``(H / N + lambda I)^{-1} rhs`` for ``rhs`` of shape ``(p,)`` or ``(p, k)``."""
        b = np.asarray(rhs, dtype=np.float64)
        vec = b.ndim == 1
        if vec:
            b = b[:, None]
        if self._eig is not None:
            values, vectors = self._eig
            out = vectors @ ((vectors.T @ b) / (values + self.damping)[:, None])
        else:
            out = np.empty_like(b)
            for block in self._layers:
                q_a, q_g, sw, sb = block.basis_a, block.basis_g, block.weight, block.bias
                n_out, n_in = q_g.shape[0], q_a.shape[0] - 1
                # Columns of rhs as the layer's (out, in + 1) weight-and-bias matrices.
                v = np.concatenate(
                    [b[sw].reshape(n_out, n_in, -1), b[sb].reshape(n_out, 1, -1)], axis=1
                )
                rotated = np.einsum("og,oik,ij->gjk", q_g, v, q_a, optimize=True)
                rotated /= (block.eigenvalues + self.damping)[:, :, None]
                back = np.einsum("og,gjk,ij->oik", q_g, rotated, q_a, optimize=True)
                out[sw] = back[:, :n_in].reshape(n_out * n_in, -1)
                out[sb] = back[:, n_in].reshape(n_out, -1)
        return out[:, 0] if vec else out


def _psd_eig(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return np.maximum(values, 0.0), vectors


def solve_many(second: SecondOrder, rows: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """``(k, p) -> (k, p)``: each row multiplied by the damped inverse."""
    return second.solve(np.asarray(rows, dtype=np.float64).T).T
