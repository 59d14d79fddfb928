"""The prefill side's spans and metrics: queue wait and forward pass, and the encoding of the KV handoff."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context

from disagg.telemetry.metrics import PrefillMetrics, WorkerMetrics, current
from disagg.telemetry.spans import Clock, mb_per_s, recording, span_between


def record_prefill(job: Any, result: Any) -> None:
    """After a prefill forward pass: the queue-wait and forward spans, and their metrics.

    `job` is a PrefillJob (enqueued_at), `result` its PrefillResult (forward_started, forward_seconds, batch_size,
    and what the prefix cache gave: cached_tokens, cache_hit_blocks, cache_miss_blocks).
    """
    started = result.forward_started
    if (m := current(PrefillMetrics)) is not None:
        m.queue_wait.observe(max(0.0, started - job.enqueued_at))
        m.forward.observe(result.forward_seconds)
        m.batch_size.observe(result.batch_size)
        m.prompt_tokens.inc(len(job.input_ids))
        m.prefix_hits.inc(result.cache_hit_blocks)
        m.prefix_misses.inc(result.cache_miss_blocks)
        m.prefix_cached_tokens.inc(result.cached_tokens)
    if not recording():
        return
    clock = Clock()
    ended = started + result.forward_seconds
    span_between(clock, "prefill.queue_wait", job.enqueued_at, started)
    span_between(
        clock,
        "prefill.forward",
        started,
        ended,
        {
            "disagg.prefill.tokens": len(job.input_ids),
            "disagg.prefill.cached_tokens": result.cached_tokens,
            "disagg.batch.size": result.batch_size,
            "disagg.prefill.forward_seconds": result.forward_seconds,
        },
        events=[
            (
                "first_token",
                ended,
                {"gen_ai.token.id": result.first_token, "disagg.finish_reason": result.finish_reason or ""},
            )
        ],
    )


class KvSerialize:
    """The prefill side of one handoff: what each layer's encoding cost, then the `kv.serialize` span and metrics.

    The cache may stream while the forward pass still runs (layer-wise), so the span runs from the first layer's
    encoding to the last message handed over; `disagg.kv.encode_seconds` is the part spent encoding.
    """

    def __init__(self, transport: str) -> None:
        self.transport, self.parent = transport, otel_context.get_current()
        self.begin: float | None = None
        self.encode_seconds, self.bytes, self.chunks, self.ended = 0.0, 0, 0, False

    @contextlib.contextmanager
    def encoding(self) -> Iterator[KvSerialize]:
        if self.begin is None:
            self.begin = time.monotonic()
        started = time.perf_counter()
        try:
            yield self
        finally:
            self.encode_seconds += time.perf_counter() - started

    def add(self, size: int, chunks: int) -> None:
        self.bytes, self.chunks = self.bytes + size, self.chunks + chunks

    def end(self) -> None:
        """Once every byte is handed over (the transport's `finish`)."""
        if self.ended or self.begin is None:
            return
        self.ended, end = True, time.monotonic()
        if (m := current(WorkerMetrics)) is not None:
            m.observe_kv(self.bytes, end - self.begin)
        if recording(self.parent):
            span_between(
                Clock(),
                "kv.serialize",
                self.begin,
                end,
                {
                    "disagg.kv.bytes": self.bytes,
                    "disagg.kv.chunks": self.chunks,
                    "disagg.kv.encode_seconds": self.encode_seconds,
                    "disagg.kv.transport": self.transport,
                    "disagg.kv.mb_per_s": mb_per_s(self.bytes, end - self.begin),
                },
                parent=self.parent,
            )
