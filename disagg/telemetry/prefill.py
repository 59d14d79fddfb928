"""The prefill side's spans and metrics: queue wait and forward pass, and the encoding of the KV handoff."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context

from disagg.pb.disagg.v1 import worker_pb2
from disagg.telemetry.metrics import PrefillMetrics, WorkerMetrics, current, priority_label
from disagg.telemetry.spans import Clock, mb_per_s, recording, span_between


@dataclass(frozen=True)
class PrefillTimes:
    """One request's prefill, as its prefill.queue_wait and prefill.forward spans cover it: the one source of the
    spans, the metrics and the numbers the worker reports with the first token (the request's metrics)."""

    enqueued: float  # time.monotonic() stamps
    started: float
    forward_seconds: float
    batch_size: int
    tokens: int
    cached_tokens: int

    @property
    def queue_seconds(self) -> float:
        return max(0.0, self.started - self.enqueued)

    @property
    def ended(self) -> float:
        return self.started + self.forward_seconds

    def to_pb(self) -> worker_pb2.PrefillPhases:
        return worker_pb2.PrefillPhases(
            queue_seconds=self.queue_seconds,
            forward_seconds=self.forward_seconds,
            batch_size=self.batch_size,
            tokens=self.tokens,
            cached_tokens=self.cached_tokens,
        )


def prefill_times(job: Any, result: Any) -> PrefillTimes:
    """`job` is a PrefillJob (enqueued_at, input_ids), `result` its PrefillResult (forward_started,
    forward_seconds, batch_size, cached_tokens)."""
    return PrefillTimes(
        job.enqueued_at,
        result.forward_started,
        result.forward_seconds,
        result.batch_size,
        len(job.input_ids),
        result.cached_tokens,
    )


def record_prefill(job: Any, result: Any) -> PrefillTimes:
    """After a prefill forward pass: the queue-wait and forward spans, and their metrics; returns their numbers.

    `job` is a PrefillJob (enqueued_at), `result` its PrefillResult (forward_started, forward_seconds, batch_size,
    and what the prefix cache gave: cached_tokens, cache_hit_blocks, cache_miss_blocks).
    """
    times = prefill_times(job, result)
    started = times.started
    if (m := current(PrefillMetrics)) is not None:
        m.queue_wait.observe(times.queue_seconds)
        m.queue_wait_by_priority.labels(priority_label(job.priority)).observe(times.queue_seconds)
        m.forward.observe(times.forward_seconds)
        m.batch_size.observe(times.batch_size)
        m.prompt_tokens.inc(times.tokens)
        m.prefix_hits.inc(result.cache_hit_blocks)
        m.prefix_misses.inc(result.cache_miss_blocks)
        m.prefix_cached_tokens.inc(result.cached_tokens)
    if not recording():
        return times
    clock = Clock()
    ended = times.ended
    span_between(clock, "prefill.queue_wait", times.enqueued, started)
    span_between(
        clock,
        "prefill.forward",
        started,
        ended,
        {
            "disagg.prefill.tokens": times.tokens,
            "disagg.prefill.cached_tokens": times.cached_tokens,
            "disagg.batch.size": times.batch_size,
            "disagg.prefill.forward_seconds": times.forward_seconds,
        },
        events=[
            (
                "first_token",
                ended,
                {"gen_ai.token.id": result.first_token, "disagg.finish_reason": result.finish_reason or ""},
            )
        ],
    )
    return times


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
