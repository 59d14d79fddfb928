"""Exec readiness/liveness/startup probe over mutual TLS: exit 0 iff the local server's grpc.health.v1 says SERVING.

Kubernetes' native `grpc:` probe speaks plaintext only, and with TLS on, every component serves TLS on its one
gRPC port; so this overlay probes with `python /etc/disagg/probe/tls_health.py PORT SERVER_NAME`, presenting the
pod's own certificate as the client certificate (the workers require one). SERVER_NAME is the name the pod's
certificate carries. Costs one Python start (~0.3 s of CPU) per probe: hence the longer probe periods.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

port, server_name = sys.argv[1], sys.argv[2]
folder = os.environ.get("DISAGG_TLS_DIR", "/etc/disagg/tls")


def read(name: str) -> bytes:
    with open(os.path.join(folder, name), "rb") as f:
        return f.read()


credentials = grpc.ssl_channel_credentials(read("ca.crt"), read("tls.key"), read("tls.crt"))
options = [("grpc.ssl_target_name_override", server_name)]
try:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4)
except grpc.RpcError as error:
    print(f"health check failed: {error.code().name}: {error.details()}", file=sys.stderr)
    sys.exit(2)
status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
print(status)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
