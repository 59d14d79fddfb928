"""Aggregated engine: prefill and decode in one continuous-batching loop (the baseline disaggregation is measured
against, as in DistServe and Splitwise).

Each iteration of the engine thread (a) prefills waiting prompts, oldest first, as many as the running batch has
free rows for and the per-step token budget (`BatchPolicy.token_budget`, padded prompt tokens) allows, samples
each one's first token from the prompt's logits (as the prefill engine does) and queues its sequences, KV cache
attached, for the decode batch; then (b) runs `DecodeEngine.run_once`: admission into the slab under the KV
budget, one decode step for every running sequence, leaving, one `notify` for the step's tokens.

So a prompt's forward pass delays the next token of every running stream by its whole length: that interference
is what the aggregated-vs-disaggregated experiment measures, and it is not hidden (no chunked prefill: a prompt
longer than the token budget is prefilled alone, in one forward pass).

With a prefix cache (disagg/kv/prefix_cache.py), a prompt that starts with cached blocks computes only the rest
(alone, attending to its cached prefix), and two kinds of KV are kept: each prefilled prompt's, and each finished
sequence's whole context (prompt + generated tokens, copied from its row of the batch as it leaves). The second
is what makes a conversation's next turn, which re-sends the history and the reply, nearly free on the worker
that decoded the reply (conditional disaggregation: the decode worker's --local-prefill).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import cast

from disagg.config import BatchPolicy
from disagg.engine.batching import similar_length_batch, take_indices
from disagg.engine.cached_prefill import CachedPrefill
from disagg.engine.decode import DecodeEngine, DecodeSequence, DecodeSetup, KvBatch, TokenEvent, _deliver_all
from disagg.engine.queueing import PriorityQueue
from disagg.errors import Overloaded
from disagg.kv.prefix_cache import PrefixCache, PrefixHit
from disagg.model.loading import LoadedModel
from disagg.model.logprobs import TokenLogprobs, prompt_logprobs, token_logprobs
from disagg.model.native_prefill import Prefiller
from disagg.model.paged_batch import PagedDecodeBatch
from disagg.model.prefill import PrefillOutput


@dataclass
class Prompt:
    """One request to prefill here: its n sequences (n > 1 share the prompt's one forward pass and KV cache).

    Each sequence's `context` is the prompt (plus tokens generated before a resume), its `output` has those
    generated tokens replayed, and its `kv` is None until the prefill; its first token is delivered as a
    TokenEvent like every later one.
    """

    sequences: list[DecodeSequence]
    enqueued_at: float = field(default_factory=time.monotonic)
    prefill_started: float = 0.0  # time.monotonic() when its forward pass began (set by the engine)
    prefill_seconds: float = 0.0  # the forward pass it took part in (set by the engine)
    prefill_batch_size: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (set by the engine)
    # Alternatives per position of the prompt's logprobs (None: not asked): the whole prompt is computed, the prefix
    # cache bypassed; the engine sets `prompt_logprob_values` before the first token is delivered.
    prompt_logprobs: int | None = None
    prompt_logprob_values: list[TokenLogprobs] | None = None

    @property
    def input_ids(self) -> list[int]:
        return self.sequences[0].context

    @property
    def priority(self) -> int:
        """Lower is prefilled earlier (disagg.engine.queueing)."""
        return self.sequences[0].priority


@dataclass
class PrefillStats:
    prompts: int
    tokens: int  # padded prompt tokens of the forward pass
    seconds: float


class AggregatedEngine(DecodeEngine):
    """A DecodeEngine whose sequences arrive as prompts (`submit_prompt`) and are prefilled on its own thread."""

    name = "aggregated"

    def __init__(
        self,
        lm: LoadedModel,
        policy: BatchPolicy,
        setup: DecodeSetup | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        super().__init__(lm, policy, setup)
        native = self.batch.native if isinstance(self.batch, PagedDecodeBatch) else None  # (the decode step's)
        self.prefiller = Prefiller(lm.model, self.head, native)
        self.prompts: PriorityQueue[Prompt] = PriorityQueue()
        self.last_prefill: PrefillStats | None = None
        # the prefix cache needs the prompts' KV: off with the KV cache
        enabled = self.kv_cache and prefix_cache is not None and prefix_cache.enabled
        self.prefix_cache = prefix_cache if enabled else None
        self.cached = CachedPrefill(lm, self.prefiller, self.prefix_cache)

    def uncached_tokens(self, input_ids: list[int]) -> int:
        """Of `input_ids`, the tokens a prefill here would compute now (the rest are in the prefix cache)."""
        cached = self.prefix_cache.lookup(input_ids) if self.prefix_cache is not None else 0
        return len(input_ids) - cached

    def submit_prompt(self, prompt: Prompt) -> None:
        with self.lock:
            if len(self.prompts) + len(self.waiting) >= self.policy.max_queue:
                raise Overloaded(f"{self.name} queue is full ({self.policy.max_queue} waiting); retry later")
            self.prompts.append(prompt)
            self.lock.notify_all()

    def busy(self) -> bool:
        return bool(self.running) or bool(self.prompts)

    @property
    def active(self) -> int:
        return super().active + sum(len(p.sequences) for p in self.prompts)

    @property
    def queued(self) -> int:
        """Sequences not in the running batch yet: prompts to prefill and prefilled sequences waiting for room."""
        return len(self.waiting) + sum(len(p.sequences) for p in self.prompts)

    def _apply_cancellations(self) -> set[str]:
        cancelled = super()._apply_cancellations()
        if cancelled:
            with self.lock:
                for prompt in self.prompts:
                    prompt.sequences = [s for s in prompt.sequences if s.request_id not in cancelled]
                self.prompts = PriorityQueue(p for p in self.prompts if p.sequences)
        return cancelled

    def _take_prompts(self) -> list[Prompt]:
        """The oldest prompt and waiting prompts of similar length (disagg.engine.batching), while the running
        batch has rows for their sequences and the padded prompt tokens stay within the token budget (the first
        prompt always goes, however long)."""
        rows = self.policy.max_batch_size - len(self.running) - len(self.waiting)
        with self.lock:
            queue = list(self.prompts)

            def fits(index: int) -> bool:
                nonlocal rows
                if len(queue[index].sequences) > rows:
                    return False
                rows -= len(queue[index].sequences)
                return True

            indices = similar_length_batch(
                [len(p.input_ids) for p in queue], self.policy.token_budget, len(queue), fits
            )
            taken, rest = take_indices(queue, indices)
            self.prompts = PriorityQueue(rest)  # (in service order: equal priorities keep it)
        return taken

    def _prefill(self) -> None:
        """(a): prefill what fits this step: prompts that start with cached blocks one by one (their suffix attends
        to their cached prefix), then the others in one left-padded forward pass; each forward pass's first tokens
        are delivered as soon as it ends, and its sequences that go on queued for the batch."""
        taken = self._take_prompts()
        if not taken:
            return
        hits = [self.cached.acquire(p.input_ids, bypass=p.prompt_logprobs is not None) for p in taken]
        groups = [[(p, h)] for p, h in zip(taken, hits) if h.blocks]  # short suffixes first: soonest first tokens
        if cold := [(p, h) for p, h in zip(taken, hits) if not h.blocks]:
            groups.append(cold)
        total = PrefillStats(0, 0, 0.0)
        try:
            for index, group in enumerate(groups):
                try:
                    done = self._prefill_group(group)
                    total = PrefillStats(
                        total.prompts + done.prompts, total.tokens + done.tokens, total.seconds + done.seconds
                    )
                    self.last_prefill = total
                except Exception as exc:  # this pass and those not run yet: their clients hear why at once
                    failed: list[tuple[DecodeSequence, TokenEvent | BaseException]] = [
                        (s, exc) for g in groups[index:] for p, _ in g for s in p.sequences
                    ]
                    self.notify(functools.partial(_deliver_all, failed))
                    raise
        finally:
            self.cached.release(hits)

    def _prefill_group(self, group: list[tuple[Prompt, PrefixHit]]) -> PrefillStats:
        """One forward pass: one prompt after its cached prefix, or prompts with nothing cached, batched."""
        started, started_at = time.perf_counter(), time.monotonic()
        prompts = [p for p, _ in group]
        outputs, keep = self.cached.run(
            [p.input_ids for p in prompts],
            [h for _, h in group],
            want_kv=self.kv_cache,
            all_positions=[p.prompt_logprobs is not None for p in prompts],
        )
        try:
            return self._deliver_first_tokens(group, outputs, started, started_at)
        finally:
            keep()  # after the first tokens left: off their path

    def _deliver_first_tokens(
        self, group: list[tuple[Prompt, PrefixHit]], outputs: list[PrefillOutput], started: float, started_at: float
    ) -> PrefillStats:
        """Each prompt's sequences' first tokens (and prompt logprobs), delivered; those that go on queued."""
        seconds = time.perf_counter() - started
        events: list[tuple[DecodeSequence, TokenEvent | BaseException]] = []
        joining: list[DecodeSequence] = []
        now = time.monotonic()
        for (prompt, prompt_hit), out in zip(group, outputs):
            prompt.prefill_started, prompt.prefill_seconds = started_at, seconds
            prompt.prefill_batch_size, prompt.cached_tokens = len(group), prompt_hit.tokens
            if prompt.prompt_logprobs is not None:
                prompt.prompt_logprob_values = prompt_logprobs(
                    out.position_logits, prompt.input_ids, prompt.prompt_logprobs, self.lm.tokenizer
                )
            for seq in prompt.sequences:
                params = seq.output.params
                token = out.first_token(params, len(seq.output.tokens), seq.output.grammar)
                text = seq.output.append(token)
                logprobs = (
                    token_logprobs(out.logits, token, params.top_logprobs, self.lm.tokenizer)
                    if params.logprobs
                    else None
                )
                seq.last_token_at = now
                events.append((seq, TokenEvent(token, text, seq.output.finish_reason, logprobs)))
                if seq.output.finish_reason is None:
                    seq.kv = out.kv  # (n > 1: the same tensors; the batch copies them into each row)
                    joining.append(seq)
        with self.lock:
            self.waiting.extend(joining)
        self.notify(functools.partial(_deliver_all, events))  # first tokens leave before the next pass
        tokens = max(len(p.input_ids) - h.tokens for p, h in group) * len(group)  # (computed, padded)
        return PrefillStats(len(group), tokens, seconds)

    def _retire(self, seq: DecodeSequence) -> None:
        """Keep the finished sequence's whole context (prompt + generated tokens) in the prefix cache."""
        if self.prefix_cache is None:
            return
        kv = cast(KvBatch, self.batch).row_kv(seq.request_id)
        fed = kv[0][0].shape[2] - len(seq.context)  # tokens the decode steps computed: all but the newest
        tokens = seq.output.tokens
        self.prefix_cache.insert([*seq.context, *tokens[len(tokens) - 1 - fed : -1]], kv)

    def run_once(self) -> None:
        self._apply_cancellations()
        self._prefill()
        super().run_once()  # (b): admission under the KV budget, one decode step for the running batch
