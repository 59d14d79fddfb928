"""Server interceptors: domain errors to gRPC statuses, and the bearer token. Both wrap handlers with `wrap_handler`.

`wrap_handler` is the one place that knows how a grpc.aio handler is rebuilt around new behaviour with the same
(de)serializers, for the four RPC shapes; the tracing interceptor (disagg.telemetry.interceptor) uses it too.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from disagg.errors import DisaggError

log = logging.getLogger(__name__)

OWN_SERVICES_PREFIX = "/disagg.v1."
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap_stream: Callable[[StreamBehavior], StreamBehavior] | None = None,
    wrap_unary: Callable[[UnaryBehavior], UnaryBehavior] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced by `wrap_stream(behavior)` (response-streaming RPCs) or
    `wrap_unary(behavior)` (unary responses); a shape with no wrapper given is returned unchanged."""
    behavior: StreamBehavior | UnaryBehavior
    if handler.unary_stream or handler.stream_stream:
        if wrap_stream is None:
            return handler
        factory = (
            grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        )
        behavior = wrap_stream(handler.unary_stream or handler.stream_stream)
    else:
        if wrap_unary is None:
            return handler
        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        behavior = wrap_unary(handler.unary_unary or handler.stream_unary)
    return factory(
        behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a client sees for an exception: a domain error's own, INTERNAL for anything else (a bug)."""
    if isinstance(exc, DisaggError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain exceptions into their gRPC status; anything else is a bug: logged, then INTERNAL."""

    def __init__(self, count_error: Callable[[str, grpc.StatusCode], None] = lambda method, code: None):
        self._count_error = count_error

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(OWN_SERVICES_PREFIX):
            return handler

        async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            code, message = status_of(exc)
            self._count_error(method, code)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method, exc_info=exc)
            await context.abort(code, message)

        def wrap_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in behavior(request, context):
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    await abort(context, exc)

            return streaming

        def wrap_unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await abort(context, exc)

            return unary

        return wrap_handler(handler, wrap_stream, wrap_unary)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call carries `authorization: Bearer <token>` (health and reflection are open)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if not handler_call_details.method.startswith(OWN_SERVICES_PREFIX):
            return await continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            await refuse(request, context)
            yield  # pragma: no cover - makes this an async generator

        return wrap_handler(handler, lambda _: refuse_stream, lambda _: refuse)
