"""The gateway process: connect to the workers, watch their health, serve the public Gateway service."""

from __future__ import annotations

import asyncio

from disagg import telemetry
from disagg.config import GatewayConfig
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.rpc.interceptors import BearerTokenInterceptor
from disagg.rpc.server import Server
from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
from gateway.servicer import GatewayServicer
from gateway.worker_pool import WorkerPool


async def serve(config: GatewayConfig) -> None:
    ttl, weight = 2 * config.health_interval_seconds, config.load_kv_weight  # load readings (see worker_pool)
    prefill = WorkerPool("prefill", config.prefill, RelayPrefillStub, config.tls, load_ttl=ttl, kv_weight=weight)
    decode = WorkerPool("decode", config.decode, RelayDecodeStub, config.tls, load_ttl=ttl, kv_weight=weight)
    monitors = [asyncio.create_task(pool.monitor(config.health_interval_seconds)) for pool in (prefill, decode)]

    servicer = GatewayServicer(config, prefill, decode)
    interceptors = [BearerTokenInterceptor(config.auth_token)] if config.auth_token else []
    server = Server(config.host, config.port, interceptors, tls=config.tls)  # root spans come from its telemetry
    server.add_service(
        gateway_pb2.DESCRIPTOR.services_by_name["Gateway"],
        lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s),
    )
    await server.start()

    await server.serve_until_signal(config.grace_seconds)  # SIGTERM: NOT_SERVING, finish streams, stop
    for task in monitors:
        task.cancel()
    await prefill.close()
    await decode.close()


def main(config: GatewayConfig) -> None:
    telemetry.setup("gateway", config.host, config.metrics_port)
    asyncio.run(serve(config))
