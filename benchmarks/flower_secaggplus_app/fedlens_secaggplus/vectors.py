"""The fixed vector each site contributes; the benchmark recomputes them to check the sum."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["WEIGHT", "site_vector"]

# Every site reports one example, so Flower's weighted mean is the plain mean and
# ``max_weight`` can be 1 (the finest quantisation of the weight Flower allows).
WEIGHT = 1


def site_vector(seed: int, site: int, dim: int) -> npt.NDArray[np.float32]:
    """Site ``site``'s vector: shape ``(dim,)``, float32, uniform in [-1, 1).

    Well inside SecAgg+'s default clipping range of ±8, so nothing is clipped.
    """
    rng = np.random.default_rng([seed, site])
    return rng.uniform(-1.0, 1.0, size=dim).astype(np.float32)
