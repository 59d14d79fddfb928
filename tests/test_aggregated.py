"""Aggregated mode: prefill and decode in one continuous-batching engine (`disagg decode --aggregated`), the
baseline disaggregation is compared with. Greedy output is generate()'s, sequences joining and leaving mid-batch
keep their alone-output, cancellation frees the KV, and a cluster of aggregated workers behind the gateway gives
the disaggregated cluster's tokens."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch

from disagg.config import BatchPolicy
from disagg.engine.aggregated import AggregatedEngine, Prompt
from disagg.engine.decode import DecodeSequence, DecodeSetup, TokenEvent
from disagg.kv.budget import KvBudget
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import OutputStream
from disagg.model.sampling import SamplingParams
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import channel, complete
from tests.conftest import GPT2_ARGS, RunningCluster, start_cluster
from tests.reliability_helpers import wait_idle, worker_load
from tests.test_batching import Collector as BatchingCollector
from tests.test_batching import wait_until

TEXTS = [
    "Hi",
    "The decode worker keeps every running sequence in one slab of keys and values, left padded.",
    "Batching improves utilization.",
]


def reference(lm: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    tensor = torch.tensor([ids])
    out = lm.model.generate(
        tensor,
        attention_mask=torch.ones_like(tensor),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=lm.tokenizer.eos_token_id,
    )
    return out[0, len(ids) :].tolist()


class Collector(BatchingCollector):
    """Tokens the engine delivers (first tokens included), in arrival order, per request; thread-safe."""

    def prompt(self, lm: LoadedModel, request_id: str, ids: list[int], max_new_tokens: int, budget=None) -> Prompt:
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        self.done[request_id] = threading.Event()

        def deliver(event: TokenEvent | BaseException) -> None:
            assert not isinstance(event, BaseException), event
            with self.lock:
                self.events.append((request_id, event))
            if event.finish_reason:
                self.done[request_id].set()

        reservation = None
        if budget is not None:
            layers, heads, head_dim = lm.kv_shape()
            reservation = budget.reserve(2 * layers * heads * head_dim * (len(ids) + max_new_tokens) * 4)
        output = OutputStream(lm.tokenizer, params, lm.eos_token_ids)
        return Prompt([DecodeSequence(request_id, ids, output, None, deliver, reservation=reservation)])


@pytest.fixture
def engine_of() -> Iterator:
    engines: list[AggregatedEngine] = []

    def make(lm: LoadedModel, **kwargs) -> AggregatedEngine:
        budget = kwargs.pop("budget", None)
        engine = AggregatedEngine(lm, BatchPolicy(**kwargs), DecodeSetup(budget=budget))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        if engine._thread.ident is not None:  # (started)
            engine.stop()


@pytest.mark.parametrize("model", ["gpt2_model", "llama_model"])
def test_greedy_matches_generate_with_sequences_joining_and_leaving(request, engine_of, model):
    """a runs alone, then b and c arrive (prefilled between a's decode steps) and join; b leaves first."""
    lm: LoadedModel = request.getfixturevalue(model)
    prompts = {name: lm.tokenizer.encode(t) for name, t in zip("abc", TEXTS)}
    lengths = {"a": 16, "b": 4, "c": 9}
    engine = engine_of(lm, max_batch_size=8)
    engine.start()
    collector = Collector()
    engine.submit_prompt(collector.prompt(lm, "a", prompts["a"], lengths["a"]))
    collector.wait("a", count=3)
    engine.submit_prompt(collector.prompt(lm, "b", prompts["b"], lengths["b"]))
    engine.submit_prompt(collector.prompt(lm, "c", prompts["c"], lengths["c"]))
    for name in lengths:
        collector.wait(name)
    wait_until(lambda: engine.active == 0)
    assert engine.batch.kv_bytes == 0 and len(engine.batch) == 0 and engine.budget.used == 0
    order = [r for r, _ in collector.events]
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")  # b started while a was still running
    for name, ids in prompts.items():
        assert collector.tokens(name) == reference(lm, ids, lengths[name]), name
        assert [e.finish_reason for r, e in collector.events if r == name][-1] == "length"


def test_prefill_takes_prompts_within_the_token_budget_and_free_rows(gpt2_model, engine_of):
    """Not started: the engine's choice of prompts for one step, oldest first."""
    engine = engine_of(gpt2_model, max_batch_size=3, token_budget=40)
    collector = Collector()
    for name, n_tokens in [("p0", 15), ("p1", 20), ("p2", 30), ("p3", 5), ("p4", 5)]:
        engine.submit_prompt(collector.prompt(gpt2_model, name, [1] * n_tokens, 2))
    first = engine._take_prompts()
    assert [p.sequences[0].request_id for p in first] == ["p0", "p1"]  # 2 x 20 padded tokens; 3 x 30 is over
    second = engine._take_prompts()
    assert [p.sequences[0].request_id for p in second] == ["p2"]  # longer than the budget allows with another
    engine.waiting.extend(s for p in first + second for s in p.sequences)  # (as if prefilled: 3 rows taken)
    assert engine._take_prompts() == []  # no free row in the batch: p3 waits
    assert engine.queued == 5


def test_long_prompt_budget_one_step_each(gpt2_model, engine_of):
    """A prompt longer than the token budget is prefilled alone, in one forward pass (no chunked prefill)."""
    engine = engine_of(gpt2_model, token_budget=8)
    collector = Collector()
    ids = gpt2_model.tokenizer.encode(TEXTS[1])
    assert len(ids) > 8
    engine.submit_prompt(collector.prompt(gpt2_model, "long", ids, 3))
    engine.start()
    collector.wait("long")
    assert engine.last_prefill is not None and engine.last_prefill.tokens == len(ids)
    assert collector.tokens("long") == reference(gpt2_model, ids, 3)


def test_cancel_frees_kv_running_and_queued(gpt2_model, engine_of):
    budget = KvBudget(64 << 20)
    engine = engine_of(gpt2_model, max_batch_size=4, budget=budget)
    collector = Collector()
    queued = collector.prompt(gpt2_model, "queued", gpt2_model.tokenizer.encode(TEXTS[2]), 50, budget)
    engine.submit_prompt(queued)
    engine.cancel("queued")  # before the engine ever runs: dropped from the prompt queue, never prefilled
    long = collector.prompt(gpt2_model, "long", gpt2_model.tokenizer.encode(TEXTS[1]), 500, budget)
    engine.submit_prompt(long)
    reservations = [s.reservation for p in (queued, long) for s in p.sequences]
    engine.start()
    collector.wait("long", count=4)
    assert engine.batch.kv_bytes > 0 and budget.used > 0
    engine.cancel("long")
    wait_until(lambda: engine.active == 0)
    for reservation in reservations:  # (what the servicer does when its call ends)
        reservation.release()
    assert engine.batch.kv_bytes == 0 and len(engine.batch) == 0 and budget.used == 0
    assert collector.tokens("queued") == [] and not collector.done["long"].is_set()
    assert 4 <= len(collector.tokens("long")) < 500


def test_finished_at_first_token_never_joins(gpt2_model, engine_of):
    engine = engine_of(gpt2_model)
    engine.start()
    collector = Collector()
    engine.submit_prompt(collector.prompt(gpt2_model, "one", gpt2_model.tokenizer.encode(TEXTS[0]), 1))
    collector.wait("one")
    wait_until(lambda: engine.active == 0)
    assert [e.finish_reason for _, e in collector.events] == ["length"] and engine.batch.kv_bytes == 0


# --- through the gateway ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aggregated_cluster() -> Iterator[RunningCluster]:
    # 8 MiB of KV each: ~227 distilgpt2 tokens (36 KiB a token in fp32)
    running = start_cluster(GPT2_ARGS, decode_args=["--kv-budget-mb", "8"], aggregated_workers=2)
    yield running
    running.cluster.stop()


async def _generate(address: str, **fields):
    async with channel(address) as ch:
        return await complete(gateway_pb2_grpc.GatewayStub(ch), gateway_pb2.GenerateRequest(**fields), timeout=300)


PROMPTS = ["Q: Explain why batching improves GPU utilization.\nA:", "Hello", TEXTS[1]]


async def test_aggregated_cluster_greedy_equals_disaggregated(aggregated_cluster, gpt2_cluster):
    fields = [dict(prompt=p, max_new_tokens=12, ignore_eos=True) for p in PROMPTS]
    together = await asyncio.gather(*(_generate(aggregated_cluster.address, **f) for f in fields))
    apart = await asyncio.gather(*(_generate(gpt2_cluster.address, **f) for f in fields))
    for one, other in zip(together, apart, strict=True):
        assert one.token_ids == other.token_ids and one.text == other.text
        assert one.finish_reason == other.finish_reason == "length"
        assert (one.prompt_tokens, one.completion_tokens) == (other.prompt_tokens, 12)
    n3 = dict(prompt=PROMPTS[0], max_new_tokens=5, ignore_eos=True, n=3, temperature=1.0, seed=7)
    assert (await _generate(aggregated_cluster.address, **n3)).token_ids == (
        await _generate(gpt2_cluster.address, **n3)
    ).token_ids  # n > 1 from one prefill, seeded sampling: the same sequences
    await wait_idle(aggregated_cluster.cluster.aggregated)


async def test_aggregated_cluster_cancel_frees_kv(aggregated_cluster):
    async with channel(aggregated_cluster.address) as ch:
        call = gateway_pb2_grpc.GatewayStub(ch).Generate(
            gateway_pb2.GenerateRequest(prompt=PROMPTS[0], max_new_tokens=150, ignore_eos=True), timeout=300
        )
        received = 0
        async for response in call:
            received += len(response.token_ids)
            if received >= 3:
                break
        loads = [await worker_load(c.address) for c in aggregated_cluster.cluster.aggregated]
        assert sum(load.kv_bytes for load in loads) > 0 and sum(load.active_sequences for load in loads) == 1
        call.cancel()
    await wait_idle(aggregated_cluster.cluster.aggregated)


async def test_aggregated_workers_refuse_over_their_kv_budget(aggregated_cluster):
    """Refused before any work by both workers (900 tokens need ~32 MiB): RESOURCE_EXHAUSTED with every reason."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _generate(aggregated_cluster.address, prompt=PROMPTS[0], max_new_tokens=900, ignore_eos=True)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "every healthy aggregated worker refused" in refused.value.details()
    assert refused.value.details().count("KV budget full") == 2
    assert len((await _generate(aggregated_cluster.address, prompt="Hi", max_new_tokens=4)).token_ids) == 4
    await wait_idle(aggregated_cluster.cluster.aggregated)


def test_flags_of_the_aggregated_role():
    from disagg import config as cfg
    from disagg.tools.cli import build_parser

    worker = cfg.worker_config(build_parser().parse_args(["decode", "--aggregated", "--token-budget", "512"]))
    assert worker.aggregated and worker.batch.token_budget == 512 and worker.batch.max_batch_size == 64
    assert not cfg.worker_config(build_parser().parse_args(["decode"])).aggregated
    gateway = cfg.gateway_config(build_parser().parse_args(["gateway", "--aggregated", "a:1,b:2"]))
    assert gateway.aggregated == ("a:1", "b:2")
    up = build_parser().parse_args(["up", "--aggregated", "--workers", "2"])
    assert up.aggregated and up.workers == 2
