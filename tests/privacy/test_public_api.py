"""The public surface of ``privacy`` and its import discipline."""

from __future__ import annotations

import ast
from pathlib import Path

import privacy

EXPECTED = {
    "EVENT_KINDS",
    "discrete_gaussian_noise_multiplier",
    "epsilon_of_discrete_gaussian",
    "MAX_BITS",
    "PLD_VALUE_DISCRETIZATION",
    "AccountantName",
    "EventKind",
    "FixedPointCodec",
    "LedgerEvent",
    "NoiseSource",
    "PrivacyLedger",
    "SecureRandom",
    "SeededRandom",
    "clip_rows",
    "dpsgd_noise_multiplier",
    "epsilon_of_dpsgd",
    "epsilon_of_gaussian",
    "gaussian_noise_multiplier",
    "ShareCalibration",
    "calibrate_shares",
    "encoded_sensitivity",
    "sample_discrete_gaussian",
    "wraparound_bits",
    "FIELD_PRIME",
    "SHARE_BYTES",
    "Share",
    "combine_shares",
    "neighbourhoods",
    "recommended_degree",
    "share_threshold",
    "split_secret",
}

ALLOWED_ROOTS = {
    "__future__",
    "numpy",
    "scipy",
    "cryptography",
    "dp_accounting",
    "fedlens",
    "privacy",
    "collections",
    "contextlib",
    "copy",
    "dataclasses",
    "datetime",
    "enum",
    "functools",
    "hashlib",
    "hmac",
    "math",
    "numbers",
    "os",
    "secrets",
    "struct",
    "typing",
}


def test_public_names_are_pinned_and_importable() -> None:
    assert set(privacy.__all__) == EXPECTED
    for name in privacy.__all__:
        assert getattr(privacy, name) is not None


def test_privacy_imports_only_the_pure_layer() -> None:
    root = Path(privacy.__file__).parent
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] in ALLOWED_ROOTS, f"{path.name} imports {module}"
