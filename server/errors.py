"""Applies the table of :mod:`fedlens.status_codes` to every call, in one interceptor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from fedlens import errors
from fedlens.status_codes import STATUS_CODES, status_code_for

__all__ = ["STATUS_CODES", "ErrorMappingInterceptor", "status_code_for"]

logger = logging.getLogger(__name__)


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
