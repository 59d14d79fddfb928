"""The decode worker process: load the model, run the continuous-batching engine, serve DecodeService; with
--aggregated, AggregatedService instead (prefill and decode in the one engine); with --local-prefill, both
(conditional disaggregation: the gateway sends prompts with few uncached tokens here, the rest to prefill
workers)."""

from __future__ import annotations

import asyncio
from typing import Any

from decode_worker.aggregated import AggregatedServicer
from decode_worker.servicer import DecodeServicer
from disagg import telemetry
from disagg.config import WorkerConfig
from disagg.engine.aggregated import AggregatedEngine
from disagg.engine.decode import DecodeEngine
from disagg.kv.budget import KvBudget
from disagg.kv.prefix_cache import PrefixCache
from disagg.model.runtime import load_for_serving
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.rpc.load import LoadReport
from disagg.rpc.services import add_decode_service
from disagg.server import Server


async def serve(config: WorkerConfig) -> None:
    lm = load_for_serving(config.model)
    budget = KvBudget(config.kv_budget_mb << 20)  # waiting, pushed and running sequences share it
    loop = asyncio.get_running_loop()
    server = Server(config.host, config.port, tls=config.tls)
    engine: DecodeEngine
    prefix_cache: PrefixCache | None = None
    reports: list[LoadReport] = []
    if config.aggregated or config.local_prefill:  # this engine prefills too, with a prefix cache of its own
        prefix_cache = PrefixCache(lm.fingerprint, config.prefix_cache_mb << 20, config.prefix_block_tokens)
        telemetry.watch_prefix_cache(prefix_cache)
        engine = aggregated = AggregatedEngine(
            lm,
            config.batch,
            config.kv_cache,
            budget,
            notify=loop.call_soon_threadsafe,
            prefix_cache=prefix_cache,
            greedy_screen=config.greedy_screen,
            model_runner=config.model_runner,
        )
        whole = AggregatedServicer(lm, aggregated, budget)
        server.add_service(
            worker_pb2.DESCRIPTOR.services_by_name["AggregatedService"],
            lambda s: worker_pb2_grpc.add_AggregatedServiceServicer_to_server(whole, s),
        )
        reports.append(whole.load)
    else:
        notify = loop.call_soon_threadsafe
        engine = DecodeEngine(
            lm, config.batch, config.kv_cache, budget, notify, config.greedy_screen, config.model_runner
        )
    if not config.aggregated:  # handed-over sequences join the same batch
        servicer = DecodeServicer(lm, engine, budget, prefix_cache)
        server.add_service(
            worker_pb2.DESCRIPTOR.services_by_name["DecodeService"], lambda s: add_decode_service(servicer, s)
        )
        reports.append(servicer.load)
    server.add_worker_load(lambda: combined_load(reports))
    engine.start()
    telemetry.watch_engine(engine)
    await server.start()

    await server.serve_until_signal(config.grace_seconds)  # SIGTERM: NOT_SERVING, finish streams, stop
    await asyncio.to_thread(engine.stop)


def combined_load(reports: list[LoadReport]) -> dict[str, Any]:
    """One engine's load as both services see it: their sequences add up; queue and KV are the engine's."""
    loads = [report() for report in reports]
    return {**loads[0], "active_sequences": sum(load["active_sequences"] for load in loads)}


def main(config: WorkerConfig) -> None:
    telemetry.setup("decode", config.host, config.metrics_port)
    asyncio.run(serve(config))
