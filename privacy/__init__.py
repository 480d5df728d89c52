"""Differential privacy and secure-aggregation primitives of fedlens, free of I/O.

Public names are re-exported here; the modules behind them are:

``randomness``   noise sources (CSPRNG for production, seeded for tests)
``clipping``     per-record L2 clipping
``gaussian``     Gaussian mechanism and DP-SGD calibration and accounting (dp_accounting)
``discrete``     discrete Gaussian mechanism accounting and calibration (RDP)
``distributed_noise`` discrete Gaussian noise shares under secure aggregation (KLS21)
``ledger``       a site's privacy ledger and budget check
``fixedpoint``   fixed-point encoding modulo ``2**bits`` with stochastic rounding
``masking``      pairwise additive masks of secure aggregation (X25519, HKDF, ChaCha20)
``shamir``       Shamir secret sharing over the field of ``2**521 - 1``
``secagg_graph`` the SecAgg+ neighbour graph, its degree and the share threshold
"""

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
from privacy.masking import (
    PUBLIC_KEY_BYTES,
    KeyPair,
    generate_keypair,
    mask_vector,
    pairwise_mask,
)
from privacy.randomness import NoiseSource, SecureRandom, SeededRandom
from privacy.secagg_graph import neighbourhoods, recommended_degree, share_threshold
from privacy.shamir import FIELD_PRIME, SHARE_BYTES, Share, combine_shares, split_secret

__all__ = [
    "EVENT_KINDS",
    "FIELD_PRIME",
    "MAX_BITS",
    "PLD_VALUE_DISCRETIZATION",
    "PUBLIC_KEY_BYTES",
    "SHARE_BYTES",
    "AccountantName",
    "EventKind",
    "FixedPointCodec",
    "KeyPair",
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
    "generate_keypair",
    "mask_vector",
    "neighbourhoods",
    "pairwise_mask",
    "recommended_degree",
    "sample_discrete_gaussian",
    "share_threshold",
    "split_secret",
    "wraparound_bits",
]
