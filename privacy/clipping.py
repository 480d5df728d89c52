"""Per-record L2 clipping, the step that bounds each record's influence on a sum.

If every record's term is clipped to L2 norm at most ``bound``, adding or removing one
record changes the sum by at most ``bound`` in L2 norm, which is the sensitivity the
Gaussian mechanism is calibrated to (Abadi et al. 2016 clip per-example gradients the
same way).
"""

from __future__ import annotations

import math

import numpy as np

from fedlens.errors import ConfigurationError, ExplanationError

__all__ = ["clip_rows"]

# Rescaled rows are shrunk by this factor more, so that the norm computed afterwards is
# at most ``bound`` despite rounding in the norm itself.
_SHRINK = 1.0 - 2.0**-40
_MAX_PASSES = 4


def clip_rows(rows: np.ndarray, bound: float) -> np.ndarray:
    """Scale every row down to L2 norm at most ``bound``.

    Rows whose norm is already at most ``bound`` (zero rows included) are returned
    unchanged; longer rows keep their direction and get norm ``bound`` up to a relative
    ``1e-11``. The input is not modified.

    Parameters
    ----------
    rows
        ``(n, d)`` real array, one record's term per row.
    bound
        The L2 bound, finite and > 0.

    Returns
    -------
    numpy.ndarray
        ``(n, d)`` float64, every row's L2 norm ``<= bound`` as computed by
        :func:`numpy.linalg.norm`.

    Raises
    ------
    ConfigurationError
        ``bound`` is not finite and > 0.
    ExplanationError
        ``rows`` is not two-dimensional, or a row holds NaN or infinity (the message names
        the first such row).
    """
    if not math.isfinite(bound) or bound <= 0:
        raise ConfigurationError(f"clip bound must be finite and > 0, got {bound!r}")
    data = np.array(rows, dtype=np.float64, copy=True)
    if data.ndim != 2:
        raise ExplanationError(f"rows must have shape (n, d), got shape {data.shape}")
    finite = np.isfinite(data).all(axis=1)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise ExplanationError(f"row {index} holds NaN or infinity; it cannot be clipped")
    for _ in range(_MAX_PASSES):
        norms = _row_norms(data)
        over = norms > bound
        if not over.any():
            return data
        data[over] *= (bound / norms[over] * _SHRINK)[:, None]
    raise ExplanationError("clipping did not converge; rows are too ill-conditioned")


def _row_norms(data: np.ndarray) -> np.ndarray:
    """L2 norms of the rows of a finite ``(n, d)`` array.

    :func:`numpy.linalg.norm` where it is finite (so that the bound holds for the norm
    callers compute), and a rescaled computation for rows whose squares overflow.
    """
    with np.errstate(over="ignore"):
        norms = np.asarray(np.linalg.norm(data, axis=1), dtype=np.float64)
    overflow = ~np.isfinite(norms)
    if overflow.any():
        big = data[overflow]
        peak = np.abs(big).max(axis=1)
        norms[overflow] = np.linalg.norm(big / peak[:, None], axis=1) * peak
    return norms
