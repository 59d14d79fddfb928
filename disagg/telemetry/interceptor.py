"""The server interceptor of every process: a SERVER span per worker RPC, the gateway's root span and metrics.

One trace per request: the gateway's `text_completion <model>` span is the root; its worker calls carry
`traceparent`, and each worker's RPC span is its child, current while the handler runs. Every call of the
project's services is traced this way, whichever service it is (DecodeService, AggregatedService, ...), except the
few in UNTRACED that belong to no request: a service added later joins the request's trace without a change here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextvars import Token
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

from disagg.rpc.interceptors import OWN_SERVICES_PREFIX, Continuation, StreamBehavior, UnaryBehavior, wrap_handler
from disagg.telemetry.gateway import GENERATE_METHOD, observe_generate
from disagg.telemetry.propagation import REQUEST_ID_KEY, carrier
from disagg.telemetry.setup import state
from disagg.telemetry.spans import grpc_code, mark_error, tracer

# Calls made for no request: no span (it would be in no request's trace, a root of its own). WatchKvEvents is a
# subscription as long as its caller (hours), GetLoad the gateway's poll of each worker (every few seconds).
UNTRACED = frozenset({"/disagg.v1.PrefillService/WatchKvEvents", "/disagg.v1.WorkerLoadService/GetLoad"})


def traced_call(method: str) -> bool:
    """Whether a worker serves `method` (a full `/package.Service/Method` name) under a span in the caller's trace:
    every call of the project's services that is part of a request (the gateway's Generate is the root instead)."""
    return method.startswith(OWN_SERVICES_PREFIX) and method != GENERATE_METHOD and method not in UNTRACED


class ServerTelemetry(grpc.aio.ServerInterceptor):
    """Gateway/Generate: the root span and the client-side latency metrics. The calls `traced_call` names: a span
    joined to the caller's trace (only while tracing is on)."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method == GENERATE_METHOD:
            return wrap_handler(handler, wrap_stream=observe_generate)
        if not state.tracing or not traced_call(method):
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

        def wrap_unary(behavior: UnaryBehavior) -> UnaryBehavior:  # unary responses (PushKv)
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
