"""Setting a process up for telemetry: tracing from the OTEL_* variables, its metrics, their HTTP endpoint, logs.

Each entry point calls `setup(component, host, metrics_port)` once. Tracing follows the standard OTEL_* variables:

- OTEL_SDK_DISABLED=true: tracing is off altogether (no interceptors, no spans), the benchmark's baseline.
- no OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_TRACES_EXPORTER=none): no SDK, no exporter; spans are the API's
  non-recording ones (near-zero cost), and an incoming trace context is still passed on to the workers.
- an endpoint: an SDK tracer provider named OTEL_SERVICE_NAME (default `disagg-<component>`), sampled per
  OTEL_TRACES_SAMPLER, batching per OTEL_BSP_*, exporting over OTLP/gRPC.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from opentelemetry import trace
from prometheus_client import CollectorRegistry, start_http_server

from disagg.telemetry import metrics

if TYPE_CHECKING:  # the SDK is imported only when spans are exported
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)


class TracingState:
    """What setup_tracing decided, read by the interceptors and the span helpers."""

    tracing = False  # interceptors and spans in use (everything but OTEL_SDK_DISABLED)
    exporting = False  # an SDK provider with an exporter is installed
    provider: TracerProvider | None = None


state = TracingState()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def setup_tracing(service_name: str) -> bool:
    """Configure tracing from OTEL_* variables; returns whether spans are exported. Call once per process."""
    if _env_true("OTEL_SDK_DISABLED"):
        state.tracing = state.exporting = False
        return False
    state.tracing = True
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter_name == "none" or (exporter_name == "otlp" and not endpoint):
        return False

    from opentelemetry.sdk.resources import PROCESS_PID, SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
        )
        if protocol != "grpc":
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; exporting over OTLP/gRPC", protocol)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, insecure, timeout... from OTEL_EXPORTER_OTLP_*
    # OTEL_SERVICE_NAME wins over the component's default name; OTEL_RESOURCE_ATTRIBUTES are merged in. The pid
    # tells apart the workers of one kind in a trace (a request resumed on a second decode worker).
    resource = Resource.create(
        {SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name, PROCESS_PID: os.getpid()}
    )
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* tune it
    trace.set_tracer_provider(provider)
    state.provider, state.exporting = provider, True
    log.info("tracing: exporting spans of %s to %s", resource.attributes.get(SERVICE_NAME), endpoint or exporter_name)
    return True


def shutdown_tracing() -> None:
    """Flush spans still buffered (the SDK also does this at exit)."""
    if state.provider is not None:
        state.provider.shutdown()


def start_metrics_server(host: str, port: int) -> int:
    """Serve the process's metrics at http://host:port/metrics; 0 = off. Returns the port (0 when off)."""
    if port <= 0:
        return 0
    server, _ = start_http_server(port, addr=host, registry=metrics.registry())
    return server.server_port


def setup(component: str, host: str = "127.0.0.1", metrics_port: int = 0) -> None:
    """Everything a process's entry point needs: tracing as `disagg-<component>`, its metrics, the HTTP endpoint."""
    setup_tracing(f"disagg-{component}")
    metrics.install(component)
    port = start_metrics_server(host, metrics_port)
    if port:
        print(f"{component} metrics on http://{host}:{port}/metrics", flush=True)


def registry() -> CollectorRegistry:
    return metrics.registry()


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=os.environ.get("DISAGG_LOG_LEVEL", level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
