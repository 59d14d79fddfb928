"""The decode side's spans and metrics: the KV transfer as received, queue wait, KV load and the decode loop."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context

from disagg.kv.framing import event_of
from disagg.kv.transports import transport_name
from disagg.pb.disagg.v1 import worker_pb2
from disagg.telemetry.metrics import DecodeMetrics, current, priority_label
from disagg.telemetry.prefill import PrefillTimes
from disagg.telemetry.spans import Clock, mb_per_s, recording, span_between


@dataclass
class KvTransfer:
    """What the decode side saw of a handoff stream: when payload started and ended, how much KV came."""

    parent: (
        otel_context.Context
    )  # the call's trace context (record_decode may run in another task, at the stream's close)
    started: float | None = None  # SequenceStart (or a push's header) arrived
    first: float | None = None  # first FirstToken or KV message (prefill's forward pass is done by then)
    last: float | None = None  # last message read
    bytes: int = 0
    chunks: int = 0
    transport: str = "relayed"
    held_prefix_tokens: int = 0  # leading tokens whose KV the handoff left out: this worker held them
    recorded: bool = False  # its kv.transfer span and metrics are made (once, whichever sequence ends first)

    @property
    def seconds(self) -> float:
        """The kv.transfer span's length: first to last KV message received here (0 before any)."""
        if self.first is None:
            return 0.0
        return (self.last or self.first) - self.first  # (last is set with first: every message sets it)


# Direct transport: what each push (by its handle) received, until the Decode call claiming it reports it.
_pushes: dict[str, KvTransfer] = {}
MAX_PENDING_TRANSFERS = 4096


def _keep(pending: dict[str, KvTransfer], key: str, transfer: KvTransfer) -> None:
    if len(pending) >= MAX_PENDING_TRANSFERS:  # handoffs refused before decoding are never taken
        pending.pop(next(iter(pending)))
    pending[key] = transfer


class ObservedHandoff:
    """An async iterator over handoff messages (a Decode or PushKv stream) that notes them in a KvTransfer."""

    def __init__(self, messages: AsyncIterator[Any], transfer: KvTransfer) -> None:
        self._messages, self.transfer = messages.__aiter__(), transfer

    def __aiter__(self) -> ObservedHandoff:
        return self

    async def __anext__(self) -> Any:  # a handoff message as handoff_deserializer made it (protobuf or Chunk)
        message = await self._messages.__anext__()
        now, transfer = time.monotonic(), self.transfer
        kind = event_of(message)
        if kind in ("start", "header"):
            transfer.started = now
            if kind == "start":
                transfer.transport = transport_name(message.start.kv_layout.transport)
                transfer.held_prefix_tokens = message.start.kv_layout.prefix_tokens
            else:
                _keep(_pushes, message.header.handle, transfer)
        else:
            if transfer.first is None:
                transfer.first = now
            if kind == "kv_chunk":
                transfer.bytes += len(message.data)
                transfer.chunks += 1
            elif kind == "shared_memory":
                transfer.bytes += message.shared_memory.size
                transfer.chunks += 1
        transfer.last = now
        return message


def observe_kv_transfer(messages: AsyncIterator[Any]) -> ObservedHandoff:
    """Wraps a Decode call's request stream; `record_decode` later turns what it saw (its `.transfer`) into the
    `kv.transfer` span."""
    return ObservedHandoff(messages, KvTransfer(parent=otel_context.get_current()))


def observe_kv_push(messages: AsyncIterator[Any]) -> ObservedHandoff:
    """Wraps a PushKv stream (direct transport); `record_kv_push` records its `kv.transfer` span at its end."""
    return ObservedHandoff(messages, KvTransfer(parent=otel_context.get_current(), transport="direct"))


def record_kv_push(observed: ObservedHandoff) -> None:
    _record_transfer(observed.transfer, Clock())


def received_transfer(observed: ObservedHandoff, handle: str) -> KvTransfer:
    """What a Decode call's handoff brought, once it is all in: its own stream's, or with the direct transport the
    push of `handle` it claimed (with the call's held prefix)."""
    call = observed.transfer
    pushed = _pushes.pop(handle, None) if call.transport == "direct" else None
    return call if pushed is None else dataclasses.replace(pushed, held_prefix_tokens=call.held_prefix_tokens)


def _record_transfer(transfer: KvTransfer, clock: Clock) -> None:
    """The `kv.transfer` span and metrics: first to last KV message received on this worker."""
    if transfer.first is None:
        return
    first, seconds = transfer.first, transfer.seconds
    last = first + seconds
    if (m := current(DecodeMetrics)) is not None:
        m.observe_kv(transfer.bytes, seconds)
    if recording(transfer.parent):
        span_between(
            clock,
            "kv.transfer",
            first,
            last,
            {
                "disagg.kv.bytes": transfer.bytes,
                "disagg.kv.chunks": transfer.chunks,
                "disagg.kv.transport": transfer.transport,
                "disagg.kv.held_prefix_tokens": transfer.held_prefix_tokens,
                "disagg.kv.transfer_seconds": seconds,
                "disagg.kv.mb_per_s": mb_per_s(transfer.bytes, seconds),
            },
            parent=transfer.parent,
        )


def record_decode(seq: Any, call: KvTransfer, finish_reason: str | None = None) -> None:
    """When one sequence of a Decode call ends (each of the n of an n > 1 request): its spans decode.queue_wait,
    kv.load and decode, and with the first of them the handoff's kv.transfer; and their metrics. Once per sequence.

    `seq` is the DecodeSequence (enqueued_at, admitted_at, kv_loaded_at, last_token_at, batch_sizes, output);
    `call` what `observe_kv_transfer` saw of the call's own stream, with the call's trace context: the servicer's
    generator may be finalized in another task (the gateway closes the stream after the last token), where the
    call's context variables are gone.
    """
    now, clock = time.monotonic(), Clock()
    if not call.recorded:
        call.recorded = True
        if (m := current(DecodeMetrics)) is not None:
            m.held_prefix_tokens.inc(call.held_prefix_tokens)
        if call.transport != "direct":  # a direct push records its own transfer
            _record_transfer(call, clock)
    _record_decode_phases(seq, call.parent, clock, now, finish_reason)


def call_context() -> otel_context.Context:
    """The running RPC's trace context, for spans recorded after it moved on (record_aggregated)."""
    return otel_context.get_current()


def aggregated_prefill_times(prompt: Any) -> PrefillTimes:
    """The prefill of an AggregatedService request on this worker (the engine's Prompt: enqueued_at,
    prefill_started, prefill_seconds, prefill_batch_size, cached_tokens, input_ids)."""
    return PrefillTimes(
        prompt.enqueued_at,
        prompt.prefill_started,
        prompt.prefill_seconds,
        prompt.prefill_batch_size,
        len(prompt.input_ids),
        prompt.cached_tokens,
    )


def record_aggregated(prompt: Any, seq: Any, parent: otel_context.Context | None) -> None:
    """When one sequence of an AggregatedService request ends: spans prefill.queue_wait and prefill.forward (the
    prompt's, on this worker), then decode.queue_wait (from the prefill's end), kv.load and decode as for a
    handed-over sequence.

    `prompt` is the engine's Prompt (enqueued_at, prefill_started, prefill_seconds, prefill_batch_size,
    cached_tokens), `seq` the DecodeSequence, `parent` the call's trace context.
    """
    now, clock = time.monotonic(), Clock()
    prefill = aggregated_prefill_times(prompt)
    started = prefill.started
    m = current(DecodeMetrics)
    if m is not None and started and seq is prompt.sequences[0]:
        m.prefix_cached_tokens.inc(prefill.cached_tokens)
    if started and seq is prompt.sequences[0] and recording(parent):
        span_between(clock, "prefill.queue_wait", prefill.enqueued, started, parent=parent)
        attributes = {
            "disagg.prefill.batch_size": prefill.batch_size,
            "disagg.prefill.tokens": prefill.tokens,
            "disagg.prefix_cache.cached_tokens": prefill.cached_tokens,
        }
        span_between(clock, "prefill.forward", started, prefill.ended, attributes, parent=parent)
    if started:  # (a prompt cancelled before its prefill has no decode phases)
        _record_decode_phases(seq, parent, clock, now, queued_from=prefill.ended)


@dataclass(frozen=True)
class DecodeTimes:
    """A request's decode phases on this worker, as its decode.queue_wait, kv.load and decode spans cover them: the
    one source of the spans, the metrics and the numbers the worker reports on its last message. Sequences of one
    request (n > 1) count together: queued from the first one's arrival, until the last one was admitted and
    loaded, decoding from then to the last token; the longest one's steps, the tokens of all."""

    enqueued: float  # time.monotonic() stamps; admitted and loaded are 0.0 when a sequence never was
    admitted: float
    loaded: float
    end: float  # the last token sampled (or the request's end, if none)
    steps: int
    tokens: int

    @property
    def queue_seconds(self) -> float:
        return max(0.0, self.admitted - self.enqueued) if self.admitted else 0.0

    @property
    def kv_load_seconds(self) -> float:
        return max(0.0, self.loaded - self.admitted) if self.admitted else 0.0

    @property
    def decode_seconds(self) -> float:
        return self.end - self.loaded if self.loaded else 0.0

    def to_pb(self, transfer: KvTransfer | None) -> worker_pb2.DecodePhases:
        """`transfer`: what the handoff brought (None when the sequence was prefilled on this worker)."""
        phases = worker_pb2.DecodePhases(
            queue_seconds=self.queue_seconds,
            kv_load_seconds=self.kv_load_seconds,
            decode_seconds=self.decode_seconds,
            steps=self.steps,
            tokens=self.tokens,
        )
        if transfer is not None:
            phases.kv_transport = transfer.transport
            phases.kv_bytes = transfer.bytes
            phases.kv_chunks = transfer.chunks
            phases.kv_transfer_seconds = transfer.seconds
            phases.kv_held_prefix_tokens = transfer.held_prefix_tokens
        return phases


def decode_times(seqs: Sequence[Any], now: float | None = None, queued_from: float = 0.0) -> DecodeTimes:
    """The DecodeTimes of `seqs` (DecodeSequences: enqueued_at, admitted_at, kv_loaded_at, last_token_at,
    batch_sizes); `queued_from`: when they could first join the batch, if not when they were made (a prefill here
    ran in between)."""
    now = time.monotonic() if now is None else now
    admitted = [getattr(seq, "admitted_at", 0.0) for seq in seqs]
    loaded = [getattr(seq, "kv_loaded_at", 0.0) for seq in seqs]
    steps = [len(getattr(seq, "batch_sizes", ())) for seq in seqs]
    return DecodeTimes(
        queued_from or min(seq.enqueued_at for seq in seqs),
        max(admitted) if all(admitted) else 0.0,
        max(loaded) if all(loaded) else 0.0,
        max(getattr(seq, "last_token_at", 0.0) or now for seq in seqs),
        max(steps, default=0),
        sum(steps),
    )


def _record_decode_phases(
    seq: Any,
    parent: otel_context.Context | None,
    clock: Clock,
    now: float,
    finish_reason: str | None = None,
    queued_from: float = 0.0,
) -> None:
    times = decode_times([seq], now, queued_from)
    admitted, loaded, steps = times.admitted, times.loaded, list(getattr(seq, "batch_sizes", ()))
    finish_reason = finish_reason or getattr(seq.output, "finish_reason", None) or ""
    tpot = times.decode_seconds / times.steps if times.steps else 0.0
    m = current(DecodeMetrics)
    if m is not None:
        if admitted:
            m.queue_wait.observe(times.queue_seconds)
            priority = priority_label(seq.output.params.priority)
            m.queue_wait_by_priority.labels(priority).observe(times.queue_seconds)
            m.kv_load.observe(times.kv_load_seconds)
        for size in steps:
            m.batch_size.observe(size)
        if steps:
            m.tpot.observe(tpot)
            m.generation_tokens.inc(times.tokens)
    if not recording(parent):
        return
    if not admitted:  # cancelled or failed before it joined the batch
        span_between(clock, "decode.queue_wait", times.enqueued, now, {"disagg.admitted": False}, parent=parent)
        return
    span_between(clock, "decode.queue_wait", times.enqueued, admitted, parent=parent)
    span_between(clock, "kv.load", admitted, loaded, {"disagg.kv.tokens": len(seq.context)}, parent=parent)
    attributes = {
        "disagg.decode.steps": times.steps,
        "disagg.decode.tokens": times.tokens,
        "disagg.decode.time_per_output_token_seconds": tpot,
        "disagg.finish_reason": finish_reason,
        "disagg.sequence_id": seq.request_id,  # the request's id, `#i` after it for sequence i > 0 of n
    }
    if steps:
        attributes.update(
            {
                "disagg.decode.batch_size.min": min(steps),
                "disagg.decode.batch_size.max": max(steps),
                "disagg.decode.batch_size.mean": sum(steps) / len(steps),
                "disagg.decode.batch_sizes_seen": sorted(set(steps)),
            }
        )
    span_between(clock, "decode", loaded, times.end, attributes, parent=parent)
