"""The in-process baselines of `disagg bench`: the same workload through `transformers` `generate()`.

`generate_sequential` runs one request at a time (what a naive server does); `generate_static_batches` runs
fixed batches of `concurrency` requests that all start and end together (the ceiling that perfect batching of
this model on this machine reaches, paid for with the latency of the whole batch). Every request of a batch is
timed from the batch's start, as a client that sent them together would see it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

import torch
from transformers import GenerationMixin
from transformers.generation.streamers import BaseStreamer

from benchmarks.stats import RequestRecord, RunResult
from benchmarks.workloads import Workload
from disagg.model.loading import LoadedModel


class _TokenClock(BaseStreamer):
    """Records when each generated token of the batch is ready (generate's first `put` is the prompt)."""

    def __init__(self, started: float):
        self.started, self._prompt_seen = started, False
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.started)

    def end(self) -> None:
        pass


@torch.inference_mode()
def _generate_batch(lm: LoadedModel, prompts: list[list[int]], workload: Workload) -> list[RequestRecord]:
    longest = max(len(p) for p in prompts)
    pad = lm.tokenizer.eos_token_id or 0
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=lm.device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=lm.device)
    started = time.perf_counter()
    clock = _TokenClock(started)
    # (AutoModelForCausalLM's models are GenerationMixins too; PreTrainedModel alone does not declare generate)
    out = cast(GenerationMixin, lm.model).generate(
        input_ids,
        attention_mask=mask,
        max_new_tokens=workload.output_tokens,
        min_new_tokens=workload.output_tokens if workload.ignore_eos else 0,
        do_sample=False,
        pad_token_id=pad,
        streamer=clock,
    )
    records = []
    for row in out[:, longest:].tolist():
        produced = len(row)
        if not workload.ignore_eos:  # rows that stopped early are padded after their EOS
            produced = next((i + 1 for i, t in enumerate(row) if t in lm.eos_token_ids), len(row))
        records.append(RequestRecord(token_times=clock.times[:produced]))
    return records


def generate_sequential(
    lm: LoadedModel, prompts: list[list[int]], workload: Workload, on_done: Callable[[], None] = lambda: None
) -> RunResult:
    """One request at a time: `workload.num_requests` requests, prompt i cycling through `prompts`."""
    records = []
    started = time.perf_counter()
    for i in range(workload.num_requests):
        records += _generate_batch(lm, [prompts[i % len(prompts)]], workload)
        on_done()
    return RunResult("generate_sequential", time.perf_counter() - started, records)


def generate_static_batches(
    lm: LoadedModel, prompts: list[list[int]], workload: Workload, on_done: Callable[[], None] = lambda: None
) -> RunResult:
    """Batches of `workload.concurrency` requests, each batch started when the previous one ended."""
    records: list[RequestRecord] = []
    started = time.perf_counter()
    for first in range(0, workload.num_requests, workload.concurrency):
        batch = [
            prompts[i % len(prompts)] for i in range(first, min(first + workload.concurrency, workload.num_requests))
        ]
        records += _generate_batch(lm, batch, workload)
        for _ in batch:
            on_done()
    return RunResult("generate_static_batch", time.perf_counter() - started, records)
