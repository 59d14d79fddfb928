"""The server interceptor of every process: a SERVER span per worker RPC, the gateway's root span and metrics.

One trace per request: the gateway's `text_completion <model>` span is the root; its worker calls carry
`traceparent`, and each worker's RPC span is its child, current while the handler runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextvars import Token
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

from disagg.rpc.interceptors import Continuation, StreamBehavior, UnaryBehavior, wrap_handler
from disagg.telemetry.gateway import GENERATE_METHOD, observe_generate
from disagg.telemetry.propagation import REQUEST_ID_KEY, carrier
from disagg.telemetry.setup import state
from disagg.telemetry.spans import grpc_code, mark_error, tracer

WORKER_METHODS = ("/disagg.v1.PrefillService/", "/disagg.v1.DecodeService/")
# A subscription that lasts as long as its caller, not a request: no span (it would be hours long and in no trace).
UNTRACED = frozenset({"/disagg.v1.PrefillService/WatchKvEvents"})


class ServerTelemetry(grpc.aio.ServerInterceptor):
    """Gateway/Generate: the root span and the client-side latency metrics. Worker RPCs: a span joined to the
    caller's trace (only while tracing is on)."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method == GENERATE_METHOD:
            return wrap_handler(handler, wrap_stream=observe_generate)
        if not state.tracing or not method.startswith(WORKER_METHODS) or method in UNTRACED:
            return handler
        metadata = carrier(handler_call_details.invocation_metadata)
        service, _, rpc = method[1:].rpartition("/")

        def start_span() -> tuple[Span, Token[otel_context.Context]]:
            span = tracer.start_span(
                method[1:],
                context=propagate.extract(metadata),
                kind=SpanKind.SERVER,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": rpc,
                    "disagg.request_id": metadata.get(REQUEST_ID_KEY, ""),
                },
            )
            return span, otel_context.attach(trace.set_span_in_context(span))

        def wrap_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def traced(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                span, token = start_span()
                closed = False
                try:
                    async for item in behavior(request, context):
                        yield item
                except GeneratorExit:  # the caller stopped reading (the gateway does, once it has the last token)
                    closed = True
                    span.set_attribute("disagg.closed_by_caller", True)
                    raise
                except BaseException as exc:
                    mark_error(span, exc, grpc_code(exc, context))
                    raise
                finally:
                    span.end()
                    if not closed:  # a closed generator is finalized from another task, whose context is not ours
                        otel_context.detach(token)

            return traced

        def wrap_unary(behavior: UnaryBehavior) -> UnaryBehavior:  # stream-unary: PushKv
            async def traced_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                span, token = start_span()
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    mark_error(span, exc, grpc_code(exc, context))
                    raise
                finally:
                    span.end()
                    otel_context.detach(token)

            return traced_unary

        return wrap_handler(handler, wrap_stream, wrap_unary)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """For every server: spans and request metrics (nothing when tracing is disabled and no metrics exist)."""
    return [ServerTelemetry()] if state.tracing or _has_metrics() else []


def _has_metrics() -> bool:
    from disagg.telemetry.metrics import GatewayMetrics, current

    return current(GatewayMetrics) is not None
