"""The prefill worker process: load the model, batch prompts into forward passes, serve PrefillService."""

from __future__ import annotations

import asyncio

from disagg import telemetry
from disagg.config import WorkerConfig
from disagg.engine.prefill import PrefillEngine
from disagg.handoff.senders import PushClients
from disagg.handoff.shared_memory import SharedMemorySegments
from disagg.kv.prefix_cache import PrefixCache
from disagg.model.runtime import load_for_serving
from disagg.pb.disagg.v1 import worker_pb2
from disagg.rpc.services import add_prefill_service
from disagg.server import Server
from prefill_worker.servicer import PrefillServicer


async def serve(config: WorkerConfig, segments: SharedMemorySegments) -> None:
    lm = load_for_serving(config.model)
    prefix_cache = PrefixCache(lm.fingerprint, config.prefix_cache_mb << 20, config.prefix_block_tokens)
    engine = PrefillEngine(lm, config.batch, config.kv_cache, prefix_cache, config.greedy_screen, config.model_runner)
    engine.start()
    telemetry.watch_engine(engine)
    telemetry.watch_prefix_cache(prefix_cache)

    servicer = PrefillServicer(
        lm,
        engine,
        config.kv_chunk_bytes,
        config.kv_wire_dtype,
        config.kv_layerwise,
        push_clients=PushClients(config.tls),
        segments=segments,
        prefix_cache=prefix_cache,
    )
    server = Server(config.host, config.port, tls=config.tls)
    server.on_shutdown(servicer.end_watches)
    server.add_service(
        worker_pb2.DESCRIPTOR.services_by_name["PrefillService"], lambda s: add_prefill_service(servicer, s)
    )
    server.add_worker_load(servicer.load)
    await server.start()

    await server.serve_until_signal(config.grace_seconds)  # SIGTERM: NOT_SERVING, finish streams, stop
    await asyncio.to_thread(engine.stop)


def main(config: WorkerConfig) -> None:
    telemetry.setup("prefill", config.host, config.metrics_port)
    segments = SharedMemorySegments()  # shared-memory handoffs to co-located decode workers
    segments.remove_orphans()  # left by a prefill worker that was killed
    try:
        asyncio.run(serve(config, segments))
    finally:
        segments.remove_all()  # segments no decode worker took
