"""Decode admission: a decode worker that cannot hold a sequence refuses it up front, and the gateway moves the
same handoff to another decode worker (relayed: the prefill's KV is reused; direct: the prompt is prefilled again)
instead of failing the request; the gateway's choice of worker reads the workers' reported load.

The cluster tests need decode workers that reserve the KV budget on SequenceStart and then send initial metadata
`disagg-admitted: 1` (or end the call with RESOURCE_EXHAUSTED). The score tests run in-process, no workers.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import grpc
import pytest

from disagg.config import GatewayConfig
from disagg.errors import Overloaded
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2
from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
from disagg.tools.client import channel, complete
from disagg.tools.cluster import Child, free_port, spawn, stop, wait_healthy
from gateway.progress import Progress
from gateway.servicer import GatewayServicer
from gateway.worker_calls import WorkerRefused
from gateway.worker_pool import LoadReading, WorkerPool
from tests.conftest import GPT2_ARGS, start_cluster
from tests.reliability_helpers import start_extra, wait_idle

# ~300 prompt tokens: about 11 MB of fp32 KV, far over a 1 MiB budget (36 KiB a token: 28 tokens)
PROMPT = " ".join(["hello"] * 300)
NEW_TOKENS = 6
WORKER_ARGS = [*GPT2_ARGS, "--threads", "1"]


# ---- the score, in-process --------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pool(n: int = 3, clock: Clock | None = None) -> WorkerPool[RelayDecodeStub]:
    addresses = tuple(f"127.0.0.1:{i + 1}" for i in range(n))  # never dialled: channels connect on first use
    return WorkerPool("decode", addresses, RelayDecodeStub, load_ttl=2.0, kv_weight=4.0, clock=clock or Clock())


def _read(pool: WorkerPool[RelayDecodeStub], address: str, **load: int) -> None:
    worker = pool.workers[address]
    pool.record_load(worker, LoadReading(pool._clock(), worker.started, **load))


A, B, C = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"


async def test_pick_minimises_reported_load_plus_requests_started_since():
    pool = _pool()
    _read(pool, A, active_sequences=3)
    _read(pool, B, active_sequences=1, queued=1)
    _read(pool, C, active_sequences=2)
    assert pool.pick().address == B  # 2 < 2 (C, listed later) < 3
    pool.workers[B].begin()  # started since B's report: counts on top of it
    assert pool.score(pool.workers[B]) == 3
    assert pool.pick().address == C
    pool.workers[C].begin()
    pool.workers[C].begin()  # C: 4; A and B: 3, the tie going to the one listed first
    assert pool.pick().address == A
    assert pool.pick(exclude=frozenset({A, B})).address == C  # exclude still wins
    await pool.close()


async def test_kv_fullness_weighs_and_unlimited_budget_counts_nothing():
    pool = _pool(2)
    _read(pool, A, active_sequences=1, kv_bytes=900, kv_budget_bytes=1000)  # 1 + 4 * 0.9 = 4.6
    _read(pool, B, active_sequences=4, kv_bytes=10**9, kv_budget_bytes=0)  # unlimited: 4
    assert pool.score(pool.workers[A]) == pytest.approx(4.6)
    assert pool.pick().address == B
    await pool.close()


async def test_stale_or_missing_reading_falls_back_to_in_flight():
    clock = Clock()
    pool = _pool(2, clock)
    _read(pool, A, active_sequences=5)  # busy by its report
    pool.workers[B].in_flight = 2  # no report: its in-flight count
    assert pool.pick().address == B
    clock.now += 2.5  # older than the TTL: A's report no longer counts, its in-flight (0) does
    assert pool.score(pool.workers[A]) == 0
    assert pool.pick().address == A
    await pool.close()


async def test_refusal_deprioritises_until_a_later_reading_shows_change():
    clock = Clock()
    pool = _pool(2, clock)
    _read(pool, A)
    _read(pool, B, active_sequences=3)
    assert pool.pick().address == A
    pool.note_refusal(pool.workers[A])
    assert pool.workers[A].healthy and pool.pick().address == B  # healthy, but picked last
    assert pool.pick(exclude=frozenset({B})).address == A  # still there when nothing else is
    clock.now += 0.5
    _read(pool, A)  # same load as when it refused: still deprioritised
    assert pool.pick().address == B
    clock.now += 0.5
    _read(pool, A, kv_bytes=0, active_sequences=1)  # its load changed: back in the ordinary order
    assert pool.pick().address == A
    pool.note_refusal(pool.workers[A])
    clock.now += pool.refusal_hold + 0.1  # no change, but the hold ran out
    _read(pool, A, active_sequences=1)
    _read(pool, B, active_sequences=3)
    assert pool.pick().address == A
    await pool.close()


async def test_all_decode_workers_refused_is_resource_exhausted_naming_each():
    pool = _pool(2)
    servicer = GatewayServicer(GatewayConfig(), WorkerPool("prefill", (C,), RelayPrefillStub), pool)
    progress = Progress(worker_pb2.PrefillRequest(request_id="r"))
    for address in (A, B):
        servicer.routes.refused(progress, WorkerRefused(pool.workers[address], f"KV budget full at {address}"))
    with pytest.raises(Overloaded) as caught:
        servicer.routes.pick_decode(progress)
    assert A in str(caught.value) and B in str(caught.value) and "KV budget" in str(caught.value)
    await pool.close()
    await servicer.prefill.close()


# ---- real processes ----------------------------------------------------------------------------------------------


def _refusals(child: Child) -> float:
    """RESOURCE_EXHAUSTED answers the worker counted, all methods together."""
    text = urllib.request.urlopen(f"http://{child.metrics_address}/metrics", timeout=5).read().decode()
    pattern = r'^disagg_request_errors_total\{[^}]*code="RESOURCE_EXHAUSTED"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.M))


@pytest.fixture(scope="module")
def admission_cluster():
    """The normal cluster (1 prefill, 1 decode) and two decode workers with a 1 MiB KV budget."""
    command = ["decode", *WORKER_ARGS, "--kv-budget-mb", "1"]
    small = [spawn(f"decode-small-{i}", command, free_port(), metrics_port=free_port()) for i in range(2)]
    try:
        running = start_cluster(WORKER_ARGS, ["--health-interval-seconds", "0.5"])
        try:
            asyncio.run(wait_healthy(small, 300))
            yield running, small
        finally:
            running.cluster.stop()
    finally:
        stop(small)


async def _gateway(name: str, running, decode: list[str], transport: str) -> Child:
    prefill = running.cluster.prefill[0].address
    command = ["gateway", "--prefill", prefill, "--decode", ",".join(decode), "--kv-transport", transport]
    return await start_extra(name, [*command, "--health-interval-seconds", "0.5"], free_port())


def _request() -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(admission_cluster):
    """The greedy tokens from the cluster's own gateway and decode worker."""
    running, _ = admission_cluster

    async def run():
        async with channel(running.address) as ch:
            return await complete(gateway_pb2_grpc.GatewayStub(ch), _request(), timeout=120)

    result = asyncio.run(run())
    assert result.prompt_tokens >= 250 and len(result.token_ids) == NEW_TOKENS
    return list(result.token_ids)


@pytest.mark.parametrize("transport", ["relayed", "direct", "shared-memory"])
async def test_refused_sequence_completes_on_another_decode_worker(admission_cluster, expected, transport):
    running, small = admission_cluster
    normal = running.cluster.decode[0]
    await wait_idle(running.cluster.decode + running.cluster.prefill + small)
    # the small worker first: at equal (idle) load the gateway picks it, and it must refuse
    gateway = await _gateway(f"gateway-{transport}", running, [small[0].address, normal.address], transport)
    try:
        refused_before = _refusals(small[0])
        async with channel(gateway.address) as ch:
            result = await complete(gateway_pb2_grpc.GatewayStub(ch), _request(), timeout=120)
        assert list(result.token_ids) == expected and result.finish_reason == "length"
        assert _refusals(small[0]) > refused_before, "the small decode worker was not asked first (or did not refuse)"
    finally:
        stop([gateway])
    await wait_idle(running.cluster.decode + running.cluster.prefill + small)


@pytest.mark.parametrize("transport", ["relayed", "direct"])
async def test_every_decode_worker_refusing_is_resource_exhausted_promptly(admission_cluster, transport):
    running, small = admission_cluster
    gateway = await _gateway(f"gateway-full-{transport}", running, [s.address for s in small], transport)
    try:
        started = time.monotonic()
        async with channel(gateway.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await complete(gateway_pb2_grpc.GatewayStub(ch), _request(), timeout=60)
        elapsed = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        details = caught.value.details()
        assert all(s.address in details for s in small), details
        assert elapsed < 15, f"took {elapsed:.1f}s"
    finally:
        stop([gateway])
    await wait_idle(running.cluster.prefill + small)
