"""The prefill worker process: load the model, start the batching engine, serve PrefillService until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from disagg.config import WorkerConfig
from disagg.model import load_model
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.prefill_engine import PrefillEngine
from disagg.runtime import configure_torch
from disagg.serving import Server
from prefill_worker.servicer import PrefillServicer

log = logging.getLogger("prefill_worker")


async def serve(config: WorkerConfig) -> None:
    configure_torch(config.model.threads)
    lm = load_model(config.model.model, load_format=config.model.load_format, dtype=config.model.dtype,
                    device=config.model.device, seed=config.model.seed)
    log.info("loaded %s (%s) in %.2fs", lm.name, config.model.dtype, lm.load_model_seconds)
    engine = PrefillEngine(lm, config.batch, kv_cache=config.kv_cache)
    engine.start()

    server = Server(config.host, config.port)
    servicer = PrefillServicer(lm, engine, config.kv_chunk_bytes)
    server.add_service(worker_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name,
                       lambda s: worker_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, s))
    await server.start()
    print(f"prefill worker listening on {server.address}", flush=True)
    await server.serve_until_signal(config.grace_seconds, on_stop=lambda: asyncio.to_thread(engine.stop))


def main(config: WorkerConfig) -> None:
    asyncio.run(serve(config))
