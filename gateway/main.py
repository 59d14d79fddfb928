"""The gateway process: connect to the workers, watch their health, serve the public Gateway service."""

from __future__ import annotations

import asyncio

from disagg import telemetry
from disagg.config import GatewayConfig
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.serving import BearerTokenInterceptor, Server
from gateway.servicer import GatewayServicer, RelayDecodeStub, RelayPrefillStub
from gateway.worker_pool import WorkerPool


async def serve(config: GatewayConfig) -> None:
    prefill = WorkerPool("prefill", config.prefill, RelayPrefillStub, config.tls)
    decode = WorkerPool("decode", config.decode, RelayDecodeStub, config.tls)
    monitors = [asyncio.create_task(pool.monitor(config.health_interval_seconds)) for pool in (prefill, decode)]

    interceptors = [BearerTokenInterceptor(config.auth_token)] if config.auth_token else []
    server = Server(config.host, config.port, interceptors, tls=config.tls)
    servicer = GatewayServicer(config, prefill, decode)
    servicer.Generate = telemetry.instrument_generate(servicer.Generate)  # root span and latency metrics
    server.add_service(gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,
                       lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s))
    await server.start()
    print(f"gateway listening on {server.address}", flush=True)

    async def stop_monitoring_and_close() -> None:
        for task in monitors:
            task.cancel()
        await prefill.close()
        await decode.close()

    await server.serve_until_signal(config.grace_seconds, on_stop=stop_monitoring_and_close)


def main(config: GatewayConfig) -> None:
    telemetry.setup("gateway", config.host, config.metrics_port)
    asyncio.run(serve(config))
