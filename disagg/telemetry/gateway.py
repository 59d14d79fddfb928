"""The gateway's root span (`text_completion <model>`, with the OpenTelemetry GenAI attributes) and the
client-side latency metrics (TTFT, TPOT, inter-token latency, end to end), observed on the response stream."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

from disagg.pb.disagg.v1 import gateway_pb2
from disagg.rpc.interceptors import StreamBehavior
from disagg.telemetry.metrics import GatewayMetrics, count_error, current, priority_label
from disagg.telemetry.propagation import carrier
from disagg.telemetry.setup import state as tracing
from disagg.telemetry.spans import grpc_code, mark_error, tracer

OPERATION = "text_completion"
GENERATE_METHOD = "/disagg.v1.Gateway/Generate"


@dataclass
class GatewayRequest:
    request: gateway_pb2.GenerateRequest
    span: Span | None = None
    started: float = field(default_factory=time.perf_counter)
    model: str = "unknown"
    request_id: str = ""
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = ""

    def observe(self, response: gateway_pb2.GenerateResponse) -> None:
        now = time.perf_counter()
        if response.request_id:
            self.request_id = response.request_id
        n = len(response.token_ids)
        if n:
            m = current(GatewayMetrics)
            if self.first_token_at is None:
                self.first_token_at = now
                if m is not None:
                    m.ttft.labels(self.model).observe(now - self.started)
                    m.ttft_by_priority.labels(priority_label(self.request.priority)).observe(now - self.started)
                if self.span is not None and self.span.is_recording():
                    self.span.add_event("gen_ai.first_token", {"gen_ai.server.time_to_first_token": now - self.started})
                n_gaps, gap = n - 1, 0.0
            else:
                assert self.last_token_at is not None  # set with first_token_at
                n_gaps, gap = n, (now - self.last_token_at) / n
            if m is not None:
                for _ in range(n_gaps):
                    m.itl.labels(self.model).observe(gap)
            self.last_token_at = now
            self.tokens += n
        if response.finish_reason:
            self.finish_reason = response.finish_reason
            self.prompt_tokens = response.usage.prompt_tokens

    def finish(self, error: BaseException | None, context: Any) -> None:
        duration = time.perf_counter() - self.started
        m, span = current(GatewayMetrics), self.span
        first, last = self.first_token_at, self.last_token_at
        if m is not None:
            m.e2e.labels(self.model).observe(duration)
            m.generation_tokens.labels(self.model).inc(self.tokens)
            if self.finish_reason:
                m.requests.labels(self.model, self.finish_reason).inc()
                m.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
                if self.tokens > 1 and first is not None and last is not None:  # (both set with the first token)
                    m.tpot.labels(self.model).observe((last - first) / (self.tokens - 1))
        if error is not None:
            code = grpc_code(error, context)
            if code == grpc.StatusCode.CANCELLED:  # the error interceptor never sees these
                count_error(GENERATE_METHOD, code)
            if span is not None:
                mark_error(span, error, code)
        if span is not None and span.is_recording():
            span.set_attributes(
                {
                    "gen_ai.response.id": self.request_id,
                    "gen_ai.usage.input_tokens": self.prompt_tokens,
                    "gen_ai.usage.output_tokens": self.tokens,
                }
            )
            if self.finish_reason:
                span.set_attribute("gen_ai.response.finish_reasons", [self.finish_reason])
        if span is not None:
            span.end()


_gateway_request: contextvars.ContextVar[GatewayRequest | None] = contextvars.ContextVar(
    "disagg_gateway_request", default=None
)


def _request_attributes(request: gateway_pb2.GenerateRequest) -> dict[str, Any]:
    return {
        "gen_ai.operation.name": OPERATION,
        "gen_ai.request.max_tokens": request.max_new_tokens,
        "gen_ai.request.temperature": request.temperature,
        "gen_ai.request.top_p": request.top_p if request.HasField("top_p") else 1.0,
        "gen_ai.request.top_k": request.top_k,
        "disagg.request.prompt_chars": len(request.prompt),
    }


def observe_generate(generate: StreamBehavior) -> StreamBehavior:
    """Wraps Gateway.Generate: the request's root span (`text_completion <model>`) and the client-side metrics."""

    async def traced_generate(
        request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        req = GatewayRequest(request, request_id=request.request_id)  # (or the one the gateway makes, later)
        token: contextvars.Token[otel_context.Context] | None = None
        if tracing.tracing:
            parent = propagate.extract(carrier(context.invocation_metadata()))
            req.span = tracer.start_span(
                OPERATION,
                context=parent,
                kind=SpanKind.SERVER,
                attributes=_request_attributes(request) if tracing.exporting else None,
            )
            token = otel_context.attach(trace.set_span_in_context(req.span, parent))
        _gateway_request.set(req)
        error: BaseException | None = None
        try:
            async for response in generate(request, context):
                req.observe(response)
                yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            req.finish(error, context)
            if token is not None and not isinstance(error, GeneratorExit):  # closed from another task otherwise
                otel_context.detach(token)

    return traced_generate


def note_model(model: str) -> None:
    """The gateway learned which model serves the request (from prefill's SequenceStart): name the root span."""
    req = _gateway_request.get()
    if req is None or not model or req.model == model:
        return
    req.model = model
    if req.span is not None and req.span.is_recording():
        req.span.update_name(f"{OPERATION} {model}")
        req.span.set_attributes({"gen_ai.request.model": model, "gen_ai.response.model": model})


def record_routing(source: str, share: float | None = None) -> None:
    """One choice of prefill worker: by the `exact` or `approximate` index (with the share of the prompt the
    chosen worker held by it) or by load alone (`none`)."""
    if (m := current(GatewayMetrics)) is not None:
        m.routing_decisions.labels(source).inc()
        if share is not None:
            m.routing_matched_share.labels(source).observe(share)


def record_local_prefill(outcome: str, uncached_tokens: int | None = None) -> None:
    """A prompt offered to a decode worker (conditional disaggregation): `local`, `declined` or `refused`; the
    request's span says which, with the uncached tokens the worker counted when it declined."""
    if (m := current(GatewayMetrics)) is not None:
        m.local_prefill.labels(outcome).inc()
    req = _gateway_request.get()
    if req is not None and req.span is not None and req.span.is_recording():
        req.span.set_attribute("disagg.local_prefill", outcome)
        if uncached_tokens is not None:
            req.span.set_attribute("disagg.local_prefill.uncached_tokens", uncached_tokens)


def record_held_prefix(outcome: str, tokens: int) -> None:
    """A handoff to the decode worker that holds the prompt's first `tokens` tokens: `suffix` (the rest only),
    `gone` or `refused` (handed over whole after all); on the request's span too."""
    if (m := current(GatewayMetrics)) is not None:
        m.held_prefix_handoffs.labels(outcome).inc()
    req = _gateway_request.get()
    if req is not None and req.span is not None and req.span.is_recording():
        req.span.set_attribute("disagg.held_prefix", outcome)
        req.span.set_attribute("disagg.held_prefix.tokens", tokens)


def note_indexed_blocks(worker: str, blocks: int | None, snapshot: bool = False) -> None:
    """The exact index's block count for `worker` (None: it no longer reports); `snapshot`: a new subscription."""
    if (m := current(GatewayMetrics)) is None:
        return
    if snapshot:
        m.kv_snapshots.labels(worker).inc()
    if blocks is None:
        with contextlib.suppress(KeyError):
            m.indexed_blocks.remove(worker)
    else:
        m.indexed_blocks.labels(worker).set(blocks)
