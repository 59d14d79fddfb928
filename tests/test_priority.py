"""Request priority in the queues (disagg.engine.queueing): lower value served first, FIFO among equals, in the
queue discipline itself, the prefill engine's queue (held, then drained one forward pass at a time) and the
gateway's admission."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from disagg.config import BatchPolicy
from disagg.engine.prefill import PrefillEngine, PrefillJob, PrefillResult
from disagg.engine.queueing import PriorityQueue
from disagg.errors import Overloaded
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import OutputStream
from disagg.model.sampling import SamplingParams
from gateway.admission import AdmissionGate


@dataclass
class Item:
    name: str
    priority: int = 0


def test_lower_priority_value_first_and_fifo_among_equals():
    queue: PriorityQueue[Item] = PriorityQueue()
    for name, priority in [("a", 0), ("b", 5), ("c", -1), ("d", 0), ("e", 5), ("f", -1), ("g", 0)]:
        queue.append(Item(name, priority))
    assert [i.name for i in queue] == ["c", "f", "a", "d", "g", "b", "e"]
    assert queue.popleft().name == "c" and len(queue) == 6
    rebuilt = PriorityQueue(i for i in queue if i.name != "d")  # (a queue filtered the way the engines do)
    rebuilt.append(Item("h", 0))  # arrives after every 0 already there
    assert [i.name for i in rebuilt] == ["f", "a", "g", "h", "b", "e"]
    assert PriorityQueue([1, 2, 3]).popleft() == 1  # items without a priority: plain FIFO


def test_the_prefill_queue_serves_higher_priority_first(gpt2_model: LoadedModel):
    """Six prompts queued while the engine is held: one forward pass each (max batch 1) in priority order, and
    in arrival order within a priority."""
    engine = PrefillEngine(gpt2_model, BatchPolicy(max_batch_size=1))
    served: list[str] = []
    arrivals = [("low-1", 10), ("mid-1", 0), ("high-1", -5), ("low-2", 10), ("mid-2", 0), ("high-2", -5)]
    prompt = gpt2_model.tokenizer.encode("Batching improves utilization.")

    def job(name: str, priority: int) -> PrefillJob:
        params = SamplingParams(max_new_tokens=2, priority=priority)
        output = OutputStream(gpt2_model.tokenizer, params, gpt2_model.eos_token_ids)

        def deliver(result: PrefillResult | BaseException) -> None:
            assert not isinstance(result, BaseException), result
            served.append(name)

        return PrefillJob(name, prompt, output, deliver)

    for name, priority in arrivals:
        engine.submit(job(name, priority))
    assert [j.request_id for j in engine.waiting] == ["high-1", "high-2", "mid-1", "mid-2", "low-1", "low-2"]
    engine.run_once()
    engine.submit(job("high-3", -5))  # arrives while the others wait: goes before every lower priority
    while engine.waiting:
        engine.run_once()
    assert served == ["high-1", "high-2", "high-3", "mid-1", "mid-2", "low-1", "low-2"]


async def test_gateway_admission_hands_free_places_out_in_priority_order():
    """One place, three may wait: they get it by priority (FIFO among equals), a fourth is refused, a waiter that
    gives up leaves the queue."""
    gate = AdmissionGate(max_inflight=1, max_waiting=3)
    order: list[str] = []
    release = asyncio.Event()

    async def request(name: str, priority: int) -> None:
        async with gate.admitted(priority):
            order.append(name)
            if name == "first":
                await release.wait()

    first = asyncio.create_task(request("first", 0))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(request(n, p)) for n, p in [("low", 5), ("high-1", -1), ("high-2", -1)]]
    await asyncio.sleep(0)
    assert gate.in_flight == 1 and gate.waiting == 3
    with pytest.raises(Overloaded, match="--admission-queue"):
        async with gate.admitted(-100):
            pass
    waiting[0].cancel()  # "low" gives up
    await asyncio.sleep(0)
    assert gate.waiting == 2
    late = asyncio.create_task(request("late", 5))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *waiting[1:], late)
    assert order == ["first", "high-1", "high-2", "late"]
    assert gate.in_flight == 0 and gate.waiting == 0
    no_queue = AdmissionGate(max_inflight=0)
    with pytest.raises(Overloaded):
        async with no_queue.admitted():
            pass
