"""KV admission on the decode worker (in process): one budget for waiting, pushed and running sequences, reserved
before allocation and released exactly once; the engine never answers late or holds the event loop's lock."""

from __future__ import annotations

import threading

import pytest
import torch

from disagg.config import BatchPolicy
from disagg.engine.decode import DecodeEngine, DecodeSequence, DecodeSetup, TokenEvent
from disagg.errors import Overloaded
from disagg.kv.budget import KvBudget
from disagg.model.output_stream import OutputStream
from disagg.model.sampling import SamplingParams
from tests.test_batching import TEXTS, Collector, wait_until

MB = 1 << 20


def test_a_refusal_neither_widens_nor_shrinks_the_budget():
    budget = KvBudget(10 * MB)
    first = budget.reserve(6 * MB, "a")
    for _ in range(3):  # refused again and again: nothing booked for it
        with pytest.raises(Overloaded, match="KV budget full"):
            budget.reserve(5 * MB, "b")
        assert budget.used == 6 * MB
    fits = budget.reserve(4 * MB, "c")  # exactly what is left
    assert budget.used == 10 * MB
    with pytest.raises(Overloaded):
        budget.reserve(1, "d")
    fits.release()
    fits.release()  # idempotent: a second way out releases nothing more
    first.release()
    assert budget.used == 0
    with pytest.raises(Overloaded):
        budget.reserve(10 * MB + 1, "too big")
    budget.reserve(10 * MB, "all").release()
    assert budget.used == budget.staged == budget.slab == 0


def test_a_pushed_cache_grows_to_its_sequence_and_the_slab_takes_reservations_over():
    budget = KvBudget(10 * MB)
    pushed = budget.reserve(2 * MB, "push")
    pushed.resize(5 * MB)  # its Decode call: prompt + max_new_tokens
    other = budget.reserve(3 * MB, "other")
    with pytest.raises(Overloaded):
        pushed.resize(8 * MB)
    assert budget.used == 8 * MB
    assert not budget.join_slab(9 * MB, [pushed])  # 3 staged + 9 slab > 10: it waits
    assert budget.join_slab(6 * MB, [pushed]) and budget.used == 9 * MB and budget.slab == 6 * MB
    pushed.release()  # in the slab: the slab's bytes account for it until the engine resizes the slab
    assert budget.used == 9 * MB
    budget.set_slab(0)
    other.release()
    assert budget.used == 0


def _sequence(lm, collector: Collector, name: str, text: str, tokens: int, budget: KvBudget | None) -> DecodeSequence:
    seq = collector.sequence(lm, name, lm.tokenizer.encode(text), tokens)
    if budget is not None:
        per_token = 2 * lm.kv_shape()[0] * lm.kv_shape()[1] * lm.kv_shape()[2] * lm.dtype.itemsize
        seq.reservation = budget.reserve(per_token * (len(seq.context) + tokens), name)
    return seq


def test_the_slab_never_holds_more_than_the_budget_and_waiting_sequences_join_later(gpt2_model):
    per_token = 2 * 6 * 12 * 64 * 4  # distilgpt2, fp32
    budget = KvBudget(160 * per_token)  # room for ~3 of these sequences at once, not 8
    samples: list[int] = []
    engine = DecodeEngine(gpt2_model, BatchPolicy(max_batch_size=16), DecodeSetup(budget=budget))
    collector = Collector()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(budget.used)
            assert engine.batch.kv_bytes <= budget.limit
            stop.wait(0.002)

    sampler = threading.Thread(target=sample)
    engine.start()
    sampler.start()
    try:
        seqs = []
        for i in range(8):
            text = TEXTS[i % len(TEXTS)]
            while True:  # as the servicer does: reserve (or be refused) before submitting
                try:
                    seqs.append(_sequence(gpt2_model, collector, f"s{i}", text, 20, budget))
                    break
                except Overloaded:
                    wait_until(lambda: budget.used < budget.limit // 2)
            engine.submit(seqs[-1])
        for seq in seqs:
            collector.wait(seq.request_id)
            assert seq.reservation is not None
            seq.reservation.release()
        wait_until(lambda: engine.active == 0)
    finally:
        stop.set()
        sampler.join()
        engine.stop()
    assert samples and max(samples) <= budget.limit
    assert all(len(collector.tokens(s.request_id)) == 19 for s in seqs)  # 20 with the prefill's first token
    assert budget.used == 0 and engine.batch.kv_bytes == 0


def test_an_admission_failure_reaches_its_stream_at_once_and_the_batch_goes_on(gpt2_model):
    engine = DecodeEngine(gpt2_model, BatchPolicy(max_batch_size=4))
    collector = Collector()
    failures: list[BaseException] = []
    got_failure = threading.Event()
    engine.start()
    try:
        good = collector.sequence(gpt2_model, "good", gpt2_model.tokenizer.encode(TEXTS[0]), 30)
        engine.submit(good)
        collector.wait("good", count=3)
        output = OutputStream(gpt2_model.tokenizer, SamplingParams(max_new_tokens=5), gpt2_model.eos_token_ids)
        output.replay([1])
        wrong = [(torch.zeros(1, 7, 4, 64), torch.zeros(1, 7, 4, 64))] * 6  # 7 heads: cannot go into the slab

        def deliver(event: TokenEvent | BaseException) -> None:
            if isinstance(event, BaseException):
                failures.append(event)
                got_failure.set()

        engine.submit(DecodeSequence("bad", [1, 2, 3, 4], output, wrong, deliver))
        assert got_failure.wait(30), "the failed admission was never answered"
        collector.wait("good")
    finally:
        engine.stop()
    assert isinstance(failures[0], RuntimeError) and len(failures) == 1
    assert len(collector.tokens("good")) == 29  # the running stream finished, unharmed


def test_one_wake_up_per_step_for_all_its_tokens(gpt2_model):
    calls: list[int] = []
    lock = threading.Lock()

    def notify(deliver) -> None:
        with lock:
            calls.append(1)
        deliver()

    engine = DecodeEngine(gpt2_model, BatchPolicy(max_batch_size=8), DecodeSetup(notify=notify))
    collector = Collector()
    engine.start()
    try:
        for i in range(4):
            engine.submit(collector.sequence(gpt2_model, f"n{i}", gpt2_model.tokenizer.encode(TEXTS[0]), 10))
        for i in range(4):
            collector.wait(f"n{i}")
    finally:
        engine.stop()
    tokens = sum(len(collector.tokens(f"n{i}")) for i in range(4))
    assert tokens == 36 and len(calls) < tokens  # steps, not tokens (the 4 may join in one step or several)
