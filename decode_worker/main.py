"""The decode worker process: load the model, run the continuous-batching engine, serve DecodeService; with
--aggregated, AggregatedService instead (prefill and decode in the one engine); with --local-prefill, both
(conditional disaggregation: the gateway sends prompts with few uncached tokens here, the rest to prefill
workers)."""

from __future__ import annotations

import asyncio

from decode_worker.aggregated import AggregatedServicer
from decode_worker.servicer import DecodeServicer
from disagg import telemetry
from disagg.config import WorkerConfig
from disagg.engine.aggregated import AggregatedEngine
from disagg.engine.decode import DecodeEngine, DecodeSetup
from disagg.kv.budget import KvBudget
from disagg.kv.prefix_cache import PrefixCache
from disagg.model.runtime import load_for_serving
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.rpc.services import add_decode_service
from disagg.server import Server


async def serve(config: WorkerConfig) -> None:
    lm = load_for_serving(config.model)
    budget = KvBudget(config.kv_budget_mb << 20)  # waiting, pushed and running sequences share it
    notify = asyncio.get_running_loop().call_soon_threadsafe
    setup = DecodeSetup(
        kv_cache=config.kv_cache,
        budget=budget,
        notify=notify,
        greedy_screen=config.greedy_screen,
        model_runner=config.model_runner,
    )
    server = Server(config.host, config.port, tls=config.tls)
    engine: DecodeEngine
    prefix_cache: PrefixCache | None = None
    services: list[DecodeServicer | AggregatedServicer] = []  # the calls of both count as the worker's sequences
    if config.aggregated or config.local_prefill:  # this engine prefills too, with a prefix cache of its own
        prefix_cache = PrefixCache(lm.fingerprint, config.prefix_cache_mb << 20, config.prefix_block_tokens)
        telemetry.watch_prefix_cache(prefix_cache)
        engine = aggregated = AggregatedEngine(lm, config.batch, setup, prefix_cache)
        whole = AggregatedServicer(lm, aggregated, budget)
        server.add_service(
            worker_pb2.DESCRIPTOR.services_by_name["AggregatedService"],
            lambda s: worker_pb2_grpc.add_AggregatedServiceServicer_to_server(whole, s),
        )
        services.append(whole)
    else:
        engine = DecodeEngine(lm, config.batch, setup)
    if not config.aggregated:  # handed-over sequences join the same batch
        servicer = DecodeServicer(lm, engine, budget, prefix_cache)
        server.add_service(
            worker_pb2.DESCRIPTOR.services_by_name["DecodeService"], lambda s: add_decode_service(servicer, s)
        )
        services.append(servicer)
    server.add_worker_load(lambda: decode_load(services, engine, budget))
    engine.start()
    telemetry.watch_engine(engine)
    await server.start()

    await server.serve_until_signal(config.grace_seconds)  # SIGTERM: NOT_SERVING, finish streams, stop
    await asyncio.to_thread(engine.stop)


def decode_load(
    services: list[DecodeServicer | AggregatedServicer], engine: DecodeEngine, budget: KvBudget
) -> dict[str, int]:
    """One engine's load as both services see it: their calls add up; queue and KV are the engine's (the budget
    holds what waiting and pushed sequences reserved and what the running batch holds)."""
    return dict(
        active_sequences=sum(service.active for service in services),
        queued=engine.queued,
        kv_bytes=budget.used,
        kv_budget_bytes=budget.limit,
    )


def main(config: WorkerConfig) -> None:
    telemetry.setup("decode", config.host, config.metrics_port)
    asyncio.run(serve(config))
