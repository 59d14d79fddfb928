"""Traces and metrics of every process: OpenTelemetry over OTLP, W3C trace context in gRPC metadata, Prometheus.

Each entry point calls `setup(component, host, metrics_port)` once. Tracing follows the standard OTEL_* variables:

- OTEL_SDK_DISABLED=true: tracing is off altogether (no interceptors, no spans), the benchmark's baseline.
- no OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_TRACES_EXPORTER=none): no SDK, no exporter; spans are the API's
  non-recording ones (near-zero cost), and an incoming trace context is still passed on to the workers.
- an endpoint: an SDK tracer provider named OTEL_SERVICE_NAME (default `disagg-<component>`), sampled per
  OTEL_TRACES_SAMPLER, batching per OTEL_BSP_*, exporting over OTLP/gRPC.

One trace per request: the gateway's `text_completion <model>` span is the root; its worker calls carry
`traceparent`, and each worker's RPC span is its child. The engines run in threads, so they only record
`time.monotonic()` stamps; the spans are made afterwards, on the request's side, with explicit start and end times,
so that the phases (queue wait, prefill forward, KV transfer, decode queue wait, KV load, decode) follow each other
on one time line and add up to the gateway's span.

Metrics live in one registry per process, served over HTTP on --metrics-port (0 = off).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from disagg.config import KV_TRANSPORTS
from disagg.wire import event_of

log = logging.getLogger(__name__)

OPERATION = "text_completion"
TRACED_METHODS = ("/disagg.v1.PrefillService/", "/disagg.v1.DecodeService/")
# Latency buckets (seconds) from 5 ms to 5 min: token gaps on a CPU are tens of ms, whole requests up to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTES_BUCKETS = tuple(float(1 << n) for n in range(14, 32, 2))  # 16 KiB .. 2 GiB

_tracer = trace.get_tracer("disagg")


class _State:
    tracing = False  # interceptors and spans in use (everything but OTEL_SDK_DISABLED)
    exporting = False  # an SDK provider with an exporter is installed
    provider = None
    registry = CollectorRegistry()


_state = _State()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------------------------
# Setup


def setup_tracing(service_name: str) -> bool:
    """Configure tracing from OTEL_* variables; returns whether spans are exported. Call once per process."""
    if _env_true("OTEL_SDK_DISABLED"):
        _state.tracing = _state.exporting = False
        return False
    _state.tracing = True
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter_name == "none" or (exporter_name == "otlp" and not endpoint):
        return False

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        if protocol != "grpc":
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; exporting over OTLP/gRPC", protocol)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, insecure, timeout... from OTEL_EXPORTER_OTLP_*
    # OTEL_SERVICE_NAME wins over the component's default name; OTEL_RESOURCE_ATTRIBUTES are merged in.
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* tune it
    trace.set_tracer_provider(provider)
    _state.provider, _state.exporting = provider, True
    log.info("tracing: exporting spans of %s to %s", resource.attributes.get(SERVICE_NAME), endpoint or exporter_name)
    return True


def shutdown_tracing() -> None:
    """Flush spans still buffered (the SDK also does this at exit)."""
    if _state.provider is not None:
        _state.provider.shutdown()


def start_metrics_server(host: str, port: int) -> int:
    """Serve the process's metrics at http://host:port/metrics; 0 = off. Returns the port (0 when off)."""
    if port <= 0:
        return 0
    server, _ = start_http_server(port, addr=host, registry=_state.registry)
    return server.server_port


def setup(component: str, host: str = "127.0.0.1", metrics_port: int = 0) -> None:
    """Everything a process's entry point needs: tracing as `disagg-<component>`, its metrics, the HTTP endpoint."""
    setup_tracing(f"disagg-{component}")
    _metrics_for(component)
    port = start_metrics_server(host, metrics_port)
    if port:
        print(f"{component} metrics on http://{host}:{port}/metrics", flush=True)


def registry() -> CollectorRegistry:
    return _state.registry


# ---------------------------------------------------------------------------------------------------------------
# Metrics (gen_ai.server.* names where the OpenTelemetry GenAI conventions have one)


class _Metrics:
    def __init__(self, component: str, reg: CollectorRegistry):
        self.errors = Counter("disagg_request_errors", "Failed RPCs by method and gRPC status code",
                              ["method", "code"], registry=reg)
        if component == "gateway":
            self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds",
                                  "Time from request to the first token sent to the client", ["model"],
                                  buckets=LATENCY_BUCKETS, registry=reg)
            self.tpot = Histogram("gen_ai_server_time_per_output_token_seconds",
                                  "Per request: time between first and last token over the tokens after the first",
                                  ["model"], buckets=LATENCY_BUCKETS, registry=reg)
            self.itl = Histogram("disagg_inter_token_latency_seconds",
                                 "Gap between consecutive tokens sent to the client", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=reg)
            self.e2e = Histogram("gen_ai_server_request_duration_seconds",
                                 "End-to-end request duration at the gateway", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=reg)
            self.requests = Counter("disagg_requests", "Finished requests by finish reason",
                                    ["model", "finish_reason"], registry=reg)
            self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens of finished requests", ["model"],
                                         registry=reg)
            self.generation_tokens = Counter("disagg_generation_tokens", "Tokens sent to clients", ["model"],
                                             registry=reg)
        if component in ("prefill", "decode"):
            self.queue_wait = Histogram("disagg_queue_wait_seconds",
                                        "Time a request waited in the worker's queue before its first forward pass",
                                        buckets=LATENCY_BUCKETS, registry=reg)
            self.queue_length = Gauge("disagg_queue_length", "Requests waiting in the worker's queue",
                                      registry=reg)
            self.kv_bytes = Counter("disagg_kv_transferred_bytes",
                                    "KV cache bytes handed over (sent by prefill, received by decode)", registry=reg)
            self.kv_seconds = Histogram("disagg_kv_transfer_seconds",
                                        "Time to stream one request's KV cache (serialize+send on prefill, "
                                        "first to last byte received on decode)", buckets=LATENCY_BUCKETS,
                                        registry=reg)
            self.kv_request_bytes = Histogram("disagg_kv_request_bytes", "KV cache bytes of one request",
                                              buckets=BYTES_BUCKETS, registry=reg)
            self.batch_size = Histogram("disagg_batch_size",
                                        "Sequences in the forward passes requests took part in (per request-step)",
                                        buckets=BATCH_BUCKETS, registry=reg)
        if component == "prefill":
            self.forward = Histogram("disagg_prefill_forward_seconds", "Prefill forward pass of a request's batch",
                                     buckets=LATENCY_BUCKETS, registry=reg)
            self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens prefilled", registry=reg)
        if component == "decode":
            self.running = Gauge("disagg_running_batch_size", "Sequences in the running decode batch", registry=reg)
            self.kv_load = Histogram("disagg_kv_load_seconds", "Copying a received KV cache into the decode batch",
                                     buckets=LATENCY_BUCKETS, registry=reg)
            self.tpot = Histogram("disagg_decode_time_per_output_token_seconds",
                                  "Per request: decode time over tokens decoded (decode worker's view)",
                                  buckets=LATENCY_BUCKETS, registry=reg)
            self.generation_tokens = Counter("disagg_generation_tokens", "Tokens decoded", registry=reg)


_metrics: _Metrics | None = None


def _metrics_for(component: str) -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics(component, _state.registry)
    return _metrics


def watch_engine(engine) -> None:
    """Gauges read at scrape time: queue length, and the running batch size of a decode engine."""
    if _metrics is None or not hasattr(_metrics, "queue_length"):
        return
    _metrics.queue_length.set_function(lambda: len(engine.waiting))
    if hasattr(_metrics, "running") and hasattr(engine, "running"):
        _metrics.running.set_function(lambda: len(engine.running))


def count_error(method: str, code: grpc.StatusCode) -> None:
    """One failed RPC (called by the error interceptor, and for client cancellations)."""
    if _metrics is not None:
        _metrics.errors.labels(method, code.name).inc()


# ---------------------------------------------------------------------------------------------------------------
# Context propagation: W3C traceparent in gRPC metadata


def _carrier(metadata) -> dict[str, str]:
    return {key: value for key, value in (metadata or ()) if isinstance(value, str)}


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context (traceparent, tracestate) as gRPC metadata, for an outgoing call's `metadata=`.

    Added where the call is made rather than by a channel interceptor: grpc.aio's intercepted stream-stream calls
    behave differently (a write after the call ended raises asyncio.InvalidStateError, not AioRpcError).
    """
    if not _state.tracing:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def _grpc_code(exc: BaseException, context) -> grpc.StatusCode:
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


def _mark_error(span, exc: BaseException, code: grpc.StatusCode) -> None:
    if span.is_recording():
        span.set_attribute("error.type", code.name)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {exc}"[:500]))


class _ServerTracing(grpc.aio.ServerInterceptor):
    """A SERVER span per worker RPC, child of the caller's trace context; current while the handler runs."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(TRACED_METHODS):
            return handler
        streaming = handler.unary_stream or handler.stream_stream
        behavior = streaming or handler.stream_unary
        if behavior is None:
            return handler
        carrier = _carrier(handler_call_details.invocation_metadata)
        service, _, rpc = method[1:].rpartition("/")

        def start_span():
            span = _tracer.start_span(method[1:], context=propagate.extract(carrier), kind=SpanKind.SERVER,
                                      attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc,
                                                  "disagg.request_id": carrier.get("x-request-id", "")})
            return span, otel_context.attach(trace.set_span_in_context(span))

        async def traced(request, context):
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
                _mark_error(span, exc, _grpc_code(exc, context))
                raise
            finally:
                span.end()
                if not closed:  # a closed generator is finalized from another task, whose context is not ours
                    otel_context.detach(token)

        async def traced_unary(request_iterator, context):  # stream-unary: PushKv
            span, token = start_span()
            try:
                return await behavior(request_iterator, context)
            except BaseException as exc:
                _mark_error(span, exc, _grpc_code(exc, context))
                raise
            finally:
                span.end()
                otel_context.detach(token)

        factory = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                   else grpc.stream_stream_rpc_method_handler if handler.stream_stream
                   else grpc.stream_unary_rpc_method_handler)
        return factory(traced if streaming else traced_unary, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


def server_interceptors() -> list:
    """For worker servers: RPC spans joined to the caller's trace (nothing when tracing is disabled)."""
    return [_ServerTracing()] if _state.tracing else []


# ---------------------------------------------------------------------------------------------------------------
# Spans from engine-thread time stamps


def _recording() -> bool:
    return trace.get_current_span().is_recording()


class _Clock:
    """Converts time.monotonic() stamps to the epoch nanoseconds spans use, at one instant."""

    def __init__(self):
        self.mono, self.wall = time.monotonic(), time.time_ns()

    def ns(self, mono: float) -> int:
        return self.wall - int((self.mono - mono) * 1e9)


def _span(clock: _Clock, name: str, start: float, end: float, attributes: dict | None = None,
          events: Iterable[tuple[str, float, dict]] = (), parent=None) -> None:
    span = _tracer.start_span(name, context=parent, start_time=clock.ns(start), attributes=attributes)
    for event, at, event_attributes in events:
        span.add_event(event, event_attributes, timestamp=clock.ns(at))
    span.end(end_time=clock.ns(max(start, end)))


def record_prefill(job, result) -> None:
    """After a prefill forward pass: the queue-wait and forward spans, and their metrics.

    `job` is a PrefillJob (enqueued_at), `result` its PrefillResult (forward_started, forward_seconds, batch_size).
    """
    started = result.forward_started
    if _metrics is not None and hasattr(_metrics, "forward"):
        _metrics.queue_wait.observe(max(0.0, started - job.enqueued_at))
        _metrics.forward.observe(result.forward_seconds)
        _metrics.batch_size.observe(result.batch_size)
        _metrics.prompt_tokens.inc(len(job.input_ids))
    if not _recording():
        return
    clock = _Clock()
    ended = started + result.forward_seconds
    _span(clock, "prefill.queue_wait", job.enqueued_at, started)
    _span(clock, "prefill.forward", started, ended,
          {"disagg.prefill.tokens": len(job.input_ids), "disagg.batch.size": result.batch_size,
           "disagg.prefill.forward_seconds": result.forward_seconds},
          events=[("first_token", ended, {"gen_ai.token.id": result.first_token,
                                          "disagg.finish_reason": result.finish_reason or ""})])


class KvSerialize:
    """The prefill side of one handoff: what each layer's encoding cost, then the `kv.serialize` span and metrics.

    The cache may stream while the forward pass still runs (layer-wise), so the span runs from the first layer's
    encoding to the last message handed over; `disagg.kv.encode_seconds` is the part spent encoding.
    """

    def __init__(self, transport: str):
        self.transport, self.parent = transport, otel_context.get_current()
        self.begin: float | None = None
        self.encode_seconds, self.bytes, self.chunks, self.ended = 0.0, 0, 0, False

    @contextlib.contextmanager
    def encoding(self):
        if self.begin is None:
            self.begin = time.monotonic()
        started = time.perf_counter()
        try:
            yield self
        finally:
            self.encode_seconds += time.perf_counter() - started

    def add(self, size: int, chunks: int) -> None:
        self.bytes, self.chunks = self.bytes + size, self.chunks + chunks

    def end(self) -> None:
        """Once every byte is handed over (the transport's `finish`)."""
        if self.ended or self.begin is None:
            return
        self.ended, end = True, time.monotonic()
        if _metrics is not None and hasattr(_metrics, "kv_bytes"):
            _metrics.kv_bytes.inc(self.bytes)
            _metrics.kv_seconds.observe(end - self.begin)
            _metrics.kv_request_bytes.observe(self.bytes)
        if trace.get_current_span(self.parent).is_recording():
            _span(_Clock(), "kv.serialize", self.begin, end,
                  {"disagg.kv.bytes": self.bytes, "disagg.kv.chunks": self.chunks,
                   "disagg.kv.encode_seconds": self.encode_seconds, "disagg.kv.transport": self.transport,
                   "disagg.kv.mb_per_s": _mb_per_s(self.bytes, end - self.begin)}, parent=self.parent)


def _mb_per_s(size: int, seconds: float) -> float:
    return size / 1e6 / seconds if seconds > 0 else 0.0


@dataclass
class KvTransfer:
    """What the decode side saw of a handoff stream: when payload started and ended, how much KV came."""

    parent: object  # the call's trace context (record_decode may run in another task, at the stream's close)
    started: float | None = None  # SequenceStart (or a push's header) arrived
    first: float | None = None  # first FirstToken or KV message (prefill's forward pass is done by then)
    last: float | None = None  # last message read
    bytes: int = 0
    chunks: int = 0
    transport: str = "relayed"


# Handoffs in progress on this decode worker, by request id, until record_decode takes them. The servicer's
# generator may be finalized in another task (the gateway closes the stream after the last token), where context
# variables of the call are gone: hence a dict, and the call's trace context kept in the KvTransfer.
_transfers: dict[str, KvTransfer] = {}
MAX_PENDING_TRANSFERS = 4096
TRANSPORTS = dict(enumerate(KV_TRANSPORTS, start=1))  # worker.proto's KvTransport values; 0 = unset = relayed


class _ObservedHandoff:
    """An async iterator over handoff messages (a Decode or PushKv stream) that notes them in a KvTransfer."""

    def __init__(self, messages, transfer: KvTransfer):
        self._messages, self.transfer = messages.__aiter__(), transfer

    def __aiter__(self):
        return self

    async def __anext__(self):
        message = await self._messages.__anext__()
        now, transfer = time.monotonic(), self.transfer
        kind = event_of(message)
        if kind in ("start", "header"):
            transfer.started = now
            if kind == "start":
                transfer.transport = TRANSPORTS.get(message.start.kv_layout.transport, "relayed")
                if len(_transfers) >= MAX_PENDING_TRANSFERS:  # handoffs refused before decoding are never taken
                    _transfers.pop(next(iter(_transfers)))
                _transfers[message.start.request_id] = transfer
        else:
            if transfer.first is None:
                transfer.first = now
            if kind == "kv_chunk":
                transfer.bytes += len(message.data)
                transfer.chunks += 1
            elif kind == "shared_memory":
                transfer.bytes += message.shared_memory.size
                transfer.chunks += 1
        transfer.last = now
        return message


def observe_kv_transfer(messages) -> AsyncIterator:
    """Wraps a Decode call's request stream; `record_decode` later turns what it saw into the `kv.transfer` span."""
    return _ObservedHandoff(messages, KvTransfer(parent=otel_context.get_current()))


def observe_kv_push(messages) -> _ObservedHandoff:
    """Wraps a PushKv stream (direct transport); `record_kv_push` records its `kv.transfer` span at its end."""
    return _ObservedHandoff(messages, KvTransfer(parent=otel_context.get_current(), transport="direct"))


def record_kv_push(observed: _ObservedHandoff) -> None:
    _record_transfer(observed.transfer, _Clock())


def _record_transfer(transfer: KvTransfer, clock: _Clock) -> None:
    """The `kv.transfer` span and metrics: first to last KV message received on this worker."""
    if transfer.first is None:
        return
    seconds = transfer.last - transfer.first
    if _metrics is not None and hasattr(_metrics, "kv_load"):
        _metrics.kv_bytes.inc(transfer.bytes)
        _metrics.kv_seconds.observe(seconds)
        _metrics.kv_request_bytes.observe(transfer.bytes)
    if trace.get_current_span(transfer.parent).is_recording():
        _span(clock, "kv.transfer", transfer.first, transfer.last,
              {"disagg.kv.bytes": transfer.bytes, "disagg.kv.chunks": transfer.chunks,
               "disagg.kv.transport": transfer.transport, "disagg.kv.transfer_seconds": seconds,
               "disagg.kv.mb_per_s": _mb_per_s(transfer.bytes, seconds)}, parent=transfer.parent)


def record_decode(seq, finish_reason: str | None = None) -> None:
    """When a decode request ends: spans kv.transfer, decode.queue_wait, kv.load, decode; and their metrics.

    Once per request: a second call finds nothing left to record.

    `seq` is the DecodeSequence (enqueued_at, admitted_at, kv_loaded_at, last_token_at, batch_sizes, output).
    """
    now = time.monotonic()
    transfer = _transfers.pop(seq.request_id, None)
    if transfer is None:  # recorded already (or its handoff was not observed)
        return
    parent = transfer.parent
    admitted, loaded = getattr(seq, "admitted_at", 0.0), getattr(seq, "kv_loaded_at", 0.0)
    steps = list(getattr(seq, "batch_sizes", ()))
    finish_reason = finish_reason or getattr(seq.output, "finish_reason", None) or ""
    end = getattr(seq, "last_token_at", 0.0) or now  # the last token sampled (or the request's end, if none)
    decode_seconds = end - loaded if loaded else 0.0
    tpot = decode_seconds / len(steps) if steps else 0.0
    m = _metrics if _metrics is not None and hasattr(_metrics, "kv_load") else None
    clock = _Clock()
    if transfer.transport != "direct":  # a direct push records its own transfer
        _record_transfer(transfer, clock)
    if m is not None:
        if admitted:
            m.queue_wait.observe(max(0.0, admitted - seq.enqueued_at))
            m.kv_load.observe(max(0.0, loaded - admitted))
        for size in steps:
            m.batch_size.observe(size)
        if steps:
            m.tpot.observe(tpot)
            m.generation_tokens.inc(len(steps))
    if not trace.get_current_span(parent).is_recording():
        return
    if not admitted:  # cancelled or failed before it joined the batch
        _span(clock, "decode.queue_wait", seq.enqueued_at, now, {"disagg.admitted": False}, parent=parent)
        return
    _span(clock, "decode.queue_wait", seq.enqueued_at, admitted, parent=parent)
    _span(clock, "kv.load", admitted, loaded, {"disagg.kv.tokens": len(seq.context)}, parent=parent)
    attributes = {"disagg.decode.steps": len(steps), "disagg.decode.tokens": len(steps),
                  "disagg.decode.time_per_output_token_seconds": tpot, "disagg.finish_reason": finish_reason}
    if steps:
        attributes.update({"disagg.decode.batch_size.min": min(steps), "disagg.decode.batch_size.max": max(steps),
                           "disagg.decode.batch_size.mean": sum(steps) / len(steps),
                           "disagg.decode.batch_sizes_seen": sorted(set(steps))})
    _span(clock, "decode", loaded, end, attributes, parent=parent)


# ---------------------------------------------------------------------------------------------------------------
# The gateway's root span and client-side latency metrics


@dataclass
class _GatewayRequest:
    request: object
    span: object = None
    started: float = field(default_factory=time.perf_counter)
    model: str = "unknown"
    request_id: str = ""
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = ""

    def observe(self, response) -> None:
        now = time.perf_counter()
        if response.request_id:
            self.request_id = response.request_id
        n = len(response.token_ids)
        if n:
            m = _metrics
            if self.first_token_at is None:
                self.first_token_at = now
                if m is not None:
                    m.ttft.labels(self.model).observe(now - self.started)
                if self.span is not None and self.span.is_recording():
                    self.span.add_event("gen_ai.first_token", {"gen_ai.server.time_to_first_token":
                                                               now - self.started})
                n_gaps, gap = n - 1, 0.0
            else:
                n_gaps, gap = n, (now - self.last_token_at) / n
            if m is not None:
                for _ in range(n_gaps):
                    m.itl.labels(self.model).observe(gap)
            self.last_token_at = now
            self.tokens += n
        if response.finish_reason:
            self.finish_reason = response.finish_reason
            self.prompt_tokens = response.usage.prompt_tokens

    def finish(self, error: BaseException | None, context) -> None:
        duration = time.perf_counter() - self.started
        m, span = _metrics, self.span
        if m is not None:
            m.e2e.labels(self.model).observe(duration)
            m.generation_tokens.labels(self.model).inc(self.tokens)
            if self.finish_reason:
                m.requests.labels(self.model, self.finish_reason).inc()
                m.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
                if self.tokens > 1:
                    m.tpot.labels(self.model).observe((self.last_token_at - self.first_token_at) / (self.tokens - 1))
        if error is not None:
            code = _grpc_code(error, context)
            if code == grpc.StatusCode.CANCELLED:  # the error interceptor never sees these
                count_error("/disagg.v1.Gateway/Generate", code)
            if span is not None:
                _mark_error(span, error, code)
        if span is not None and span.is_recording():
            span.set_attributes({"gen_ai.response.id": self.request_id, "gen_ai.usage.input_tokens":
                                 self.prompt_tokens, "gen_ai.usage.output_tokens": self.tokens})
            if self.finish_reason:
                span.set_attribute("gen_ai.response.finish_reasons", [self.finish_reason])
        if span is not None:
            span.end()


_gateway_request: contextvars.ContextVar[_GatewayRequest | None] = contextvars.ContextVar(
    "disagg_gateway_request", default=None)


def _request_attributes(request) -> dict:
    return {"gen_ai.operation.name": OPERATION,
            "gen_ai.request.max_tokens": request.max_new_tokens,
            "gen_ai.request.temperature": request.temperature,
            "gen_ai.request.top_p": request.top_p if request.HasField("top_p") else 1.0,
            "gen_ai.request.top_k": request.top_k,
            "disagg.request.prompt_chars": len(request.prompt)}


def instrument_generate(generate: Callable) -> Callable:
    """Wraps Gateway.Generate: the request's root span (`text_completion <model>`) and the client-side metrics."""

    async def traced_generate(request, context):
        state = _GatewayRequest(request, request_id=request.request_id)  # (or the one the gateway makes, later)
        token = None
        if _state.tracing:
            parent = propagate.extract(_carrier(context.invocation_metadata()))
            state.span = _tracer.start_span(OPERATION, context=parent, kind=SpanKind.SERVER,
                                            attributes=_request_attributes(request) if _state.exporting else None)
            token = otel_context.attach(trace.set_span_in_context(state.span, parent))
        _gateway_request.set(state)
        error = None
        try:
            async for response in generate(request, context):
                state.observe(response)
                yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            state.finish(error, context)
            if token is not None and not isinstance(error, GeneratorExit):  # closed from another task otherwise
                otel_context.detach(token)

    return traced_generate


def note_model(model: str) -> None:
    """The gateway learned which model serves the request (from prefill's SequenceStart): name the root span."""
    state = _gateway_request.get()
    if state is None or not model or state.model == model:
        return
    state.model = model
    if state.span is not None and state.span.is_recording():
        state.span.update_name(f"{OPERATION} {model}")
        state.span.set_attributes({"gen_ai.request.model": model, "gen_ai.response.model": model})
