"""The one table from fedlens errors to gRPC status codes, applied by an interceptor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from fedlens import errors

__all__ = ["STATUS_CODES", "ErrorMappingInterceptor", "status_code_for"]

logger = logging.getLogger(__name__)

# Most specific class first: the first isinstance match wins.
STATUS_CODES: tuple[tuple[type[errors.FedlensError], grpc.StatusCode], ...] = (
    (errors.BudgetExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PrivacyError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DuplicateSubmissionError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.UnknownRoundError, grpc.StatusCode.NOT_FOUND),
    (errors.StaleRoundError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DropoutError, grpc.StatusCode.ABORTED),
    (errors.IntegrityError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigurationError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ExplanationError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.DatasetError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.StorageError, grpc.StatusCode.INTERNAL),
    (errors.FedlensError, grpc.StatusCode.INTERNAL),
)


def status_code_for(exc: errors.FedlensError) -> grpc.StatusCode:
    for cls, code in STATUS_CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL  # pragma: no cover - FedlensError is the last row


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Turns a :class:`FedlensError` raised by a handler into its gRPC status and message."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return inner(request, context)
            except errors.FedlensError as exc:
                code = status_code_for(exc)
                logger.info("%s refused with %s: %s", method, code.name, exc)
                context.abort(code, str(exc))

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
