"""Traces and metrics of every process: OpenTelemetry over OTLP, W3C trace context in gRPC metadata, Prometheus.

One module per concern: `setup` (OTEL_* variables, the metrics endpoint), `metrics` (one class per component),
`propagation` (what travels in metadata), `interceptor` (RPC spans, the gateway's root span), `spans` (spans from
engine-thread stamps), and the phase recorders `prefill`, `decode` and `gateway`. The names callers use are
re-exported here, so a call site reads `telemetry.record_decode(seq)`.
"""

from disagg.telemetry.decode import (
    call_context,
    observe_kv_push,
    observe_kv_transfer,
    record_aggregated,
    record_decode,
    record_kv_push,
)
from disagg.telemetry.gateway import (
    note_indexed_blocks,
    note_model,
    observe_generate,
    record_held_prefix,
    record_local_prefill,
    record_routing,
)
from disagg.telemetry.interceptor import server_interceptors
from disagg.telemetry.metrics import count_error, watch_admission, watch_engine, watch_prefix_cache
from disagg.telemetry.prefill import KvSerialize, record_prefill
from disagg.telemetry.propagation import REQUEST_ID_KEY, call_metadata, trace_metadata
from disagg.telemetry.setup import configure_logging, registry, setup, setup_tracing, shutdown_tracing, state

__all__ = [
    "REQUEST_ID_KEY",
    "KvSerialize",
    "call_context",
    "call_metadata",
    "configure_logging",
    "count_error",
    "note_indexed_blocks",
    "note_model",
    "observe_generate",
    "observe_kv_push",
    "observe_kv_transfer",
    "record_aggregated",
    "record_decode",
    "record_kv_push",
    "record_prefill",
    "record_held_prefix",
    "record_local_prefill",
    "record_routing",
    "registry",
    "server_interceptors",
    "setup",
    "setup_tracing",
    "shutdown_tracing",
    "state",
    "trace_metadata",
    "watch_admission",
    "watch_engine",
    "watch_prefix_cache",
]
