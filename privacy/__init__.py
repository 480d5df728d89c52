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

__all__ = [
    "EVENT_KINDS",
    "MAX_BITS",
    "PLD_VALUE_DISCRETIZATION",
    "PUBLIC_KEY_BYTES",
    "AccountantName",
    "EventKind",
    "FixedPointCodec",
    "KeyPair",
    "LedgerEvent",
    "NoiseSource",
    "PrivacyLedger",
    "SecureRandom",
    "SeededRandom",
    "ShareCalibration",
    "calibrate_shares",
    "clip_rows",
    "discrete_gaussian_noise_multiplier",
    "dpsgd_noise_multiplier",
    "encoded_sensitivity",
    "epsilon_of_discrete_gaussian",
    "epsilon_of_dpsgd",
    "epsilon_of_gaussian",
    "gaussian_noise_multiplier",
    "generate_keypair",
    "mask_vector",
    "pairwise_mask",
    "sample_discrete_gaussian",
    "wraparound_bits",
]
