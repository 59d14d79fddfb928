"""The decode worker process: load the model, run the continuous-batching engine, serve DecodeService (or, with
--aggregated, AggregatedService: prefill and decode in the one engine)."""

from __future__ import annotations

import asyncio

from decode_worker.aggregated import AggregatedServicer
from decode_worker.servicer import DecodeServicer
from disagg import telemetry
from disagg.config import WorkerConfig
from disagg.engine.aggregated import AggregatedEngine
from disagg.engine.decode import DecodeEngine
from disagg.kv.budget import KvBudget
from disagg.model.runtime import load_for_serving
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.rpc.server import Server
from disagg.rpc.services import add_decode_service


async def serve(config: WorkerConfig) -> None:
    lm = load_for_serving(config.model)
    budget = KvBudget(config.kv_budget_mb << 20)  # waiting, pushed and running sequences share it
    loop = asyncio.get_running_loop()
    server = Server(config.host, config.port, tls=config.tls)
    engine: DecodeEngine
    if config.aggregated:  # prefill and decode in one engine: AggregatedService instead of DecodeService
        engine = aggregated = AggregatedEngine(
            lm, config.batch, config.kv_cache, budget, notify=loop.call_soon_threadsafe
        )
        whole = AggregatedServicer(lm, aggregated, budget)
        server.add_service(
            worker_pb2.DESCRIPTOR.services_by_name["AggregatedService"],
            lambda s: worker_pb2_grpc.add_AggregatedServiceServicer_to_server(whole, s),
        )
        server.add_worker_load(whole.load)
    else:
        engine = DecodeEngine(lm, config.batch, config.kv_cache, budget, notify=loop.call_soon_threadsafe)
        servicer = DecodeServicer(lm, engine, budget)
        server.add_service(
            worker_pb2.DESCRIPTOR.services_by_name["DecodeService"], lambda s: add_decode_service(servicer, s)
        )
        server.add_worker_load(servicer.load)
    engine.start()
    telemetry.watch_engine(engine)
    await server.start()

    await server.serve_until_signal(config.grace_seconds)  # SIGTERM: NOT_SERVING, finish streams, stop
    await asyncio.to_thread(engine.stop)


def main(config: WorkerConfig) -> None:
    telemetry.setup("decode", config.host, config.metrics_port)
    asyncio.run(serve(config))
