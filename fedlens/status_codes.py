"""The one table between fedlens errors and gRPC status codes, used in both directions.

Servers map a raised :class:`~fedlens.errors.FedlensError` to its code (most specific
class first); clients turn a failed call back into the matching error class.
"""

from __future__ import annotations

import grpc

from fedlens import errors

__all__ = ["STATUS_CODES", "error_from_rpc", "status_code_for"]

STATUS_CODES: tuple[tuple[type[errors.FedlensError], grpc.StatusCode], ...] = (
    (errors.BudgetExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PrivacyError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DuplicateSubmissionError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.UnknownRoundError, grpc.StatusCode.NOT_FOUND),
    (errors.StaleRoundError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DropoutError, grpc.StatusCode.ABORTED),
    (errors.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.IntegrityError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigurationError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ExplanationError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.DatasetError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.StorageError, grpc.StatusCode.INTERNAL),
    (errors.FedlensError, grpc.StatusCode.INTERNAL),
)

# What a client raises for a code: the general class of each code's family.
_CLIENT_ERRORS: dict[grpc.StatusCode, type[errors.FedlensError]] = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.BudgetExceededError,
    grpc.StatusCode.ALREADY_EXISTS: errors.DuplicateSubmissionError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.StaleRoundError,
    grpc.StatusCode.ABORTED: errors.DropoutError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.IntegrityError,
}


def status_code_for(exc: errors.FedlensError) -> grpc.StatusCode:
    for cls, code in STATUS_CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL  # pragma: no cover - FedlensError is the last row


def error_from_rpc(exc: grpc.RpcError, address: str) -> errors.FedlensError:
    """The fedlens error for a failed call to ``address``, with the server's message."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or code.name
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return errors.ProtocolError(f"no answer from the fedlens server at {address}: {details}")
    return _CLIENT_ERRORS.get(code, errors.FedlensError)(details)
