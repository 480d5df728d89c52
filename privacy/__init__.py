"""Differential privacy and secure-aggregation primitives of fedlens, free of I/O.

Public names are re-exported here; the modules behind them are:

``randomness``   noise sources (CSPRNG for production, seeded for tests)
``clipping``     per-record L2 clipping
``gaussian``     Gaussian mechanism and DP-SGD calibration and accounting (dp_accounting)
``discrete``     discrete Gaussian mechanism accounting and calibration (RDP)
``distributed_noise`` discrete Gaussian noise shares under secure aggregation (KLS21)
``ledger``       a site's privacy ledger and budget check
``fixedpoint``   fixed-point encoding modulo ``2**bits`` with stochastic rounding
``shamir``       Shamir secret sharing over the field of ``2**521 - 1``
``secagg_graph`` the SecAgg+ neighbour graph, its degree and the share threshold

Importing ``privacy`` loads none of these modules: each public name is imported from its
module on first access (PEP 562). So importing one submodule, such as ``secagg_site`` for
the thin secure-aggregation client, loads only what that module needs, and not
dp_accounting and scipy, which ``gaussian``, ``discrete``, ``distributed_noise`` and
``ledger`` pull in.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from privacy.clipping import clip_rows
    from privacy.discrete import (
        discrete_gaussian_noise_multiplier,
        epsilon_of_discrete_gaussian,
    )
    from privacy.distributed_noise import (
        ShareCalibration,
        calibrate_shares,
        encoded_sensitivity,
        sample_discrete_gaussian,
        wraparound_bits,
    )
    from privacy.fixedpoint import MAX_BITS, FixedPointCodec
    from privacy.gaussian import (
        PLD_VALUE_DISCRETIZATION,
        AccountantName,
        dpsgd_noise_multiplier,
        epsilon_of_dpsgd,
        epsilon_of_gaussian,
        gaussian_noise_multiplier,
    )
    from privacy.ledger import EVENT_KINDS, EventKind, LedgerEvent, PrivacyLedger
    from privacy.randomness import NoiseSource, SecureRandom, SeededRandom
    from privacy.secagg_graph import neighbourhoods, recommended_degree, share_threshold
    from privacy.shamir import FIELD_PRIME, SHARE_BYTES, Share, combine_shares, split_secret

# Where each public name lives: looked up by ``__getattr__`` on first access.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "clipping": ("clip_rows",),
    "discrete": ("discrete_gaussian_noise_multiplier", "epsilon_of_discrete_gaussian"),
    "distributed_noise": (
        "ShareCalibration",
        "calibrate_shares",
        "encoded_sensitivity",
        "sample_discrete_gaussian",
        "wraparound_bits",
    ),
    "fixedpoint": ("MAX_BITS", "FixedPointCodec"),
    "gaussian": (
        "PLD_VALUE_DISCRETIZATION",
        "AccountantName",
        "dpsgd_noise_multiplier",
        "epsilon_of_dpsgd",
        "epsilon_of_gaussian",
        "gaussian_noise_multiplier",
    ),
    "ledger": ("EVENT_KINDS", "EventKind", "LedgerEvent", "PrivacyLedger"),
    "randomness": ("NoiseSource", "SecureRandom", "SeededRandom"),
    "secagg_graph": ("neighbourhoods", "recommended_degree", "share_threshold"),
    "shamir": ("FIELD_PRIME", "SHARE_BYTES", "Share", "combine_shares", "split_secret"),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "EVENT_KINDS",
    "FIELD_PRIME",
    "MAX_BITS",
    "PLD_VALUE_DISCRETIZATION",
    "SHARE_BYTES",
    "AccountantName",
    "EventKind",
    "FixedPointCodec",
    "LedgerEvent",
    "NoiseSource",
    "PrivacyLedger",
    "SecureRandom",
    "SeededRandom",
    "Share",
    "ShareCalibration",
    "calibrate_shares",
    "clip_rows",
    "combine_shares",
    "discrete_gaussian_noise_multiplier",
    "dpsgd_noise_multiplier",
    "encoded_sensitivity",
    "epsilon_of_discrete_gaussian",
    "epsilon_of_dpsgd",
    "epsilon_of_gaussian",
    "gaussian_noise_multiplier",
    "neighbourhoods",
    "recommended_degree",
    "sample_discrete_gaussian",
    "share_threshold",
    "split_secret",
    "wraparound_bits",
]


if not TYPE_CHECKING:  # the type checker reads the imports above instead

    def __getattr__(name: str) -> object:
        module = _SOURCE.get(name)
        if module is None:
            raise AttributeError(f"module 'privacy' has no attribute {name!r}")
        value = getattr(__import__(f"privacy.{module}", fromlist=[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
