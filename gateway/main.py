"""The gateway process: connect to the workers, watch their health, serve the public Gateway service."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from disagg import telemetry
from disagg.config import GatewayConfig
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2_grpc
from disagg.rpc.interceptors import BearerTokenInterceptor
from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
from disagg.server import Server
from gateway.servicer import GatewayServicer
from gateway.worker_pool import WorkerPool

if TYPE_CHECKING:
    from gateway.openai_api import HttpFront


async def start_http_front(
    config: GatewayConfig, servicer: GatewayServicer, prefill: WorkerPool, decode: WorkerPool
) -> HttpFront | None:
    """The OpenAI-compatible HTTP API (--http-port) on the same servicer, pools and event loop as gRPC (aggregated
    mode: the one pool, twice)."""
    if not config.http_port:
        return None
    from gateway.openai_api import HttpFront, OpenAiApi  # only a gateway that serves HTTP imports its stack

    front = HttpFront(OpenAiApi(config, servicer, prefill, decode), config)
    await front.start()
    return front


async def serve(config: GatewayConfig) -> None:
    ttl, weight = 2 * config.health_interval_seconds, config.load_kv_weight  # load readings (see worker_pool)
    pools: list[WorkerPool[Any]]
    if config.aggregated:  # one kind of worker, prefill and decode in one engine each
        aggregated = WorkerPool(
            "aggregated",
            config.aggregated,
            worker_pb2_grpc.AggregatedServiceStub,
            config.tls,
            load_ttl=ttl,
            kv_weight=weight,
        )
        pools = [aggregated]
        servicer = GatewayServicer(config, aggregated=aggregated)
    else:
        prefill = WorkerPool("prefill", config.prefill, RelayPrefillStub, config.tls, load_ttl=ttl, kv_weight=weight)
        decode = WorkerPool("decode", config.decode, RelayDecodeStub, config.tls, load_ttl=ttl, kv_weight=weight)
        pools = [prefill, decode]
        servicer = GatewayServicer(config, prefill, decode)
    monitors = [asyncio.create_task(pool.monitor(config.health_interval_seconds)) for pool in pools]
    router = servicer.prefix_router  # (disaggregated mode) its subscriptions to the workers' cache events
    if router is not None:
        monitors.append(asyncio.create_task(router.watch(config.health_interval_seconds)))

    interceptors = [BearerTokenInterceptor(config.auth_token)] if config.auth_token else []
    server = Server(config.host, config.port, interceptors, tls=config.tls)  # root spans come from its telemetry
    server.add_service(
        gateway_pb2.DESCRIPTOR.services_by_name["Gateway"],
        lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s),
    )
    http = await start_http_front(config, servicer, pools[0], pools[-1])  # None without --http-port
    await server.start()

    await server.serve_until_signal(config.grace_seconds)  # SIGTERM: NOT_SERVING, finish streams, stop
    if http is not None:
        await http.stop()
    for task in monitors:
        task.cancel()
    for routing in (router, servicer.decode_router):
        if routing is not None:
            await routing.close()
    for pool in pools:
        await pool.close()


def main(config: GatewayConfig) -> None:
    telemetry.setup("gateway", config.host, config.metrics_port)
    asyncio.run(serve(config))
