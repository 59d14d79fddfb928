"""The life of a worker process, shared by prefill and decode: load, start the engine, serve, drain, stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from disagg import telemetry
from disagg.config import WorkerConfig
from disagg.engine_thread import EngineThread
from disagg.model import LoadedModel, load_model
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.runtime import configure_torch
from disagg.serving import Server
from disagg.worker_load import LoadServicer

log = logging.getLogger(__name__)


async def serve_worker(config: WorkerConfig, service: str, add_servicer: Callable,
                       make_engine: Callable[[LoadedModel], EngineThread],
                       make_servicer: Callable[[LoadedModel, EngineThread], object]) -> None:
    """Serve `service` (e.g. "PrefillService") plus WorkerLoadService until SIGTERM, then drain and stop."""
    configure_torch(config.model.threads)
    lm = load_model(config.model.model, load_format=config.model.load_format, dtype=config.model.dtype,
                    device=config.model.device, seed=config.model.seed)
    log.info("loaded %s (%s) in %.2fs", lm.name, config.model.dtype, lm.load_model_seconds)
    engine = make_engine(lm)
    engine.start()
    telemetry.watch_engine(engine)

    server = Server(config.host, config.port, tls=config.tls)
    servicer = make_servicer(lm, engine)
    server.add_service(worker_pb2.DESCRIPTOR.services_by_name[service].full_name,
                       lambda s: add_servicer(servicer, s))
    load = LoadServicer(servicer.load)
    server.add_service(worker_pb2.DESCRIPTOR.services_by_name["WorkerLoadService"].full_name,
                       lambda s: worker_pb2_grpc.add_WorkerLoadServiceServicer_to_server(load, s))
    await server.start()
    print(f"{service} listening on {server.address}", flush=True)
    await server.serve_until_signal(config.grace_seconds, on_stop=lambda: asyncio.to_thread(engine.stop))
