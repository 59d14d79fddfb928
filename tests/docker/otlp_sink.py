"""An OTLP/gRPC trace receiver for the compose stack test, in place of Jaeger (no image registry is reachable).

Runs in a container of the project's own image (grpcio and opentelemetry-proto are installed there) and prints
one line per received span, `span <service.name> <span name>`, which the test reads from `docker logs`.
"""

from __future__ import annotations

import signal
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    print(f"span {service} {span.name}", flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    server.add_insecure_port("0.0.0.0:4317")
    server.start()
    print("otlp sink listening on 0.0.0.0:4317", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (server.stop(1), sys.exit(0)))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
