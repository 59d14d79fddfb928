"""Soak (bounded): 200 requests at concurrency 16 with random cancellations while workers are killed.

The KV travels by the direct transport (SOAK_KV_TRANSPORT): pushes, claims, cancellations before a claim and a
dead push target are the paths this run exercises that the other tests touch only once each.

A decode worker is SIGKILLed a quarter of the way in; a prefill worker is SIGKILLed and restarted halfway. Every
request must either complete with exactly the undisturbed greedy output or end with a clear gRPC status, and the
surviving workers must end with no active sequence and their memory back near idle.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import grpc
import pytest

from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import channel, complete
from disagg.tools.cluster import Cluster, wait_healthy
from tests.conftest import LLAMA_ARGS
from tests.reliability_helpers import idle_rss, wait_idle
from tests.test_e2e import prompt_of, reference

REQUESTS = int(os.environ.get("SOAK_REQUESTS", "200"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "16"))
KV_TRANSPORT = os.environ.get("SOAK_KV_TRANSPORT", "direct")
MAX_NEW_TOKENS = 10
CLEAR_ERRORS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.mark.soak
@pytest.mark.cluster
async def test_soak_with_cancellations_and_killed_workers(llama_model):
    rng = random.Random(1234)
    prompts = [prompt_of(llama_model.tokenizer, n) for n in (5, 9, 14, 20, 27, 33, 41, 50)]
    expected = {p: reference(llama_model, p, MAX_NEW_TOKENS) for p in prompts}
    cluster = Cluster(
        LLAMA_ARGS,
        ["--health-interval-seconds", "0.5", "--kv-transport", KV_TRANSPORT],
        prefill_workers=2,
        decode_workers=2,
    )
    try:
        address = await cluster.start(timeout=300)
        async with channel(address) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            # Warm up first (one-time allocations: thread pools, kernels); idle, a worker hands freed memory back
            # to the OS, so what it keeps after the soak is what it still holds (what must not grow with requests).
            await asyncio.gather(
                *(
                    complete(
                        stub,
                        gateway_pb2.GenerateRequest(prompt=prompts[i % len(prompts)], max_new_tokens=MAX_NEW_TOKENS),
                    )
                    for i in range(2 * CONCURRENCY)
                )
            )
            rss_before = {c.name: await idle_rss(c.address) for c in cluster.decode}

            outcomes: list[str] = []
            done = 0
            limit = asyncio.Semaphore(CONCURRENCY)

            async def one(i: int) -> None:
                nonlocal done
                prompt = prompts[i % len(prompts)]
                cancel_after = rng.randint(1, MAX_NEW_TOKENS - 1) if rng.random() < 0.15 else None
                async with limit:
                    call = stub.Generate(
                        gateway_pb2.GenerateRequest(prompt=prompt, max_new_tokens=MAX_NEW_TOKENS), timeout=240
                    )
                    tokens = []
                    try:
                        async for response in call:
                            tokens.extend(response.token_ids)
                            if cancel_after is not None and len(tokens) >= cancel_after:
                                call.cancel()
                                break
                        if cancel_after is not None and len(tokens) >= cancel_after:
                            outcomes.append("cancelled")
                        else:
                            assert tokens == expected[prompt], f"request {i}: {tokens} != {expected[prompt]}"
                            outcomes.append("completed")
                    except grpc.aio.AioRpcError as error:
                        assert error.code() in CLEAR_ERRORS and error.details(), (error.code(), error.details())
                        outcomes.append(error.code().name)
                    finally:
                        done += 1

            async def disturb() -> None:
                while done < REQUESTS // 4:
                    await asyncio.sleep(0.05)
                cluster.decode[0].process.send_signal(signal.SIGKILL)
                while done < REQUESTS // 2:
                    await asyncio.sleep(0.05)
                victim = cluster.prefill[0]
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait()
                victim.restart()
                await wait_healthy([victim], 300)

            disturber = asyncio.ensure_future(disturb())
            await asyncio.gather(*(one(i) for i in range(REQUESTS)))
            await disturber

        assert len(outcomes) == REQUESTS
        counts = {k: outcomes.count(k) for k in set(outcomes)}
        print("soak outcomes:", counts)
        assert counts.get("completed", 0) >= 0.8 * (REQUESTS - counts.get("cancelled", 0)), counts
        assert cluster.prefill[0].process.poll() is None, "restarted prefill worker is serving"
        survivors = [c for c in cluster.prefill + cluster.decode if c.process.poll() is None]
        loads = await wait_idle(survivors, timeout=30)
        assert all(load.active_sequences == 0 and load.kv_bytes == 0 for load in loads)
        survivor = cluster.decode[1]
        rss = await idle_rss(survivor.address)
        print(f"decode RSS idle {rss_before[survivor.name] / 2**20:.0f} MiB, after soak {rss / 2**20:.0f} MiB")
        assert rss < rss_before[survivor.name] * 1.1 + (64 << 20)
    finally:
        cluster.stop()
