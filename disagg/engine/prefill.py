"""Prefill worker engine: batches prompts that arrive together, runs one forward pass, picks first tokens."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from disagg.config import BatchPolicy
from disagg.engine.batching import similar_length_batch, take_indices
from disagg.engine.cached_prefill import CachedPrefill
from disagg.engine.thread import EngineThread
from disagg.kv.prefix_cache import PrefixCache, PrefixHit
from disagg.model.kv_layers import KvLayers
from disagg.model.lm_head import greedy_head
from disagg.model.loading import LoadedModel
from disagg.model.logprobs import TokenLogprobs, prompt_logprobs, token_logprobs
from disagg.model.native import NativeModel, native_family
from disagg.model.native_prefill import Prefiller
from disagg.model.output_stream import OutputStream
from disagg.model.prefill import PrefillOutput


@dataclass
class FirstSample:
    """The first token of one of a request's n sequences, sampled from the prompt's one set of logits."""

    token: int
    text: str
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None


@dataclass
class PrefillResult:
    first_token: int
    text: str
    finish_reason: str | None
    kv: KvLayers | None
    forward_seconds: float
    batch_size: int
    forward_started: float = 0.0  # time.monotonic() when the batch's forward pass began (for trace spans)
    samples: list[FirstSample] = field(default_factory=list)  # every sequence's first token (index 0 included)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)
    cache_hit_blocks: int = 0  # the prompt's full blocks found in the prefix cache
    cache_miss_blocks: int = 0  # and not found (both 0 with the cache off)
    # The prompt tokens' logprobs from the second on, when the job asked (PrefillJob.prompt_logprobs)
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def all_finished(self) -> bool:
        """No sequence needs decoding (then no KV cache is handed over)."""
        return all(s.finish_reason is not None for s in self.samples)


@dataclass
class PrefillJob:
    """One prompt to prefill; `deliver` is called once, from the engine thread, with a result or an exception."""

    request_id: str
    input_ids: list[int]  # prompt, plus tokens already generated when resuming a sequence
    output: OutputStream
    deliver: Callable[[PrefillResult | BaseException], object]  # (what it returns is ignored)
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)
    # layer-wise streaming: called from the engine thread with (layer, keys, values) during the forward pass
    on_kv_layer: Callable[[int, torch.Tensor, torch.Tensor], object] | None = None
    forks: list[OutputStream] = field(default_factory=list)  # sequences 1..n-1 of an n > 1 request
    # Alternatives per prompt position of the prompt's logprobs (None: not asked, or a resumed sequence's, sent
    # before): the whole prompt is computed, the prefix cache bypassed (its blocks keep KV, not logits).
    prompt_logprobs: int | None = None

    @property
    def priority(self) -> int:
        """Lower is prefilled earlier (disagg.engine.queueing)."""
        return self.output.params.priority

    def first_sample(self, output: OutputStream, prompt: PrefillOutput, tokenizer: object) -> FirstSample:
        token = prompt.first_token(output.params, len(output.tokens), output.grammar)
        text = output.append(token)
        logprobs = (
            token_logprobs(prompt.logits, token, output.params.top_logprobs, tokenizer)
            if output.params.logprobs
            else None
        )
        return FirstSample(token, text, output.finish_reason, logprobs)


class PrefillEngine(EngineThread[PrefillJob]):
    """Batches prompts into forward passes; with a prefix cache, a prompt that starts with cached blocks computes
    only the rest, alone (batch of 1: its suffix attends to its own cached prefix), and every prefilled prompt's
    full blocks are cached afterwards."""

    name = "prefill"

    def __init__(
        self,
        lm: LoadedModel,
        policy: BatchPolicy,
        kv_cache: bool = True,
        prefix_cache: PrefixCache | None = None,
        greedy_screen: str = "auto",
        model_runner: str = "native",
    ):
        """`greedy_screen`: how greedy first tokens are picked (disagg.model.lm_head.greedy_head); `model_runner`:
        "native" prefills GPT-2 and Llama models with the project's forward pass (disagg/model/native_prefill.py),
        "hf" (and every other architecture) with HF's."""
        super().__init__(policy)
        self.lm, self.kv_cache = lm, kv_cache
        self.head = greedy_head(lm.model, greedy_screen)
        native = model_runner == "native" and native_family(lm.model) is not None
        # (attention "matmul": the decode kernel plays no part in a prefill)
        self.prefiller = Prefiller(lm.model, self.head, NativeModel(lm.model, "matmul") if native else None)
        # the prefix cache needs the prompts' KV: off with the KV cache
        self.prefix_cache = prefix_cache if kv_cache and prefix_cache is not None and prefix_cache.enabled else None
        self.cached = CachedPrefill(lm, self.prefiller, self.prefix_cache)
        self._undelivered: list[PrefillJob] = []  # of the batch in run_once

    def _take_batch(self) -> list[PrefillJob]:
        """The first job in service order (priority, then arrival) and the waiting jobs of similar length within
        max size and the padded-token budget."""
        with self.lock:
            queue = [job for job in self.waiting if not job.cancelled]
            indices = similar_length_batch(
                [len(job.input_ids) for job in queue], self.policy.token_budget, self.policy.max_batch_size
            )
            batch, rest = take_indices(queue, indices)
            self.waiting = type(self.waiting)(rest)
        return batch

    def run_once(self) -> None:
        batch = self._take_batch()
        if not batch:
            return
        hits = [self.cached.acquire(job.input_ids, bypass=job.prompt_logprobs is not None) for job in batch]
        self._undelivered = list(batch)
        try:
            for job, hit in zip(batch, hits):  # hits first: short suffixes, their first tokens come soonest
                if hit.blocks:
                    self._forward([job], [hit])
            cold = [(job, hit) for job, hit in zip(batch, hits) if not hit.blocks]
            if cold:
                self._forward([job for job, _ in cold], [hit for _, hit in cold])
        except Exception as exc:
            for job in self._undelivered:
                job.deliver(exc)
            raise
        finally:
            self.cached.release(hits)

    def _forward(self, batch: list[PrefillJob], hits: list[PrefixHit]) -> None:
        """One forward pass: one prompt after its cached prefix, or prompts with nothing cached."""
        started, started_at = time.perf_counter(), time.monotonic()
        layer_sinks = [job.on_kv_layer for job in batch]
        on_layer: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None
        if any(layer_sinks):

            def on_layer(row: int, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
                sink = layer_sinks[row]
                if sink is not None:
                    sink(layer, keys, values)

        outputs, keep = self.cached.run(
            [job.input_ids for job in batch],
            hits,
            want_kv=self.kv_cache,
            on_layer=on_layer,
            all_positions=[job.prompt_logprobs is not None for job in batch],
        )
        seconds = time.perf_counter() - started
        try:
            for job, out, hit in zip(batch, outputs, hits):
                self._finish(job, out, hit, seconds, len(batch), started_at)
        finally:
            keep()  # after delivery: off the first tokens' path (the KV is whole even if a delivery failed)

    def _finish(
        self, job: PrefillJob, out: PrefillOutput, hit: PrefixHit, seconds: float, batch_size: int, started_at: float
    ) -> None:
        samples = [job.first_sample(o, out, self.lm.tokenizer) for o in [job.output, *job.forks]]
        first = samples[0]
        prompt = None
        if job.prompt_logprobs is not None:
            prompt = prompt_logprobs(out.position_logits, job.input_ids, job.prompt_logprobs, self.lm.tokenizer)
        self._undelivered.remove(job)
        job.deliver(
            PrefillResult(
                first.token,
                first.text,
                first.finish_reason,
                out.kv,
                seconds,
                batch_size,
                started_at,
                samples,
                cached_tokens=hit.tokens,
                cache_hit_blocks=len(hit.blocks),
                cache_miss_blocks=hit.eligible_blocks - len(hit.blocks),
                prompt_logprobs=prompt,
            )
        )
