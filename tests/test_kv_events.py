"""Cache events (PrefillService/WatchKvEvents) and the gateway's exact index: the prefix cache's observers, the
worker's stream over loopback gRPC (snapshot, stores, evictions, a watcher that falls behind), the router's use of
it (exact preferred, approximate for workers that do not report, a restart drops what was known), and through a
cluster of two prefill workers: routing by another gateway's work, and a prefill worker killed and started again."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch

from disagg.errors import Overloaded
from disagg.kv.events import CacheWatch, WatcherOverflow
from disagg.kv.prefix_cache import PrefixCache, block_keys
from disagg.model.loading import gpt2_tokenizer, load_tokenizer
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from disagg.rpc.services import RelayPrefillStub, add_prefill_service
from disagg.server import Server
from disagg.tools.client import Completion, channel, complete
from disagg.tools.cluster import free_port, spawn, stop, wait_healthy
from gateway.prefix_routing import PrefixRouter, RoutingOptions
from gateway.worker_pool import LoadReading, WorkerPool
from prefill_worker.servicer import PrefillServicer
from tests.conftest import GPT2_ARGS, start_cluster
from tests.test_metrics import scrape
from tests.test_prefix_cache import BLOCK_BYTES, fake_kv

FINGERPRINT = "0123456789abcdef01234567"
TOKENS = list(range(1000, 1100))


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 120.0) -> None:
    """Wait for `condition` (a state reached, not a duration measured); fail after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reached = condition()
        if not isinstance(reached, bool):
            reached = await reached
        if reached:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached in {timeout:.0f} s: {what}")
        await asyncio.sleep(0.1)


# --- the cache's observers and one watcher's batches ------------------------------------------------------------


def test_observers_hear_stores_evictions_and_clears():
    cache = PrefixCache(FINGERPRINT, 3 * BLOCK_BYTES)
    cache.insert(TOKENS[:16], fake_kv(16))
    heard: list[tuple[list[bytes], list[bytes]]] = []
    snapshot = cache.watch(lambda stored, removed: heard.append((stored, removed)))
    keys = block_keys(TOKENS, FINGERPRINT)
    assert snapshot == keys[:1]
    cache.insert(TOKENS[:48], fake_kv(48))  # blocks 1 and 2 (block 0 is there)
    assert heard == [(keys[1:3], [])]
    other = block_keys([7] * 16, FINGERPRINT)
    cache.insert([7] * 16, fake_kv(16))  # full: the least recently used block goes (the chain's tail)
    assert heard[-1] == (other, [keys[2]])
    cache.insert(TOKENS[:16], fake_kv(16))  # cached already: no change, no call
    assert len(heard) == 2
    cache.clear()
    assert heard[-1][0] == [] and sorted(heard[-1][1]) == sorted([keys[0], keys[1], other[0]])


async def test_watch_coalesces_what_arrives_while_it_is_busy():
    cache = PrefixCache(FINGERPRINT, 100 * BLOCK_BYTES)
    watch = CacheWatch(cache)
    assert watch.snapshot == []

    def engine_thread() -> None:  # as the prefill engine does, from its own thread
        cache.insert(TOKENS[:48], fake_kv(48))
        cache.insert([9] * 16, fake_kv(16))
        cache.clear()
        cache.insert([9] * 16, fake_kv(16))

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    stored, removed = await watch.next_batch()  # one batch: each key's latest change
    assert stored == block_keys([9] * 16, FINGERPRINT)
    assert sorted(removed) == sorted(block_keys(TOKENS[:48], FINGERPRINT))
    watch.close()
    assert await watch.next_batch() is None
    cache.insert([3] * 16, fake_kv(16))  # (no longer heard)


async def test_a_watcher_that_falls_behind_is_dropped_not_buffered():
    cache = PrefixCache(FINGERPRINT, 1000 * BLOCK_BYTES)
    watch = CacheWatch(cache, max_pending=4)
    for i in range(10):  # nobody reads: the backlog passes 4 keys
        cache.insert([i] * 32, fake_kv(32))
    assert watch.overflowed and not watch._pending  # what it held is freed at once
    with pytest.raises(WatcherOverflow) as raised:
        await watch.next_batch()
    assert isinstance(raised.value, Overloaded)  # RESOURCE_EXHAUSTED on the wire
    watch.close()


# --- the worker's stream over loopback gRPC --------------------------------------------------------------------


async def serve_cache(cache: PrefixCache, port: int = 0, model: str = "distilgpt2") -> tuple[Server, PrefillServicer]:
    """PrefillService around `cache` (no model, no engine: WatchKvEvents needs neither) on 127.0.0.1."""
    lm: Any = SimpleNamespace(name=model, dtype=torch.float32, fingerprint=cache.fingerprint)
    engine: Any = SimpleNamespace(waiting=[], kv_cache=True)
    servicer = PrefillServicer(lm, engine, 1 << 20, prefix_cache=cache)
    server = Server("127.0.0.1", port)
    server.add_service(
        worker_pb2.DESCRIPTOR.services_by_name["PrefillService"], lambda s: add_prefill_service(servicer, s)
    )
    server.on_shutdown(servicer.end_watches)
    await server.start()
    return server, servicer


async def test_stream_sends_snapshot_then_stores_and_evictions():
    cache = PrefixCache(FINGERPRINT, 3 * BLOCK_BYTES, block_tokens=16)
    cache.insert(TOKENS[:32], fake_kv(32))
    keys = block_keys(TOKENS, FINGERPRINT)
    server, servicer = await serve_cache(cache)
    async with channel(server.address) as ch:
        call = worker_pb2_grpc.PrefillServiceStub(ch).WatchKvEvents(worker_pb2.WatchKvEventsRequest())
        first = (await call.read()).snapshot
        assert (first.instance_id, first.model, first.model_fingerprint, first.block_tokens) == (
            servicer.instance_id,
            "distilgpt2",
            FINGERPRINT,
            16,
        )
        assert sorted(first.block_keys) == sorted(keys[:2])
        await asyncio.to_thread(cache.insert, TOKENS[:48], fake_kv(48))  # (from another thread, as the engine)
        assert list((await call.read()).events.stored) == [keys[2]]
        await asyncio.to_thread(cache.insert, [4] * 16, fake_kv(16))  # full: the LRU block goes
        events = (await call.read()).events
        assert list(events.stored) == block_keys([4] * 16, FINGERPRINT) and list(events.removed) == [keys[2]]
        servicer.end_watches()  # shutdown: the stream ends cleanly
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert not servicer.watches
    await server.grpc.stop(0)


async def test_stream_of_a_watcher_too_far_behind_ends_resource_exhausted():
    cache = PrefixCache(FINGERPRINT, 1000 * BLOCK_BYTES)
    server, servicer = await serve_cache(cache)
    servicer.watch_max_pending = 8
    async with channel(server.address) as ch:
        call = worker_pb2_grpc.PrefillServiceStub(ch).WatchKvEvents(worker_pb2.WatchKvEventsRequest())
        assert (await call.read()).HasField("snapshot")
        await asyncio.to_thread(cache.insert, TOKENS[: 16 * 6], fake_kv(96))  # 6 keys: fits
        await asyncio.to_thread(cache.insert, list(range(5000, 5000 + 16 * 20)), fake_kv(320))  # 20 more at once
        messages = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (message := await call.read()) is not grpc.aio.EOF:
                messages.append(message)
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(messages) <= 1  # the first 6 may have gone before the burst; nothing after it
    assert not servicer.watches
    await server.grpc.stop(0)


# --- the router: exact where a worker reports, approximate where it does not -----------------------------------


class EventsBeforeSnapshot(worker_pb2_grpc.PrefillServiceServicer):
    """A bad worker: its stream starts with events."""

    async def WatchKvEvents(self, request: Any, context: Any) -> AsyncIterator[worker_pb2.WatchKvEventsResponse]:
        yield worker_pb2.WatchKvEventsResponse(events=worker_pb2.KvCacheEvents(stored=[b"x" * 16]))
        await asyncio.Event().wait()


async def serve_bad_worker(kind: str) -> Server:
    """`unimplemented`: a server without PrefillService (as an older worker answers WatchKvEvents)."""
    server = Server("127.0.0.1", 0)
    if kind == "events-first":
        servicer = EventsBeforeSnapshot()
        server.add_service(
            worker_pb2.DESCRIPTOR.services_by_name["PrefillService"], lambda s: add_prefill_service(servicer, s)
        )
    await server.start()
    return server


def _request(prompt: str) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(request_id="r", prompt=prompt)


def _load(router: PrefixRouter, address: str, active: int) -> None:
    worker = router.pool.workers[address]
    router.pool.record_load(worker, LoadReading(router.pool.now(), worker.started, active_sequences=active))


SHARED = ("The exact index knows what each prefill worker holds, block by block. " * 6).strip()
OTHER = ("An approximate index only remembers where this gateway sent each prompt. " * 6).strip()


@pytest.mark.parametrize("bad", ["unimplemented", "events-first"])
async def test_exact_index_is_preferred_and_a_worker_without_events_is_judged_approximately(bad):
    tokenizer = gpt2_tokenizer()
    cache = PrefixCache(FINGERPRINT, 100 << 20)
    shared_ids = tokenizer.encode(SHARED)
    cache.insert(shared_ids, fake_kv(len(shared_ids)))
    reporting, _ = await serve_cache(cache)
    other = await serve_bad_worker(bad)
    a, b = reporting.address, other.address
    pool: WorkerPool[RelayPrefillStub] = WorkerPool("prefill", (a, b), RelayPrefillStub)
    router = PrefixRouter(pool, RoutingOptions())
    assert router.watchers is not None
    router.watchers.sync()
    try:
        await until(lambda: a in router.exact.caches and b in router.watchers._not_reporting, "a reports, b not")
        assert router.exact.caches[a].keys == set(block_keys(shared_ids, FINGERPRINT))
        assert b not in router.exact.caches
        # a holds SHARED by its own report: chosen though busier, with nothing in the approximate index
        _load(router, a, 2)
        _load(router, b, 0)
        request = _request(SHARED + " What does it hold?")
        blocks = await router.prompt_blocks(request)
        assert blocks is not None and router.exact.matched(b, blocks) is None
        assert router.exact.matched(a, blocks) == len(shared_ids) // 16 * 16
        assert len(router.index) == 0 and router.pick(request, blocks=blocks).address == a
        # b does not report: what this gateway routed there (approximate) counts for it
        router.index.record(b, [k for _, k in router.keys(_request(OTHER)).cuts])
        request = _request(OTHER + " And this one?")
        assert router.pick(request, blocks=await router.prompt_blocks(request)).address == b
        # a stale guess about a (approximate: "a has OTHER") loses to a's own report (it has none of it)
        router.index.record(a, [k for _, k in router.keys(_request(OTHER)).cuts])
        router.index.drop_worker(b)
        _load(router, a, 1)
        _load(router, b, 0)
        request = _request(OTHER + " Once more?")
        assert router.pick(request).address == a  # (without blocks: approximate for both)
        assert router.pick(request, blocks=await router.prompt_blocks(request)).address == b
    finally:
        await router.close()
        await pool.close()
        await reporting.grpc.stop(0)
        await other.grpc.stop(0)


async def test_a_restarted_worker_drops_its_entries_exact_and_approximate():
    cache = PrefixCache(FINGERPRINT, 100 << 20)
    cache.insert(TOKENS, fake_kv(len(TOKENS)))
    server, first = await serve_cache(cache)
    address, port = server.address, server.port
    pool: WorkerPool[RelayPrefillStub] = WorkerPool("prefill", (address,), RelayPrefillStub)
    router = PrefixRouter(pool, RoutingOptions())
    assert router.watchers is not None
    router.watchers.backoff = (0.05, 0.2)
    router.watchers.sync()
    try:
        await until(lambda: address in router.exact.caches, "first snapshot")
        assert len(router.exact.caches[address].keys) == len(TOKENS) // 16
        router.index.record(address, [b"guessed"])
        await server.grpc.stop(0)  # killed
        await until(lambda: address not in router.exact.caches, "entries dropped when the stream broke")
        assert router.index.keys_of(address) == 1  # a stream can break without a restart: the guess stays
        server, second = await serve_cache(PrefixCache(FINGERPRINT, 100 << 20), port=port)  # started again
        await until(lambda: address in router.exact.caches, "the new instance's snapshot")
        assert router.exact.caches[address].instance_id == second.instance_id != first.instance_id
        assert router.exact.caches[address].keys == set()
        assert router.index.keys_of(address) == 0  # a new instance: its cache is new, the guesses go too
    finally:
        await router.close()
        await pool.close()
        await server.grpc.stop(0)


def test_the_routers_tokenizer_is_the_workers():
    assert load_tokenizer("distilgpt2").encode(SHARED) == gpt2_tokenizer().encode(SHARED)


# --- through a cluster: 2 prefill workers, 1 decode worker, 2 gateways ------------------------------------------

N_TOKENS = 4


@pytest.fixture(scope="module")
def events_cluster() -> Iterator[tuple[Any, Any]]:
    """The cluster's gateway knows both prefill workers; `side`, a second gateway, knows only the second one (so
    what it sends there fills a cache the first gateway never routed to)."""
    running = start_cluster(GPT2_ARGS, prefill_workers=2)
    cluster = running.cluster
    side = spawn(
        "gateway-side",
        ["gateway", "--prefill", cluster.prefill[1].address, "--decode", cluster.decode[0].address],
        free_port(),
        metrics_port=free_port(),
    )
    try:
        asyncio.run(wait_healthy([side], 300))
        yield running, side
    finally:
        stop([side])
        cluster.stop()


async def generate(address: str, prompt: str) -> Completion:
    async with channel(address) as ch:
        request = gateway_pb2.GenerateRequest(prompt=prompt, max_new_tokens=N_TOKENS, ignore_eos=True)
        return await complete(gateway_pb2_grpc.GatewayStub(ch), request, timeout=120)


async def metric(child: Any, name: str, **labels: str) -> float:
    samples = await asyncio.to_thread(scrape, child.metrics_address)
    return samples.get((name, frozenset(labels.items())), 0.0)


async def indexed(gateway: Any, worker: Any) -> float:
    return await metric(gateway, "disagg_prefix_routing_indexed_blocks", worker=worker.address)


async def test_a_prompt_goes_to_the_worker_that_holds_it_by_its_report(events_cluster):
    running, side = events_cluster
    gateway, (_, holder) = running.cluster.gateway, running.cluster.prefill
    prompt = ("Reports from the workers tell the gateway which one holds a prefix. " * 5).strip()
    first = await generate(side.address, prompt)  # computed and cached on `holder`, the only one `side` knows
    blocks = first.prompt_tokens // 16
    await until(lambda: _at_least(indexed(gateway, holder), blocks), "the gateway's exact index has the blocks")
    exact_before = await metric(gateway, "disagg_prefix_routing_decisions_total", source="exact")
    second = await generate(gateway.address, prompt + " And which one is that?")
    # the gateway never routed this prompt (its approximate index has nothing) and ties go to the first worker:
    # only the report sent it to `holder`, the one that had it cached
    assert second.cached_prompt_tokens >= (blocks - 1) * 16 > 0
    assert await metric(gateway, "disagg_prefix_routing_decisions_total", source="exact") == exact_before + 1
    assert await metric(gateway, "disagg_prefix_routing_matched_share_sum", source="exact") > 0


async def _at_least(value: Awaitable[float], floor: float) -> bool:
    return await value >= floor


async def test_a_restarted_prefill_worker_drops_its_cache_and_requests_keep_completing(events_cluster):
    running, side = events_cluster
    gateway, (survivor, victim) = running.cluster.gateway, running.cluster.prefill
    prompt = ("A prefill worker killed and started again comes back with an empty cache. " * 5).strip()
    before = await generate(side.address, prompt)  # on `victim`
    blocks = before.prompt_tokens // 16
    await until(lambda: _at_least(indexed(gateway, victim), blocks), "the victim's blocks in the exact index")
    snapshots = await metric(gateway, "disagg_prefix_routing_snapshots_total", worker=victim.address)

    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    # routed by what the victim reported (if the gateway has not seen its stream break yet): the call fails and
    # the request resumes on the survivor; or straight to the survivor. Either way it completes, identically.
    during = await generate(gateway.address, prompt)
    assert during.token_ids == before.token_ids and during.cached_prompt_tokens == 0

    victim.restart()  # same port
    await wait_healthy([victim], 300)
    await until(
        lambda: _at_least(
            metric(gateway, "disagg_prefix_routing_snapshots_total", worker=victim.address), snapshots + 1
        ),
        "the restarted worker's first snapshot",
    )
    assert await indexed(gateway, victim) == 0  # what the old instance held is gone from the index
    after = await _retry_unavailable(lambda: generate(side.address, prompt))  # (side's health pass: up again)
    assert after.token_ids == before.token_ids and after.cached_prompt_tokens == 0  # recomputed: an empty cache
    # the survivor now holds the prompt (from `during`) and says so: the next turn goes there
    await until(lambda: _at_least(indexed(gateway, survivor), blocks), "the survivor's blocks in the exact index")
    again = await generate(gateway.address, prompt + " Still there?")
    assert again.cached_prompt_tokens >= (blocks - 1) * 16 > 0


async def _retry_unavailable(call: Callable[[], Awaitable[Completion]], attempts: int = 100) -> Completion:
    for _ in range(attempts - 1):
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.2)
    return await call()
