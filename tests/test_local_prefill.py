"""Conditional disaggregation and decode-side prefix reuse.

In process: an aggregated engine with a prefix cache keeps each finished sequence's prompt + generated tokens, so a
conversation's next turn (history + reply + a new message) computes only its new tokens, and every output is
generate()'s (GPT-2 and Llama; prompts on a block boundary, shorter than a block, equal to a cached one).

Through a cluster (decode worker `--local-prefill`, gateway `--local-prefill-tokens`): a short prompt is prefilled
on the decode worker (the prefill worker computes nothing), a long one is declined there and takes the prefill
worker, a next turn is prefilled locally from the decode worker's cache, and all of them give generate()'s tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from disagg.config import BatchPolicy
from disagg.engine.aggregated import AggregatedEngine, Prompt
from disagg.kv.prefix_cache import PrefixCache
from disagg.model.loading import LoadedModel
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from disagg.tools.client import channel, complete
from tests.conftest import GPT2_ARGS, RunningCluster, start_cluster
from tests.test_aggregated import Collector, reference
from tests.test_batching import wait_until
from tests.test_metrics import scrape, value

BLOCK = 16
THRESHOLD = 48  # the cluster's --local-prefill-tokens


@pytest.fixture
def cached_engine() -> Iterator:
    engines: list[AggregatedEngine] = []

    def make(lm: LoadedModel) -> AggregatedEngine:
        cache = PrefixCache(lm.fingerprint, 64 << 20, BLOCK)
        engine = AggregatedEngine(lm, BatchPolicy(max_batch_size=8), prefix_cache=cache)
        engines.append(engine)
        engine.start()
        return engine

    yield make
    for engine in engines:
        engine.stop()


def run(engine: AggregatedEngine, collector: Collector, lm: LoadedModel, name: str, ids: list[int], n: int) -> Prompt:
    prompt = collector.prompt(lm, name, ids, n)
    engine.submit_prompt(prompt)
    collector.wait(name)
    wait_until(lambda: engine.active == 0)
    return prompt


@pytest.mark.parametrize("model", ["gpt2_model", "llama_model"])
def test_next_turn_reuses_the_finished_sequence_and_matches_generate(request, cached_engine, model):
    lm: LoadedModel = request.getfixturevalue(model)
    engine = cached_engine(lm)
    collector = Collector()
    turn1 = lm.tokenizer.encode("User: what does a decode worker keep after a reply?\nAssistant:")
    first = run(engine, collector, lm, "t1", turn1, 20)
    reply = collector.tokens("t1")
    assert first.cached_tokens == 0 and reply == reference(lm, turn1, 20)
    # The next turn re-sends the history and the reply: every full block of turn1 + reply[:-1] was kept at finish
    # (the newest token's KV is never computed), the prompt's blocks at prefill.
    turn2 = [*turn1, *reply, *lm.tokenizer.encode("\nUser: and why?\nAssistant:")]
    second = run(engine, collector, lm, "t2", turn2, 12)
    kept = (len(turn1) + len(reply) - 1) // BLOCK * BLOCK
    assert second.cached_tokens >= kept > len(turn1) // BLOCK * BLOCK  # more than the prompt alone gave
    assert collector.tokens("t2") == reference(lm, turn2, 12)
    # Equal to a cached prompt: all but its last token come from the cache, same tokens.
    again = run(engine, collector, lm, "t2-again", turn2, 12)
    assert again.cached_tokens == min(len(turn2) // BLOCK * BLOCK, len(turn2) - 1)
    assert collector.tokens("t2-again") == collector.tokens("t2")


def test_block_boundary_and_short_prompts_match_generate(gpt2_model, cached_engine):
    lm = gpt2_model
    engine = cached_engine(lm)
    collector = Collector()
    base = lm.tokenizer.encode(" the slab keeps keys and values for every running row" * 4)[: 2 * BLOCK]
    assert len(base) == 2 * BLOCK
    cases = {
        "boundary": base,  # ends exactly on a block boundary
        "boundary-again": base,  # equal to it: the last block gives all but one token
        "longer": [*base, *base[:5]],  # two cached blocks, five new tokens
        "short": base[:5],  # shorter than one block: nothing cacheable
    }
    for name, ids in cases.items():
        prompt = run(engine, collector, lm, name, ids, 6)
        assert collector.tokens(name) == reference(lm, ids, 6), name
        expected = {"boundary": 0, "boundary-again": 2 * BLOCK - 1, "longer": 2 * BLOCK, "short": 0}[name]
        assert prompt.cached_tokens == expected, name


def test_uncached_tokens_counts_what_a_prefill_would_compute(gpt2_model, cached_engine):
    engine = cached_engine(gpt2_model)
    ids = gpt2_model.tokenizer.encode(" blocks of sixteen tokens" * 12)
    assert engine.uncached_tokens(ids) == len(ids)
    run(engine, Collector(), gpt2_model, "a", ids, 2)
    assert engine.uncached_tokens(ids) == 1  # all cached: only the last token is computed
    assert engine.uncached_tokens([*ids, 7, 7, 7]) == len(ids) + 3 - len(ids) // BLOCK * BLOCK


# --- through a cluster -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[RunningCluster]:
    # By uncached tokens alone (the default): a cold short prompt is prefilled locally too (a share of 0.5 sends it
    # to the prefill worker: see the test with two decode workers)
    running = start_cluster(GPT2_ARGS, local_prefill_tokens=THRESHOLD)
    yield running
    running.cluster.stop()


def _forward_passes(cluster: RunningCluster) -> float:
    [prefill] = cluster.cluster.prefill
    return value(scrape(prefill.metrics_address), "disagg_prompt_tokens_total")


def _outcomes(cluster: RunningCluster) -> dict[str, float]:
    metrics = scrape(cluster.cluster.gateway.metrics_address)  # (a label's series appears at its first count)
    outcomes = ("local", "declined", "refused")
    return {o: metrics.get(("disagg_local_prefill_total", frozenset({("outcome", o)})), 0.0) for o in outcomes}


async def _generate(stub: gateway_pb2_grpc.GatewayStub, prompt: str, n: int) -> gateway_pb2.GenerateResponse:
    return await complete(stub, gateway_pb2.GenerateRequest(prompt=prompt, max_new_tokens=n, ignore_eos=True), 300)


async def test_short_prompts_local_long_ones_remote_next_turn_local(local_cluster, gpt2_model):
    lm = gpt2_model
    short = "Hello there, decode worker."
    long = " ".join(["the prefill worker computes long prompts"] * 12)
    assert len(lm.tokenizer.encode(short)) <= THRESHOLD < len(lm.tokenizer.encode(long))
    async with channel(local_cluster.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        passes, outcomes = _forward_passes(local_cluster), _outcomes(local_cluster)
        result = await _generate(stub, short, 8)
        assert result.token_ids == reference(lm, lm.tokenizer.encode(short), 8)
        assert _forward_passes(local_cluster) == passes  # the prefill worker computed nothing
        assert _outcomes(local_cluster)["local"] == outcomes["local"] + 1

        result = await _generate(stub, long, 8)
        assert result.token_ids == reference(lm, lm.tokenizer.encode(long), 8)
        assert _forward_passes(local_cluster) > passes  # declined: a prefill worker computed it
        assert _outcomes(local_cluster)["declined"] == outcomes["declined"] + 1

        # The conversation goes on: history + reply + a new message. The decode worker kept the finished
        # sequence's blocks, so few tokens are uncached there: prefilled locally, from its cache.
        passes = _forward_passes(local_cluster)
        turn2 = long + result.text + "\nUser: shorter please."
        second = await _generate(stub, turn2, 8)
        assert second.token_ids == reference(lm, lm.tokenizer.encode(turn2), 8)
        assert second.cached_prompt_tokens >= (result.prompt_tokens + 8 - 1) // BLOCK * BLOCK
        assert _forward_passes(local_cluster) == passes
        assert _outcomes(local_cluster)["local"] == outcomes["local"] + 2


async def test_decode_worker_declines_without_reserving_and_keeps_serving(local_cluster, gpt2_model):
    """AggregatedService/Generate with max_uncached_tokens, called directly: the decline is the only message."""
    [decode] = local_cluster.cluster.decode
    long = " ".join(["nothing of this is cached on the decode worker yet"] * 10)
    async with channel(decode.address) as ch:
        stub = worker_pb2_grpc.AggregatedServiceStub(ch)
        load = worker_pb2_grpc.WorkerLoadServiceStub(ch)
        request = worker_pb2.AggregatedServiceGenerateRequest(
            request=worker_pb2.PrefillRequest(request_id="declined-1", prompt=long), max_uncached_tokens=THRESHOLD
        )
        messages = [m async for m in stub.Generate(request, timeout=60)]
        assert [m.WhichOneof("event") for m in messages] == ["declined"]
        short = worker_pb2.AggregatedServiceGenerateRequest(
            request=worker_pb2.PrefillRequest(request_id="declined-2", prompt="Hi"), max_uncached_tokens=THRESHOLD
        )
        short.min_cached_share = 0.5  # short enough, but nothing of it is cached here
        assert [m.WhichOneof("event") async for m in stub.Generate(short, timeout=60)] == ["declined"]
        tokens = len(gpt2_model.tokenizer.encode(long))
        assert messages[0].declined.prompt_tokens == messages[0].declined.uncached_tokens == tokens
        reading = await load.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
        assert reading.active_sequences == 0 and reading.queued == 0
        bad = worker_pb2.AggregatedServiceGenerateRequest(
            request=worker_pb2.PrefillRequest(request_id="bad", prompt=""), max_uncached_tokens=THRESHOLD
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            _ = [m async for m in stub.Generate(bad, timeout=60)]
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_token_id_history_reuses_every_block_of_the_reply(local_cluster, gpt2_model):
    """A client that re-sends the conversation as token ids (prompt_token_ids) gives the decode worker's cache the
    exact tokens it generated: the next turn finds every full block of prompt + reply (all but the newest token)."""
    lm = gpt2_model
    turn1 = lm.tokenizer.encode("User: keep my tokens, not my text.\nAssistant:")
    async with channel(local_cluster.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        request = gateway_pb2.GenerateRequest(prompt_token_ids=turn1, max_new_tokens=40, ignore_eos=True)
        first = await complete(stub, request, 300)
        assert first.token_ids == reference(lm, turn1, 40)
        turn2 = [*turn1, *first.token_ids, *lm.tokenizer.encode("\nUser: go on.\nAssistant:")]
        request = gateway_pb2.GenerateRequest(prompt_token_ids=turn2, max_new_tokens=8, ignore_eos=True)
        second = await complete(stub, request, 300)
        assert second.token_ids == reference(lm, turn2, 8)
        assert second.prompt_tokens == len(turn2)
        assert second.cached_prompt_tokens == (len(turn1) + 40 - 1) // BLOCK * BLOCK
        for bad, message in (([1, 50257], "outside the vocabulary 0..50256"), ([-1], ">= 0")):
            request = gateway_pb2.GenerateRequest(prompt_token_ids=bad, max_new_tokens=2)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await complete(stub, request, 60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
        both = gateway_pb2.GenerateRequest(prompt="x", prompt_token_ids=[1], max_new_tokens=2)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await complete(stub, both, 60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def two_decode_cluster() -> Iterator[RunningCluster]:
    running = start_cluster(
        GPT2_ARGS, ["--local-prefill-min-cached", "0.5"], decode_workers=2, local_prefill_tokens=THRESHOLD
    )
    yield running
    running.cluster.stop()


async def test_conversations_stay_on_the_decode_worker_that_holds_them(two_decode_cluster, gpt2_model):
    """Two decode workers, --local-prefill-min-cached 0.5: a conversation's first turn (cold) is
    declined and prefilled on the prefill worker, each next turn goes back to the decode worker that decoded the
    last one (the gateway's decode affinity), finds the whole history in its cache and is prefilled there."""
    lm, running = gpt2_model, two_decode_cluster
    async with channel(running.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def conversation(c: int) -> list[gateway_pb2.GenerateResponse]:
            history, results = [], []
            for turn in range(3):
                history += lm.tokenizer.encode(f"\nUser {c}: turn {turn}, tell me more.\nAssistant:")
                request = gateway_pb2.GenerateRequest(prompt_token_ids=history, max_new_tokens=20, ignore_eos=True)
                results.append(await complete(stub, request, 300))
                history += results[-1].token_ids
            return results

        conversations = await asyncio.gather(*(conversation(c) for c in range(4)))
    assert _outcomes(running) == {"local": 8, "declined": 4, "refused": 0}
    for results in conversations:
        for previous, result in zip(results, results[1:]):
            assert result.cached_prompt_tokens == (previous.prompt_tokens + 20 - 1) // BLOCK * BLOCK
