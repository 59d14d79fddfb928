"""Decode worker engine: continuous batching over handed-over sequences.

Sequences wait until their KV cache has fully arrived (the servicer submits them only then), join the running
batch at the next step (as many as the KV budget lets the slab grow for, with one reallocation for all of them),
stream one token per step, and leave the batch the step they finish or are cancelled.

The engine thread holds the lock that `submit()` and `cancel()` take from the event loop only to pop or filter
the queue: copying caches into the slab, the forward pass and trimming memory all happen outside it. Each step's
tokens reach the event loop in one wake-up (`notify`), not one per token.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from disagg.config import MODEL_RUNNERS, BatchPolicy
from disagg.engine.thread import EngineThread
from disagg.kv.budget import KvBudget, Reservation
from disagg.model.decode_batch import DecodeBatch, RecomputeBatch
from disagg.model.grammar import SequenceGrammar, mask_rows
from disagg.model.kv_layers import KvLayers
from disagg.model.lm_head import greedy_head
from disagg.model.loading import LoadedModel
from disagg.model.logprobs import TokenLogprobs, batch_logprobs
from disagg.model.native import NativeModel, native_family
from disagg.model.output_stream import OutputStream
from disagg.model.paged_batch import DEFAULT_BLOCK_TOKENS, PagedDecodeBatch
from disagg.model.sampling import SamplingParams, sample_batch

# Columns a roomy slab keeps beyond the longest remaining run: a joiner that needs a few more does not reallocate.
_SPARE_COLUMNS = 64
JOIN_TOKENS_PER_STEP = 1024  # DecodeEngine.join_tokens_per_step
KvBatch = DecodeBatch | PagedDecodeBatch  # the batches that hold KV (RecomputeBatch recomputes it)


@dataclass
class TokenEvent:
    token: int
    text: str
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None  # when the sequence's sampling asked for them


@dataclass
class DecodeSequence:
    """A sequence handed over by prefill: its output so far, its KV cache, and where its tokens go."""

    request_id: str
    context: list[int]  # prompt + generated tokens except the newest (whose KV is not computed yet)
    output: OutputStream
    kv: KvLayers | None
    deliver: Callable[[TokenEvent | BaseException], object]  # called through the engine's `notify`
    reservation: Reservation | None = None  # its share of the KV budget (the servicer releases it)
    enqueued_at: float = field(default_factory=time.monotonic)
    # time.monotonic() stamps and step batch sizes, read by disagg.telemetry once the request ends.
    admitted_at: float = 0.0  # left the queue for the running batch
    kv_loaded_at: float = 0.0  # its KV cache was copied into the batch
    last_token_at: float = 0.0  # its latest token was sampled
    batch_sizes: list[int] = field(default_factory=list)  # running batch size at each step it took part in

    @property
    def priority(self) -> int:
        """Lower joins the batch earlier (disagg.engine.queueing)."""
        return self.output.params.priority


@dataclass
class StepStats:
    batch_size: int
    joined: int
    finished: int
    seconds: float


def _call_here(deliver: Callable[[], object]) -> object:
    return deliver()


@dataclass(frozen=True)
class DecodeSetup:
    """What a decode engine is built with besides its model and batch policy; the aggregated engine (a decode
    engine that also prefills) takes the same."""

    kv_cache: bool = True  # False: every step recomputes the sequences' KV (the baseline without a cache)
    budget: KvBudget | None = None  # the worker's KV budget (None: unlimited, still counted)
    # notify(fn) runs fn where the sequences' `deliver` callbacks belong (the servicer passes its event loop's
    # call_soon_threadsafe; by default they are called on the engine thread)
    notify: Callable[[Callable[[], object]], object] = _call_here
    # how greedy rows pick their token (disagg.model.lm_head.greedy_head: "auto", "bf16", "off")
    greedy_screen: str = "auto"
    # "native" steps GPT-2 and Llama models with the project's forward pass over a paged KV pool
    # (disagg/model/native.py, paged_batch.py; other architectures keep HF's), "hf" with HF's modules over the
    # left-padded slab
    model_runner: str = "native"


class DecodeEngine(EngineThread[DecodeSequence]):
    name = "decode"
    # KV tokens copied into the pool per step while others are decoding: joiners beyond it wait a step, so a burst of
    # long handoffs is spread over steps instead of stalling every running stream for all of their copies at once
    # (one joiner always goes; an empty batch takes them all)
    join_tokens_per_step = JOIN_TOKENS_PER_STEP

    def __init__(self, lm: LoadedModel, policy: BatchPolicy, setup: DecodeSetup | None = None):
        super().__init__(policy)
        setup = setup or DecodeSetup()
        if setup.model_runner not in MODEL_RUNNERS:
            raise ValueError(f"model_runner must be one of {MODEL_RUNNERS}, got {setup.model_runner!r}")
        self.lm, self.kv_cache, self.notify = lm, setup.kv_cache, setup.notify
        self.head = greedy_head(lm.model, setup.greedy_screen)
        self.budget = setup.budget if setup.budget is not None else KvBudget(0)
        self.batch: KvBatch | RecomputeBatch = self._new_batch(setup.model_runner)
        self.running: dict[str, DecodeSequence] = {}
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self.last_step: StepStats | None = None

    def _new_batch(self, model_runner: str) -> KvBatch | RecomputeBatch:
        lm = self.lm
        if not self.kv_cache:
            return RecomputeBatch(lm.device)
        layers, heads, head_dim = lm.kv_shape()
        if model_runner == "hf" or native_family(lm.model) is None:
            return DecodeBatch(layers, heads, head_dim, lm.dtype, lm.device)
        block_bytes = 2 * layers * heads * DEFAULT_BLOCK_TOKENS * head_dim * lm.dtype.itemsize
        max_blocks = max(1, self.budget.limit // block_bytes) if self.budget.limit else 0
        return PagedDecodeBatch(NativeModel(lm.model), lm.dtype, lm.device, max_blocks=max_blocks)

    def busy(self) -> bool:
        return bool(self.running)

    @property
    def active(self) -> int:
        """Sequences waiting or running (the "active sequences" gauge)."""
        return len(self.running) + len(self.waiting)

    def cancel(self, request_id: str) -> None:
        """Thread-safe: drop the sequence at the next step and free its KV (client gone, deadline passed)."""
        with self._cancel_lock:
            self._cancelled.add(request_id)
        with self.lock:
            self.lock.notify_all()

    def _apply_cancellations(self) -> set[str]:
        """Drop the sequences cancelled since the last step; returns their ids (for subclasses' own queues)."""
        with self._cancel_lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return cancelled
        with self.lock:
            self.waiting = type(self.waiting)(s for s in self.waiting if s.request_id not in cancelled)
        for request_id in cancelled & self.running.keys():
            self._leave(request_id)
        return cancelled

    @staticmethod
    def _steps_left(seq: DecodeSequence) -> int:
        return max(1, seq.output.params.max_new_tokens - len(seq.output.tokens))

    def _plan(self, joining: list[DecodeSequence]) -> tuple[int, int] | list[int] | None:
        """How the batch takes `joining`, if the KV budget lets it (booked then), else None: for the slab (rows,
        columns), for the pool each joiner's final KV length."""
        if isinstance(self.batch, PagedDecodeBatch):
            return self._plan_paged(self.batch, joining)
        return self._plan_slab(cast(DecodeBatch, self.batch), joining)

    def _plan_paged(self, batch: PagedDecodeBatch, joining: list[DecodeSequence]) -> list[int] | None:
        """Each joiner's KV length at its last step, if the blocks of every row's final length fit the budget (a
        promise no later step breaks; the pool takes them as the rows grow)."""
        finals = [len(s.context) + self._steps_left(s) for s in joining]
        committed = batch.blocks_for([*batch.final_tokens, *finals]) * batch.bytes_per_block
        if not batch.seq_ids and len(joining) == 1 and self.budget.limit:
            # its reservation fit the limit; only its last block's unused slots may not: a lone sequence always runs
            committed = min(committed, self.budget.limit)
        return finals if self.budget.join_slab(committed, [s.reservation for s in joining]) else None

    def _plan_slab(self, batch: DecodeBatch, joining: list[DecodeSequence]) -> tuple[int, int] | None:
        """(rows, columns) of the slab with `joining` in it, if the KV budget lets it grow that far: with room to
        spare (rows doubled, columns for the longest remaining run plus a margin) when that fits, else exact."""
        steps = max(self._steps_left(s) for s in [*self.running.values(), *joining])
        rows, columns = batch.plan([len(s.context) for s in joining], steps)
        have_rows, have_columns = batch._capacity()
        candidates = [
            (min(self.policy.max_batch_size, max(rows, 2 * have_rows)), columns + _SPARE_COLUMNS),
            (rows, columns),
        ]
        if rows <= have_rows and columns <= have_columns and max(len(s.context) for s in joining) <= batch.length:
            candidates = [(have_rows, have_columns)]  # fits as it is: no reallocation
        reservations = [s.reservation for s in joining]
        for candidate in candidates:
            if self.budget.join_slab(batch.bytes_for(*candidate), reservations):
                return candidate
        return None

    def _admit(self) -> int:
        """Move waiting sequences into the batch: the longest prefix of the queue the KV budget admits."""
        with self.lock:  # only to look at the queue; submit() appends meanwhile, nothing else changes it
            candidates = list(itertools.islice(self.waiting, max(0, self.policy.max_batch_size - len(self.running))))
        if not candidates:
            return 0
        if isinstance(self.batch, PagedDecodeBatch) and self.running:  # paced: see JOIN_TOKENS_PER_STEP
            candidates = _paced(candidates, self.join_tokens_per_step)
        joining: list[DecodeSequence] = []
        plan: tuple[int, int] | list[int] | None = None
        if self.kv_cache:
            for n in range(len(candidates), 0, -1):  # most first: usually all fit, one plan
                plan = self._plan(candidates[:n])
                if plan is not None:
                    joining = candidates[:n]
                    break
        else:
            joining = candidates
        if not joining:
            return 0  # the budget has no room for the next one yet: it waits for sequences to leave
        with self.lock:
            for _ in joining:
                self.waiting.popleft()
        now = time.monotonic()
        for seq in joining:
            seq.admitted_at = now
        try:
            if self.kv_cache:  # the batch holds KV, and every handoff brought its KV cache
                entries = cast(
                    "list[tuple[str, KvLayers, int]]", [(s.request_id, s.kv, s.output.tokens[-1]) for s in joining]
                )
                if isinstance(self.batch, PagedDecodeBatch):
                    self.batch.add_many(entries, cast("list[int]", plan))
                else:
                    cast(DecodeBatch, self.batch).add_many(entries, cast("tuple[int, int]", plan)[1])
            else:
                for seq in joining:
                    cast(RecomputeBatch, self.batch).add(seq.request_id, seq.context, seq.output.tokens[-1])
        except Exception as exc:  # its clients hear why at once, instead of waiting for their deadline
            for seq in joining:
                if seq.request_id in self.batch.seq_ids:
                    self.batch.remove(seq.request_id)
            self.notify(functools.partial(_deliver_all, [(seq, exc) for seq in joining]))
            self.budget.set_slab(self.batch.kv_bytes)
            raise
        loaded = time.monotonic()
        for seq in joining:
            seq.kv = None  # the batch holds the only copy now
            seq.kv_loaded_at = loaded
            self.running[seq.request_id] = seq
        self.budget.set_slab(self.batch.kv_bytes)
        return len(joining)

    def _step(
        self, params: list[SamplingParams], steps: list[int], grammars: list[SequenceGrammar | None]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """One forward step of the batch; each row's next token and, where asked, its logprobs. With a split head,
        greedy rows without logprobs or grammar get their token from it and only the other rows compute full
        logits. Rows with a grammar sample from logits masked by it; their logprobs are the raw logits'."""
        if self.head is None:
            logits = self.batch.step(self.lm.model)
            full = list(range(len(params)))
            tokens = [0] * len(params)
        else:
            hidden = self.batch.step_hidden(self.lm.model)
            screened = [i for i, p in enumerate(params) if p.greedy and not p.logprobs and grammars[i] is None]
            full = sorted(set(range(len(params))) - set(screened))  # they need every logit
            tokens = [0] * len(params)
            for i, token in zip(screened, self.head.greedy(hidden[screened]) if screened else []):
                tokens[i] = token
            logits = self.head.logits(hidden[full]) if full else hidden.new_empty(0)
        logprobs: list[TokenLogprobs | None] = [None] * len(params)
        if full:
            rows_params, rows_steps = [params[i] for i in full], [steps[i] for i in full]
            masked = [(row, g) for row, g in enumerate(grammars[i] for i in full) if g is not None]
            sampled_from = logits
            if masked:  # only these rows are copied and masked; the others' logits are read as they are
                sampled_from = logits.clone()
                mask_rows(sampled_from, [row for row, _ in masked], [g for _, g in masked])
            rows_tokens = sample_batch(sampled_from, rows_params, rows_steps)
            rows_logprobs = batch_logprobs(logits, rows_tokens, rows_params, self.lm.tokenizer)
            for i, token, token_logprobs in zip(full, rows_tokens, rows_logprobs):
                tokens[i], logprobs[i] = token, token_logprobs
        return tokens, logprobs

    def _retire(self, seq: DecodeSequence) -> None:
        """`seq` finished, its row still in the batch: a subclass may keep what it needs of it (nothing here)."""

    def _leave(self, request_id: str) -> None:
        self.batch.remove(request_id)  # first: a sequence that no longer counts as active holds no KV
        self.budget.set_slab(self.batch.kv_bytes)
        self.running.pop(request_id, None)

    def run_once(self) -> None:
        self._apply_cancellations()
        joined = self._admit()
        if not self.running:
            return
        started = time.perf_counter()
        seqs = [self.running[seq_id] for seq_id in self.batch.seq_ids]
        try:
            tokens, logprobs = self._step(
                [s.output.params for s in seqs], [len(s.output.tokens) for s in seqs], [s.output.grammar for s in seqs]
            )
        except Exception as exc:
            failed = list(self.running.values())
            for seq in failed:
                self._leave(seq.request_id)
            self.notify(functools.partial(_deliver_all, [(seq, exc) for seq in failed]))
            raise
        self.batch.set_last_tokens(tokens)
        finished: set[str] = set()
        events: list[tuple[DecodeSequence, TokenEvent | BaseException]] = []
        now = time.monotonic()
        for seq, token, token_logprobs in zip(seqs, tokens, logprobs):
            text = seq.output.append(token)
            seq.batch_sizes.append(len(seqs))
            seq.last_token_at = now
            events.append((seq, TokenEvent(token, text, seq.output.finish_reason, token_logprobs)))
            if seq.output.finish_reason is not None:
                finished.add(seq.request_id)
        # One wake-up of the event loop for the step's tokens; the finishing sequences' last tokens after _retire
        # (their KV kept first: a next turn sent on their last token finds it) in a second one.
        going_on = [(seq, event) for seq, event in events if seq.request_id not in finished]
        if going_on:
            self.notify(functools.partial(_deliver_all, going_on))
        for request_id in finished:
            self._retire(self.running[request_id])
            self._leave(request_id)
        if finished:
            last = [(seq, event) for seq, event in events if seq.request_id in finished]
            self.notify(functools.partial(_deliver_all, last))
        self.last_step = StepStats(len(seqs), joined, len(finished), time.perf_counter() - started)


def _paced(candidates: list[DecodeSequence], tokens: int) -> list[DecodeSequence]:
    """The leading candidates whose KV (context tokens) adds up to at most `tokens`, at least the first one."""
    taken: list[DecodeSequence] = []
    total = 0
    for seq in candidates:
        total += len(seq.context)
        if taken and total > tokens:
            break
        taken.append(seq)
    return taken


def _deliver_all(events: list[tuple[DecodeSequence, TokenEvent | BaseException]]) -> None:
    for seq, event in events:
        seq.deliver(event)
