"""The decode worker process: load the model, run the continuous-batching engine, serve DecodeService."""

from __future__ import annotations

import asyncio

from decode_worker.servicer import DecodeServicer
from disagg import telemetry
from disagg.config import WorkerConfig
from disagg.engine.decode import DecodeEngine
from disagg.kv.budget import KvBudget
from disagg.model.runtime import load_for_serving
from disagg.pb.disagg.v1 import worker_pb2
from disagg.rpc.server import Server
from disagg.rpc.services import add_decode_service


async def serve(config: WorkerConfig) -> None:
    lm = load_for_serving(config.model)
    budget = KvBudget(config.kv_budget_mb << 20)  # waiting, pushed and running sequences share it
    loop = asyncio.get_running_loop()
    engine = DecodeEngine(lm, config.batch, config.kv_cache, budget, notify=loop.call_soon_threadsafe)
    engine.start()
    telemetry.watch_engine(engine)

    servicer = DecodeServicer(lm, engine, budget)
    server = Server(config.host, config.port, tls=config.tls)
    server.add_service(
        worker_pb2.DESCRIPTOR.services_by_name["DecodeService"], lambda s: add_decode_service(servicer, s)
    )
    server.add_worker_load(servicer.load)
    await server.start()

    await server.serve_until_signal(config.grace_seconds)  # SIGTERM: NOT_SERVING, finish streams, stop
    await asyncio.to_thread(engine.stop)


def main(config: WorkerConfig) -> None:
    telemetry.setup("decode", config.host, config.metrics_port)
    asyncio.run(serve(config))
