"""What every gRPC server of the project shares: limits, interceptors, health, reflection, graceful shutdown.

It assembles the RPC plumbing (disagg.rpc) with the telemetry interceptors (disagg.telemetry), which themselves
wrap handlers with disagg.rpc's helpers: so it sits above both, and disagg.rpc never imports telemetry."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from disagg import telemetry
from disagg.config import TlsOptions
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.rpc.channel import MAX_MESSAGE_BYTES, read_file
from disagg.rpc.interceptors import ErrorInterceptor
from disagg.rpc.load import LoadReport, LoadServicer

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Accept the clients' 10 s keepalive pings, also between calls (else: GOAWAY too_many_pings).
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.lookahead_bytes", 16 << 20),  # as CHANNEL_OPTIONS: the decode side receives KV handoffs
]


def server_credentials(tls: TlsOptions) -> grpc.ServerCredentials | None:
    if not tls.tls_cert:
        return None
    if not tls.tls_key:
        raise ValueError("--tls-cert needs --tls-key")
    if tls.tls_require_client_cert and not tls.tls_ca:
        raise ValueError("--tls-require-client-cert needs --tls-ca")
    return grpc.ssl_server_credentials(
        [(read_file(tls.tls_key), read_file(tls.tls_cert))],
        root_certificates=read_file(tls.tls_ca),
        require_client_auth=tls.tls_require_client_cert,
    )


class Server:
    """A grpc.aio server with health, reflection and the error interceptor; stops gracefully on SIGTERM/SIGINT."""

    def __init__(
        self,
        host: str,
        port: int,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        tls: TlsOptions | None = None,
    ):
        self.grpc = grpc.aio.server(
            interceptors=[*telemetry.server_interceptors(), *interceptors, ErrorInterceptor(telemetry.count_error)],
            options=SERVER_OPTIONS,
        )
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self._service_names: list[str] = []
        credentials = server_credentials(tls) if tls else None
        self.port = (
            self.grpc.add_secure_port(f"{host}:{port}", credentials)
            if credentials
            else self.grpc.add_insecure_port(f"{host}:{port}")
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.address = f"{host}:{self.port}"
        self._stopping = asyncio.Event()
        self._on_shutdown: list[Callable[[], object]] = []

    def add_service(self, service: ServiceDescriptor, register: Callable[[grpc.aio.Server], None]) -> None:
        """Register a servicer (`register(grpc_server)`) and serve `service` in health and reflection."""
        register(self.grpc)
        self._service_names.append(service.full_name)

    def add_worker_load(self, report: LoadReport) -> None:
        """WorkerLoadService, answering GetLoad from `report()` (what the gateway reads to choose a worker)."""
        servicer = LoadServicer(report)
        self.add_service(
            worker_pb2.DESCRIPTOR.services_by_name["WorkerLoadService"],
            lambda s: worker_pb2_grpc.add_WorkerLoadServiceServicer_to_server(servicer, s),
        )

    async def _set_health(self, status: int) -> None:  # a health_pb2.HealthCheckResponse.ServingStatus
        for name in ["", *self._service_names]:
            result = self.health.set(name, status)
            if isinstance(result, Awaitable):
                await result

    async def start(self) -> None:
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.grpc,
        )
        await self.grpc.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s", self.address)
        name = self._service_names[0].rpartition(".")[2] if self._service_names else "server"
        print(f"{name} listening on {self.address}", flush=True)

    def stop_soon(self) -> None:
        self._stopping.set()

    def on_shutdown(self, callback: Callable[[], object]) -> None:
        """Call `callback` when shutdown begins (after NOT_SERVING, before the grace period): where streams that
        never end on their own (WatchKvEvents) end, so that they do not hold the grace period."""
        self._on_shutdown.append(callback)

    async def serve_until_signal(self, grace_seconds: float) -> None:
        """Serve until SIGTERM/SIGINT (or stop_soon): go NOT_SERVING, let in-flight calls finish, then stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()
        log.info("shutting down (grace %.1fs)", grace_seconds)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for callback in self._on_shutdown:
            callback()
        await self.grpc.stop(grace_seconds)
