"""The gateway process: connect to the workers, serve the public Gateway service until SIGTERM."""

from __future__ import annotations

import asyncio

from disagg.config import GatewayConfig
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2_grpc
from disagg.serving import Server
from gateway.servicer import GatewayServicer
from gateway.worker_pool import WorkerPool


async def serve(config: GatewayConfig) -> None:
    prefill = WorkerPool.connect("prefill", config.prefill, worker_pb2_grpc.PrefillServiceStub)
    decode = WorkerPool.connect("decode", config.decode, worker_pb2_grpc.DecodeServiceStub)
    server = Server(config.host, config.port)
    servicer = GatewayServicer(config, prefill, decode)
    server.add_service(gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,
                       lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s))
    await server.start()
    print(f"gateway listening on {server.address}", flush=True)

    async def close_channels() -> None:
        await prefill.close()
        await decode.close()

    await server.serve_until_signal(config.grace_seconds, on_stop=close_channels)


def main(config: GatewayConfig) -> None:
    asyncio.run(serve(config))
