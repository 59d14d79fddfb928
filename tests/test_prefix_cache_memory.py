"""The prefix cache's memory budget holds in a real prefill worker under a workload ten times larger than it: the
bytes metric stays within --prefix-cache-mb, blocks are evicted, and the process's resident memory does not grow
with what passed through the cache."""

from __future__ import annotations

import asyncio
import pathlib
import random

import pytest

from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import channel, complete
from tests.conftest import GPT2_ARGS, start_cluster
from tests.test_metrics import scrape, value

BUDGET_MB = 16
# distilgpt2 KV: 6 layers x (K, V) x 12 heads x 64 x 4 bytes = 36,864 bytes per token
KV_BYTES_PER_TOKEN = 6 * 2 * 12 * 64 * 4
WORDS = ["cache", "block", "prefix", "token", "key", "value", "memory", "budget", "evict", "worker", "prompt", "batch"]


@pytest.fixture(scope="module")
def small_cache_cluster():
    running = start_cluster(GPT2_ARGS, prefill_args=["--prefix-cache-mb", str(BUDGET_MB)])
    yield running
    running.cluster.stop()


def rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(120)) for _ in range(count)]


async def send(address: str, texts: list[str]) -> list[gateway_pb2.GenerateResponse]:
    async with channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        requests = [gateway_pb2.GenerateRequest(prompt=t, max_new_tokens=2, ignore_eos=True) for t in texts]
        return await asyncio.gather(*(complete(stub, r, timeout=300) for r in requests))


async def test_budget_holds_under_ten_times_the_workload(small_cache_cluster):
    [worker] = small_cache_cluster.cluster.prefill
    budget = BUDGET_MB << 20
    # Warm: the cache fills to its budget, the allocator reaches its high-water mark, and oneDNN's primitive caches
    # (one compiled matmul per batch shape, capped at 64 in a worker: disagg/tools/launch.py) fill up.
    for seed in range(1, 9):
        await send(small_cache_cluster.address, prompts(8, seed=seed))
    await asyncio.sleep(1.5)  # idle: the worker hands freed memory back (disagg/engine/memory.py)
    rss_full = rss_bytes(worker.process.pid)
    before = scrape(worker.metrics_address)
    results = []
    for batch in range(5):
        results += await send(small_cache_cluster.address, prompts(8, seed=100 + batch))
    await asyncio.sleep(1.5)
    after = scrape(worker.metrics_address)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    assert prompt_tokens * KV_BYTES_PER_TOKEN >= 10 * budget  # the workload is 10x the cache
    assert 0 < value(after, "disagg_prefix_cache_bytes") <= budget
    evicted = value(after, "disagg_prefix_cache_evicted_blocks_total") - value(
        before, "disagg_prefix_cache_evicted_blocks_total"
    )
    assert evicted * 16 * KV_BYTES_PER_TOKEN >= 8 * budget  # most of what passed through was evicted again
    growth = rss_bytes(worker.process.pid) - rss_full
    # Not the workload's 190 MB: at most two more budgets' worth of allocator slack (one budget alone was exceeded
    # once, by 1.7 MiB, under the full suite's load on 2 cores; alone the growth is negative).
    assert growth <= 2 * budget, f"RSS grew {growth / 2**20:.1f} MiB after {prompt_tokens} prompt tokens"
