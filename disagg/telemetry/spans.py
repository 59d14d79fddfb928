"""Span helpers: the project's tracer, spans made afterwards from engine-thread stamps, and error marking.

The engines run in threads, so they only record `time.monotonic()` stamps; the spans are made afterwards, on the
request's side, with explicit start and end times, so that the phases (queue wait, prefill forward, KV transfer,
decode queue wait, KV load, decode) follow each other on one time line and add up to the gateway's span.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

tracer = trace.get_tracer("disagg")


def recording(parent: otel_context.Context | None = None) -> bool:
    """Whether spans made under `parent` (default: the current context) are recorded."""
    return trace.get_current_span(parent).is_recording()


class Clock:
    """Converts time.monotonic() stamps to the epoch nanoseconds spans use, at one instant."""

    def __init__(self) -> None:
        self.mono, self.wall = time.monotonic(), time.time_ns()

    def ns(self, mono: float) -> int:
        return self.wall - int((self.mono - mono) * 1e9)


def span_between(
    clock: Clock,
    name: str,
    start: float,
    end: float,
    attributes: dict[str, Any] | None = None,
    events: Iterable[tuple[str, float, dict[str, Any]]] = (),
    parent: otel_context.Context | None = None,
) -> None:
    """A finished span from monotonic stamps `start` to `end` (with events at their stamps)."""
    span = tracer.start_span(name, context=parent, start_time=clock.ns(start), attributes=attributes)
    for event, at, event_attributes in events:
        span.add_event(event, event_attributes, timestamp=clock.ns(at))
    span.end(end_time=clock.ns(max(start, end)))


def mb_per_s(size: int, seconds: float) -> float:
    return size / 1e6 / seconds if seconds > 0 else 0.0


def grpc_code(exc: BaseException, context: Any) -> grpc.StatusCode:
    """The status an exception ends a call with (its own code, CANCELLED for cancellation, else the context's)."""
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    try:
        from_context = context.code()
    except Exception:  # not every context implementation knows it
        from_context = None
    return from_context if isinstance(from_context, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def mark_error(span: Span, exc: BaseException, code: grpc.StatusCode) -> None:
    if span.is_recording():
        span.set_attribute("error.type", code.name)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {exc}"[:500]))
