"""The decode side's spans and metrics: the KV transfer as received, queue wait, KV load and the decode loop."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context

from disagg.kv.framing import event_of
from disagg.kv.transports import transport_name
from disagg.telemetry.metrics import DecodeMetrics, current
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


# Handoffs in progress on this decode worker, by request id, until record_decode takes them. The servicer's
# generator may be finalized in another task (the gateway closes the stream after the last token), where context
# variables of the call are gone: hence a dict, and the call's trace context kept in the KvTransfer.
_transfers: dict[str, KvTransfer] = {}
MAX_PENDING_TRANSFERS = 4096


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
                if len(_transfers) >= MAX_PENDING_TRANSFERS:  # handoffs refused before decoding are never taken
                    _transfers.pop(next(iter(_transfers)))
                _transfers[message.start.request_id] = transfer
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


def observe_kv_transfer(messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Wraps a Decode call's request stream; `record_decode` later turns what it saw into the `kv.transfer` span."""
    return ObservedHandoff(messages, KvTransfer(parent=otel_context.get_current()))


def observe_kv_push(messages: AsyncIterator[Any]) -> ObservedHandoff:
    """Wraps a PushKv stream (direct transport); `record_kv_push` records its `kv.transfer` span at its end."""
    return ObservedHandoff(messages, KvTransfer(parent=otel_context.get_current(), transport="direct"))


def record_kv_push(observed: ObservedHandoff) -> None:
    _record_transfer(observed.transfer, Clock())


def _record_transfer(transfer: KvTransfer, clock: Clock) -> None:
    """The `kv.transfer` span and metrics: first to last KV message received on this worker."""
    if transfer.first is None:
        return
    first = transfer.first
    last = transfer.last or first  # (set with first: every message sets it)
    seconds = last - first
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


def record_decode(seq: Any, finish_reason: str | None = None) -> None:
    """When a decode request ends: spans kv.transfer, decode.queue_wait, kv.load, decode; and their metrics.

    Once per request: a second call finds nothing left to record.

    `seq` is the DecodeSequence (enqueued_at, admitted_at, kv_loaded_at, last_token_at, batch_sizes, output).
    """
    now = time.monotonic()
    transfer = _transfers.pop(seq.request_id, None)
    if transfer is None:  # recorded already (or its handoff was not observed)
        return
    clock = Clock()
    if (m := current(DecodeMetrics)) is not None:
        m.held_prefix_tokens.inc(transfer.held_prefix_tokens)
    if transfer.transport != "direct":  # a direct push records its own transfer
        _record_transfer(transfer, clock)
    _record_decode_phases(seq, transfer.parent, clock, now, finish_reason)


def call_context() -> otel_context.Context:
    """The running RPC's trace context, for spans recorded after it moved on (record_aggregated)."""
    return otel_context.get_current()


def record_aggregated(prompt: Any, seq: Any, parent: otel_context.Context | None) -> None:
    """When one sequence of an AggregatedService request ends: spans prefill.queue_wait and prefill.forward (the
    prompt's, on this worker), then decode.queue_wait, kv.load and decode as for a handed-over sequence.

    `prompt` is the engine's Prompt (enqueued_at, prefill_started, prefill_seconds, prefill_batch_size,
    cached_tokens), `seq` the DecodeSequence, `parent` the call's trace context.
    """
    now, clock = time.monotonic(), Clock()
    started = prompt.prefill_started
    m = current(DecodeMetrics)
    if m is not None and started and seq is prompt.sequences[0]:
        m.prefix_cached_tokens.inc(prompt.cached_tokens)
    if started and seq is prompt.sequences[0] and recording(parent):
        span_between(clock, "prefill.queue_wait", prompt.enqueued_at, started, parent=parent)
        attributes = {
            "disagg.prefill.batch_size": prompt.prefill_batch_size,
            "disagg.prefill.tokens": len(prompt.input_ids),
            "disagg.prefix_cache.cached_tokens": prompt.cached_tokens,
        }
        span_between(clock, "prefill.forward", started, started + prompt.prefill_seconds, attributes, parent=parent)
    if started:  # (a prompt cancelled before its prefill has no decode phases)
        _record_decode_phases(seq, parent, clock, now)


def _record_decode_phases(
    seq: Any, parent: otel_context.Context | None, clock: Clock, now: float, finish_reason: str | None = None
) -> None:
    admitted, loaded = getattr(seq, "admitted_at", 0.0), getattr(seq, "kv_loaded_at", 0.0)
    steps = list(getattr(seq, "batch_sizes", ()))
    finish_reason = finish_reason or getattr(seq.output, "finish_reason", None) or ""
    end = getattr(seq, "last_token_at", 0.0) or now  # the last token sampled (or the request's end, if none)
    decode_seconds = end - loaded if loaded else 0.0
    tpot = decode_seconds / len(steps) if steps else 0.0
    m = current(DecodeMetrics)
    if m is not None:
        if admitted:
            m.queue_wait.observe(max(0.0, admitted - seq.enqueued_at))
            m.kv_load.observe(max(0.0, loaded - admitted))
        for size in steps:
            m.batch_size.observe(size)
        if steps:
            m.tpot.observe(tpot)
            m.generation_tokens.inc(len(steps))
    if not recording(parent):
        return
    if not admitted:  # cancelled or failed before it joined the batch
        span_between(clock, "decode.queue_wait", seq.enqueued_at, now, {"disagg.admitted": False}, parent=parent)
        return
    span_between(clock, "decode.queue_wait", seq.enqueued_at, admitted, parent=parent)
    span_between(clock, "kv.load", admitted, loaded, {"disagg.kv.tokens": len(seq.context)}, parent=parent)
    attributes = {
        "disagg.decode.steps": len(steps),
        "disagg.decode.tokens": len(steps),
        "disagg.decode.time_per_output_token_seconds": tpot,
        "disagg.finish_reason": finish_reason,
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
    span_between(clock, "decode", loaded, end, attributes, parent=parent)
