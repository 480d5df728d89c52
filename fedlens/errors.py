"""The one exception tree of fedlens.

::

    FedlensError
    ├── ConfigurationError        a setting or argument is invalid
    ├── PrivacyError
    │   └── BudgetExceededError   the work would take a site past its (ε, δ) budget
    ├── ProtocolError
    │   ├── IntegrityError        a message is malformed: wrong length, out of field, NaN, bad key
    │   ├── DuplicateSubmissionError  a site sent the same phase twice
    │   ├── UnknownRoundError     no such round
    │   ├── StaleRoundError       the round is closed or in another phase
    │   ├── AuthenticationError   the caller's identity is unknown or does not match
    │   └── DropoutError          too few sites remain to finish the round
    ├── AccessError
    │   ├── PermissionDeniedError  the caller's role does not allow the call
    │   └── RateLimitedError      the caller sent more calls than its rate allows
    ├── ExplanationError          an explanation cannot be computed for this input
    ├── DatasetError              a dataset or partition request is invalid
    └── StorageError
        └── NotFoundError         a stored object does not exist

The transports map each class to one gRPC status code in a single table
(``server/errors.py``); library code raises these and never a bare ``Exception``.
"""

from __future__ import annotations

__all__ = [
    "AccessError",
    "AuthenticationError",
    "BudgetExceededError",
    "ConfigurationError",
    "DatasetError",
    "DropoutError",
    "DuplicateSubmissionError",
    "ExplanationError",
    "FedlensError",
    "IntegrityError",
    "NotFoundError",
    "PermissionDeniedError",
    "PrivacyError",
    "ProtocolError",
    "RateLimitedError",
    "StaleRoundError",
    "StorageError",
    "UnknownRoundError",
]


class FedlensError(Exception):
    """Base class of every error fedlens raises on purpose."""


class ConfigurationError(FedlensError):
    """A setting or argument is invalid; the message names it and the accepted range."""


class PrivacyError(FedlensError):
    """A privacy rule refuses the request."""


class BudgetExceededError(PrivacyError):
    """The requested work would take a site past its privacy budget; nothing was spent."""


class ProtocolError(FedlensError):
    """A secure-aggregation message or round transition is not acceptable."""


class IntegrityError(ProtocolError):
    """A message is malformed (wrong length, value outside the field, NaN, bad key)."""


class DuplicateSubmissionError(ProtocolError):
    """A site sent a message for a phase it has already completed."""


class UnknownRoundError(ProtocolError):
    """The round id names no round."""


class StaleRoundError(ProtocolError):
    """The round is closed, aborted, or in a phase that does not accept this message."""


class AuthenticationError(ProtocolError):
    """The caller is not enrolled, or its signature or key does not match its enrolment."""


class DropoutError(ProtocolError):
    """Too few sites remain for the round to finish; nothing is revealed."""


class AccessError(FedlensError):
    """An authenticated caller may not make this call now."""


class PermissionDeniedError(AccessError):
    """The caller's role does not allow the call."""


class RateLimitedError(AccessError):
    """The caller sent more calls than its rate limit allows; it may retry later."""


class ExplanationError(FedlensError):
    """An explanation cannot be computed for the given model, data or specification."""


class DatasetError(FedlensError):
    """A dataset, partition or preprocessing request is invalid."""


class StorageError(FedlensError):
    """The store failed or holds inconsistent data."""


class NotFoundError(StorageError):
    """A stored object (release, round, site) does not exist."""
