"""The decode worker process: load the model, run the continuous-batching engine, serve DecodeService."""

from __future__ import annotations

import asyncio

from decode_worker.servicer import DecodeServicer
from disagg import telemetry
from disagg.config import WorkerConfig
from disagg.decode_engine import DecodeEngine
from disagg.wire import add_decode_service
from disagg.worker_load import KvBudget
from disagg.worker_process import serve_worker


def main(config: WorkerConfig) -> None:
    telemetry.setup("decode", config.host, config.metrics_port)
    asyncio.run(serve_worker(
        config, "DecodeService", add_decode_service,
        make_engine=lambda lm: DecodeEngine(lm, config.batch, kv_cache=config.kv_cache),
        make_servicer=lambda lm, engine: DecodeServicer(lm, engine, KvBudget(config.kv_budget_mb << 20))))
