"""The decode worker process: load the model, start the continuous-batching engine, serve DecodeService."""

from __future__ import annotations

import asyncio
import logging

from decode_worker.servicer import DecodeServicer
from disagg.config import WorkerConfig
from disagg.decode_engine import DecodeEngine
from disagg.model import load_model
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.runtime import configure_torch
from disagg.serving import Server

log = logging.getLogger("decode_worker")


async def serve(config: WorkerConfig) -> None:
    configure_torch(config.model.threads)
    lm = load_model(config.model.model, load_format=config.model.load_format, dtype=config.model.dtype,
                    device=config.model.device, seed=config.model.seed)
    log.info("loaded %s (%s) in %.2fs", lm.name, config.model.dtype, lm.load_model_seconds)
    engine = DecodeEngine(lm, config.batch, kv_cache=config.kv_cache)
    engine.start()

    server = Server(config.host, config.port)
    servicer = DecodeServicer(lm, engine)
    server.add_service(worker_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name,
                       lambda s: worker_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, s))
    await server.start()
    print(f"decode worker listening on {server.address}", flush=True)
    await server.serve_until_signal(config.grace_seconds, on_stop=lambda: asyncio.to_thread(engine.stop))


def main(config: WorkerConfig) -> None:
    asyncio.run(serve(config))
