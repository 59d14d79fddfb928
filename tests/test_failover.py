"""Worker failure through real processes (bundled real model): retry, mid-stream migration, drain, UNAVAILABLE."""

from __future__ import annotations

import signal

import grpc
import pytest

from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import channel, complete
from disagg.tools.cluster import wait_healthy
from tests.conftest import LLAMA_ARGS, start_cluster
from tests.reliability_helpers import wait_idle, worker_load
from tests.test_e2e import prompt_of, reference

N_TOKENS = 40


@pytest.fixture(scope="module")
def failover_cluster():
    running = start_cluster(LLAMA_ARGS, ["--health-interval-seconds", "0.5"], prefill_workers=2, decode_workers=2)
    yield running
    running.cluster.stop()


@pytest.fixture(scope="module")
def long_case(llama_model):
    """A prompt whose greedy continuation runs N_TOKENS without EOS, and that continuation."""
    prompt = prompt_of(llama_model.tokenizer, 60)
    expected = reference(llama_model, prompt, N_TOKENS)
    assert len(expected) == N_TOKENS and 2 not in expected
    return prompt, expected


async def busy_decode_worker(running):
    for child in running.cluster.decode:
        if child.process.poll() is None and (await worker_load(child.address)).active_sequences > 0:
            return child
    raise AssertionError("no decode worker holds the sequence")


async def revive(running, child) -> None:
    child.process.wait()
    child.restart()
    await wait_healthy([child], 300)


async def test_decode_worker_killed_mid_stream_migrates_without_losing_a_token(failover_cluster, long_case):
    prompt, expected = long_case
    tokens, text, killed = [], "", None
    async with channel(failover_cluster.address) as ch:
        call = gateway_pb2_grpc.GatewayStub(ch).Generate(
            gateway_pb2.GenerateRequest(prompt=prompt, max_new_tokens=N_TOKENS), timeout=300
        )
        async for response in call:
            tokens.extend(response.token_ids)
            text += response.text
            if len(tokens) >= 8 and killed is None:
                killed = await busy_decode_worker(failover_cluster)
                killed.process.send_signal(signal.SIGKILL)
            last = response
    assert killed is not None
    assert tokens == expected  # greedy output identical to an undisturbed run: nothing lost or repeated
    assert last.finish_reason == "length" and last.usage.completion_tokens == N_TOKENS
    await revive(failover_cluster, killed)


async def test_dead_prefill_worker_is_retried_on_another(failover_cluster, long_case):
    prompt, expected = long_case
    victim = failover_cluster.cluster.prefill[0]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    async with channel(failover_cluster.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for _ in range(3):  # whichever worker the gateway picks first, every request succeeds
            got = await complete(stub, gateway_pb2.GenerateRequest(prompt=prompt, max_new_tokens=5), timeout=120)
            assert got.token_ids == expected[:5]
    await revive(failover_cluster, victim)


async def test_sigterm_lets_the_running_stream_finish(failover_cluster, long_case):
    prompt, expected = long_case
    tokens, draining = [], None
    async with channel(failover_cluster.address) as ch:
        call = gateway_pb2_grpc.GatewayStub(ch).Generate(
            gateway_pb2.GenerateRequest(prompt=prompt, max_new_tokens=N_TOKENS), timeout=300
        )
        async for response in call:
            tokens.extend(response.token_ids)
            if len(tokens) >= 4 and draining is None:
                draining = await busy_decode_worker(failover_cluster)
                draining.process.send_signal(signal.SIGTERM)
    assert tokens == expected
    assert draining.process.wait(30) == 0  # finished its stream within the grace period, then exited cleanly
    await revive(failover_cluster, draining)
    await wait_idle(failover_cluster.cluster.prefill + failover_cluster.cluster.decode)


async def test_no_healthy_worker_left_is_unavailable_promptly(failover_cluster):
    for child in failover_cluster.cluster.decode:
        child.process.send_signal(signal.SIGKILL)
    for child in failover_cluster.cluster.decode:
        child.process.wait()
    async with channel(failover_cluster.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # promptly: UNAVAILABLE, not this call's deadline
            await complete(
                gateway_pb2_grpc.GatewayStub(ch), gateway_pb2.GenerateRequest(prompt="hi", max_new_tokens=4), timeout=30
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode worker" in caught.value.details()
