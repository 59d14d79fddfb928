"""Context that travels with a request between processes: the W3C trace context and the request id, as gRPC
metadata."""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import propagate

from disagg.telemetry.setup import state

REQUEST_ID_KEY = "x-request-id"  # minted by the gateway, sent on both hops, on every span as disagg.request_id
Metadata = tuple[tuple[str, str], ...]


def carrier(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """gRPC invocation metadata as a propagation carrier (text values only)."""
    return {key: value for key, value in (metadata or ()) if isinstance(value, str)}


def trace_metadata() -> Metadata:
    """The current trace context (traceparent, tracestate) as gRPC metadata, for an outgoing call's `metadata=`.

    Added where the call is made rather than by a channel interceptor: grpc.aio's intercepted stream-stream calls
    behave differently (a write after the call ended raises asyncio.InvalidStateError, not AioRpcError).
    """
    if not state.tracing:
        return ()
    out: dict[str, str] = {}
    propagate.inject(out)
    return tuple(out.items())


def call_metadata(request_id: str) -> Metadata:
    """Metadata of a worker call made for `request_id`: its id and the current trace context."""
    return ((REQUEST_ID_KEY, request_id), *trace_metadata())
