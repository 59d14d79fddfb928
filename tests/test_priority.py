"""Request priority in the queues (disagg.engine.queueing): lower value served first, FIFO among equals, in the
queue discipline itself and in the prefill engine's queue (held, then drained one forward pass at a time)."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.config import BatchPolicy
from disagg.engine.prefill import PrefillEngine, PrefillJob, PrefillResult
from disagg.engine.queueing import PriorityQueue
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import OutputStream
from disagg.model.sampling import SamplingParams


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
