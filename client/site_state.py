"""What a site keeps in its state directory for its own later use (never sent).

- ``site.json``: its run and node configuration, to load its records again;
- ``global_model.pt``: the latest global model it received;
- ``influence.npz`` and ``influence.json``: the latest released second-order factors it
  received, with the fingerprint of the model they belong to.

Each file is written to a temporary name and renamed, so a crash leaves the old one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FACTORS_FILE",
    "FACTORS_META",
    "MODEL_FILE",
    "SITE_FILE",
    "remember_factors",
    "remember_model",
    "remember_site",
]

SITE_FILE = "site.json"
MODEL_FILE = "global_model.pt"
FACTORS_FILE = "influence.npz"
FACTORS_META = "influence.json"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def remember_site(state_dir: Path, run: Mapping[str, object], node: Mapping[str, object]) -> None:
    """Keep the run and node configuration, so the site's records can be loaded again."""
    payload = json.dumps({"run": dict(run), "node": dict(node)}, indent=2, default=str).encode()
    path = state_dir / SITE_FILE
    if not path.exists() or path.read_bytes() != payload:  # a site is built per message
        _write_atomic(path, payload)


def remember_model(state_dir: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Keep the latest global model the site received."""
    path = state_dir / MODEL_FILE
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().clone() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def remember_factors(
    state_dir: Path, params: Mapping[str, str], arrays: Mapping[str, np.ndarray]
) -> None:
    """Keep released second-order factors that came with a request, if any did."""
    if "second_order" not in arrays or "second_order_fingerprint" not in params:
        return
    tmp = state_dir / (FACTORS_FILE + ".tmp.npz")
    np.savez(tmp, second_order=np.asarray(arrays["second_order"], dtype=np.float64))
    os.replace(tmp, state_dir / FACTORS_FILE)
    meta = {
        k: params[k]
        for k in ("method", "second_order_fingerprint", "second_order_count", "damping")
        if k in params
    }
    _write_atomic(state_dir / FACTORS_META, json.dumps(meta).encode())
