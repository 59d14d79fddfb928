"""The prefill worker process: load the model, batch prompts into forward passes, serve PrefillService."""

from __future__ import annotations

import asyncio

from disagg import telemetry
from disagg.config import WorkerConfig
from disagg.kv_transport import PushClients, SharedMemorySegments
from disagg.prefill_engine import PrefillEngine
from disagg.wire import add_prefill_service
from disagg.worker_process import serve_worker
from prefill_worker.servicer import PrefillServicer


def main(config: WorkerConfig) -> None:
    telemetry.setup("prefill", config.host, config.metrics_port)
    segments = SharedMemorySegments()  # shared-memory handoffs to co-located decode workers
    segments.remove_orphans()
    try:
        asyncio.run(serve_worker(
            config, "PrefillService", add_prefill_service,
            make_engine=lambda lm: PrefillEngine(lm, config.batch, kv_cache=config.kv_cache),
            make_servicer=lambda lm, engine: PrefillServicer(
                lm, engine, config.kv_chunk_bytes, config.kv_wire_dtype, config.kv_layerwise,
                push_clients=PushClients(config.tls), segments=segments)))
    finally:
        segments.remove_all()  # segments no decode worker took
