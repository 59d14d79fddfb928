"""Batching at the library level, without gRPC: sequences join and leave a running decode batch, a request's output
does not depend on what else is in its batch, and a finished sequence's memory is freed."""

from __future__ import annotations

import threading
import time

import torch

from disagg.config import BatchPolicy
from disagg.engine.batching import similar_length_batch, take_indices
from disagg.engine.decode import DecodeEngine, DecodeSequence, TokenEvent
from disagg.engine.prefill import PrefillEngine, PrefillJob, PrefillResult
from disagg.model.decode_batch import DecodeBatch, RecomputeBatch
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import OutputStream
from disagg.model.prefill import prefill
from disagg.model.sampling import SamplingParams

TEXTS = [
    "Hi",
    "The decode worker keeps every running sequence in one slab of keys and values, left padded.",
    "Batching improves utilization.",
    "One two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty",
]


def new_batch(lm: LoadedModel) -> DecodeBatch:
    layers, heads, head_dim = lm.kv_shape()
    return DecodeBatch(layers, heads, head_dim, lm.dtype, lm.device)


def prefilled(lm: LoadedModel, ids: list[int]):
    out = prefill(lm.model, [ids])[0]
    return out.kv, int(torch.argmax(out.logits))


def decode_alone(lm: LoadedModel, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens (prefill's first, then `steps` more) and each step's logits, with the sequence alone."""
    kv, first = prefilled(lm, ids)
    batch = new_batch(lm)
    batch.add("alone", kv, first)
    tokens, logits = [first], []
    for _ in range(steps):
        row = batch.step(lm.model)[0]
        logits.append(row)
        tokens.append(int(torch.argmax(row)))
        batch.set_last_tokens([tokens[-1]])
    return tokens, logits


def run_staggered(
    lm: LoadedModel,
    prompts: list[list[int]],
    steps: list[int],
    join_at: list[int],
    forced: list[list[int]] | None = None,
    on_step=None,
):
    """Drive one DecodeBatch as the engine does: sequence i joins before global step `join_at[i]` and leaves after
    `steps[i]` decode steps. Tokens are greedy, or taken from `forced[i]` (to keep rows in lockstep with a
    reference when logits may tie). Returns each sequence's tokens and per-step logits."""
    batch = new_batch(lm)
    tokens: dict[str, list[int]] = {}
    logits: dict[str, list[torch.Tensor]] = {}
    step = 0
    while step == 0 or len(batch):
        for i, ids in enumerate(prompts):
            if join_at[i] == step:
                kv, first = prefilled(lm, ids)
                first = forced[i][0] if forced else first
                batch.add(str(i), kv, first)
                tokens[str(i)], logits[str(i)] = [first], []
        rows = batch.step(lm.model)
        nexts = []
        for seq_id, row in zip(batch.seq_ids, rows):
            n = len(logits[seq_id])
            token = forced[int(seq_id)][n + 1] if forced else int(torch.argmax(row))
            logits[seq_id].append(row)
            tokens[seq_id].append(token)
            nexts.append(token)
        batch.set_last_tokens(nexts)
        if on_step:
            on_step(batch)
        for seq_id in list(batch.seq_ids):
            if len(logits[seq_id]) == steps[int(seq_id)]:
                batch.remove(seq_id)
        step += 1
    return batch, tokens, logits


def test_staggered_batch_gives_each_sequence_its_alone_output_exactly(llama_model):
    """Real weights in fp32: sequences of different lengths joining and leaving mid-batch decode exactly as alone."""
    prompts = [llama_model.tokenizer.encode(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    steps, join_at = [10, 6, 8, 5], [0, 2, 4, 4]
    sizes: list[int] = []
    batch, tokens, _ = run_staggered(llama_model, prompts, steps, join_at, on_step=lambda b: sizes.append(len(b)))
    for i, ids in enumerate(prompts):
        assert tokens[str(i)] == decode_alone(llama_model, ids, steps[i])[0], f"sequence {i}"
    assert max(sizes) == 4 and sizes[0] == 1  # really batched, and grew as sequences joined
    assert len(batch) == 0 and batch.kv_bytes == 0 and batch.length == 0


def test_staggered_batch_logits_match_alone_within_tolerance(gpt2_model):
    """Random weights can tie, so compare logits with every row fed the reference tokens."""
    prompts = [gpt2_model.tokenizer.encode(t) for t in TEXTS]  # 1, 18, 5 and 20 tokens
    # The 20-token row leaves early (its padding columns are trimmed away), then an 18-token row joins a batch
    # shorter than itself (every other row shifts right).
    steps, join_at = [7, 3, 5, 2], [0, 3, 1, 0]
    alone = [decode_alone(gpt2_model, ids, steps[i]) for i, ids in enumerate(prompts)]
    lengths: list[int] = []
    _, tokens, logits = run_staggered(
        gpt2_model, prompts, steps, join_at, forced=[a[0] for a in alone], on_step=lambda b: lengths.append(b.length)
    )
    assert lengths[2] < min(lengths[1], lengths[3])  # trimmed after the long row left, grown when another joined
    for i, (ref_tokens, ref_logits) in enumerate(alone):
        assert tokens[str(i)] == ref_tokens
        for got, want in zip(logits[str(i)], ref_logits, strict=True):
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), f"sequence {i}: {(got - want).abs().max()}"


def test_slab_memory_grows_with_the_batch_and_is_freed_when_it_empties(gpt2_model):
    batch = new_batch(gpt2_model)
    assert batch.kv_bytes == 0
    for i, text in enumerate(TEXTS):
        kv, first = prefilled(gpt2_model, gpt2_model.tokenizer.encode(text))
        batch.add(str(i), kv, first)
    batch.step(gpt2_model.model)
    layers, heads, head_dim = gpt2_model.kv_shape()
    assert batch.kv_shape() == (len(TEXTS), heads, batch.length, head_dim)
    assert batch.kv_bytes >= 2 * layers * len(TEXTS) * heads * batch.length * head_dim * 4
    for i in range(len(TEXTS)):
        batch.remove(str(i))
    assert (len(batch), batch.kv_bytes, batch.length) == (0, 0, 0)


def test_kv_cache_off_recomputes_the_same_logits(gpt2_model):
    prompts = [gpt2_model.tokenizer.encode(t) for t in TEXTS[:3]]
    cached, recomputed = new_batch(gpt2_model), RecomputeBatch(gpt2_model.device)
    for i, ids in enumerate(prompts):
        kv, first = prefilled(gpt2_model, ids)
        cached.add(str(i), kv, first)
        recomputed.add(str(i), ids, first)
    for _ in range(3):
        a, b = cached.step(gpt2_model.model), recomputed.step(gpt2_model.model)
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()
        nexts = torch.argmax(a, dim=-1).tolist()
        cached.set_last_tokens(nexts)
        recomputed.set_last_tokens(nexts)


class Collector:
    """Tokens the engine delivers, in arrival order, per request; thread-safe."""

    def __init__(self):
        self.events: list[tuple[str, TokenEvent]] = []
        self.done: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def sequence(self, lm: LoadedModel, request_id: str, ids: list[int], max_new_tokens: int) -> DecodeSequence:
        kv, first = prefilled(lm, ids)
        output = OutputStream(
            lm.tokenizer, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True), lm.eos_token_ids
        )
        output.replay([first])
        self.done[request_id] = threading.Event()

        def deliver(event: TokenEvent | BaseException) -> None:
            assert not isinstance(event, BaseException), event
            with self.lock:
                self.events.append((request_id, event))
            if event.finish_reason:
                self.done[request_id].set()

        return DecodeSequence(request_id, ids, output, kv, deliver)

    def tokens(self, request_id: str) -> list[int]:
        with self.lock:
            return [e.token for r, e in self.events if r == request_id]

    def wait(self, request_id: str, count: int = 0, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.done[request_id].is_set() and (not count or len(self.tokens(request_id)) < count):
            assert time.monotonic() < deadline, f"{request_id} stalled"
            time.sleep(0.01)


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_decode_engine_joins_mid_batch_streams_alone_output_and_frees_memory(llama_model):
    prompts = {name: llama_model.tokenizer.encode(t) for name, t in zip("abc", TEXTS)}
    lengths = {"a": 14, "b": 4, "c": 7}
    engine = DecodeEngine(llama_model, BatchPolicy(max_batch_size=8))
    engine.start()
    collector = Collector()
    try:
        engine.submit(collector.sequence(llama_model, "a", prompts["a"], lengths["a"]))
        collector.wait("a", count=3)
        engine.submit(collector.sequence(llama_model, "b", prompts["b"], lengths["b"]))
        engine.submit(collector.sequence(llama_model, "c", prompts["c"], lengths["c"]))
        for name in lengths:
            collector.wait(name)
        wait_until(lambda: engine.active == 0)
        assert engine.batch.kv_bytes == 0 and len(engine.batch) == 0
    finally:
        engine.stop()
    order = [r for r, _ in collector.events]
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")  # b joined while a was still running
    assert order.index("a") < order.index("b")
    for name, ids in prompts.items():
        expected = decode_alone(llama_model, ids, lengths[name] - 1)[0]
        assert [expected[0], *collector.tokens(name)] == expected, name
        assert collector.events[[r for r, _ in collector.events].index(name)][1].finish_reason is None
        assert [e for r, e in collector.events if r == name][-1].finish_reason == "length"


def test_decode_engine_cancel_leaves_the_batch_and_frees_memory(gpt2_model):
    engine = DecodeEngine(gpt2_model, BatchPolicy(max_batch_size=4))
    engine.start()
    collector = Collector()
    try:
        engine.submit(collector.sequence(gpt2_model, "long", gpt2_model.tokenizer.encode(TEXTS[1]), 500))
        engine.submit(collector.sequence(gpt2_model, "short", gpt2_model.tokenizer.encode(TEXTS[0]), 3))
        collector.wait("long", count=4)
        assert engine.batch.kv_bytes > 0
        engine.cancel("long")
        wait_until(lambda: engine.active == 0)
        assert engine.batch.kv_bytes == 0
    finally:
        engine.stop()
    assert collector.done["short"].is_set()
    assert 4 <= len(collector.tokens("long")) < 499 and not collector.done["long"].is_set()


def test_prefill_engine_batches_within_the_wait_window_and_token_budget(gpt2_model):
    prompts = [gpt2_model.tokenizer.encode(t) for t in TEXTS]
    longest = max(len(p) for p in prompts)
    # Room for two padded prompts of the longest per forward pass, and only prompts within 2x of each other's
    # length share one (1, 4, 18 and 24 tokens): "Hi" and "Batching..." go alone, the other two together.
    engine = PrefillEngine(gpt2_model, BatchPolicy(max_batch_size=8, wait_window_ms=300, token_budget=2 * longest))
    results: dict[int, PrefillResult] = {}
    arrived = threading.Event()

    def job(i: int) -> PrefillJob:
        output = OutputStream(
            gpt2_model.tokenizer, SamplingParams(max_new_tokens=4, ignore_eos=True), gpt2_model.eos_token_ids
        )

        def deliver(result: PrefillResult | BaseException) -> None:
            assert not isinstance(result, BaseException), result
            results[i] = result
            if len(results) == len(prompts):
                arrived.set()

        return PrefillJob(f"p{i}", prompts[i], output, deliver)

    engine.start()
    try:
        for i in range(len(prompts)):
            engine.submit(job(i))
        assert arrived.wait(120)
    finally:
        engine.stop()
    assert sorted(r.batch_size for r in results.values()) == [1, 1, 2, 2]
    for i, ids in enumerate(prompts):
        kv, first = prefilled(gpt2_model, ids)
        logits_alone = prefill(gpt2_model.model, [ids])[0].logits
        logits_batched = prefill(gpt2_model.model, prompts)[i].logits
        assert torch.allclose(logits_alone, logits_batched, atol=1e-4, rtol=1e-4)
        assert results[i].kv[0][0].shape == kv[0][0].shape
        assert torch.allclose(results[i].kv[0][0], kv[0][0], atol=1e-4)


def test_engine_thread_hands_freed_memory_back_once_per_idle_spell(monkeypatch):
    """After work, an idle engine trims the C allocator once (not between busy steps, not again while idle)."""
    from disagg.engine import thread as engine_thread

    trims: list[float] = []
    monkeypatch.setattr(engine_thread, "release_free_memory", lambda: trims.append(time.monotonic()))

    class Counter(engine_thread.EngineThread[int]):
        def __init__(self):
            super().__init__(BatchPolicy())
            self.ran: list[float] = []

        def run_once(self) -> None:
            with self.lock:
                self.waiting.popleft()
            self.ran.append(time.monotonic())

    engine = Counter()
    engine.start()
    try:
        time.sleep(2 * engine_thread.IDLE_TRIM_SECONDS)
        assert trims == []  # no work yet: nothing to trim
        for _ in range(3):  # three busy steps in a row, then idle
            engine.submit(1)
        wait_until(lambda: len(trims) == 1)
        time.sleep(3 * engine_thread.IDLE_TRIM_SECONDS)
        assert len(trims) == 1 and len(engine.ran) == 3
        assert trims[0] - engine.ran[-1] >= engine_thread.IDLE_TRIM_SECONDS * 0.9
        engine.submit(1)
        wait_until(lambda: len(trims) == 2)
    finally:
        engine.stop()


def test_a_slab_grown_inside_a_step_still_takes_joiners_and_leavers(gpt2_model):
    """step() grows the slab when it was not planned for that many steps; that happens under inference mode,
    and the grown slab must still take in-place writes from add and remove outside it."""
    from disagg.model.decode_batch import _GROW_COLUMNS

    layers, heads, head_dim = gpt2_model.kv_shape()
    batch = DecodeBatch(layers, heads, head_dim, gpt2_model.dtype, gpt2_model.device)
    ids = gpt2_model.tokenizer.encode(TEXTS[0])
    kv, first = prefilled(gpt2_model, ids)
    batch.add("a", kv, first)
    batch.add("b", kv, first)
    for _ in range(_GROW_COLUMNS + 2):  # past the columns add() left room for: step() reallocates
        batch.set_last_tokens(batch.step(gpt2_model.model).argmax(-1).tolist())
    batch.remove("a")  # in-place writes (b's row moves into a's) into the slab step() made
    batch.add("c", kv, first)
    assert len(batch) == 2 and batch.step(gpt2_model.model).shape[0] == 2


def test_similar_length_batch_keeps_short_prompts_out_of_a_long_ones_padding():
    # The oldest always leads; a 960-token prompt and 64-token ones never share a padded forward pass.
    lengths = [64, 960, 64, 70, 900, 40]
    assert similar_length_batch(lengths, token_budget=8192, max_prompts=64) == [0, 2, 3, 5]
    assert similar_length_batch([960, 64, 900, 64], token_budget=8192, max_prompts=64) == [0, 2]
    # Within a factor of 2 of both the shortest and the longest taken so far.
    assert similar_length_batch([100, 60, 190, 45], token_budget=8192, max_prompts=64) == [0, 1]
    # The padded budget and the count bound the batch; the oldest goes even when it alone exceeds the budget.
    assert similar_length_batch([100] * 5, token_budget=300, max_prompts=64) == [0, 1, 2]
    assert similar_length_batch([100] * 5, token_budget=8192, max_prompts=2) == [0, 1]
    assert similar_length_batch([5000, 100], token_budget=1000, max_prompts=64) == [0]
    # The caller's own limit (free decode rows) is asked only about prompts that fit otherwise.
    asked: list[int] = []
    assert similar_length_batch([10, 500, 10, 10], 8192, 64, fits=lambda i: asked.append(i) or i != 2) == [0, 3]
    assert asked == [0, 2, 3]
    assert similar_length_batch([10, 10], 8192, 64, fits=lambda i: False) == []
    assert similar_length_batch([], 8192, 64) == []


def test_take_indices_keeps_the_rest_in_order():
    assert take_indices(list("abcdef"), [0, 2, 3]) == (list("acd"), list("bef"))


def test_fused_activations_keep_greedy_output_and_logits(gpt2_model):
    from disagg.model.fused import fuse_activations
    from disagg.model.loading import load_model

    served = load_model("distilgpt2", load_format="dummy", seed=0)  # a copy: the session's model stays as loaded
    assert fuse_activations(served.model) == 6 and fuse_activations(served.model) == 0
    ids = torch.tensor([gpt2_model.tokenizer.encode(TEXTS[1])])
    with torch.inference_mode():
        fused, plain = served.model(ids).logits, gpt2_model.model(ids).logits
        assert torch.allclose(fused, plain, atol=1e-4, rtol=1e-4)
        kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        assert torch.equal(served.model.generate(ids, **kwargs), gpt2_model.model.generate(ids, **kwargs))
