"""PrefillService: tokenize and validate, queue for the batched forward pass, stream first token and KV cache;
and report the prefix cache's contents to routers (WatchKvEvents)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from disagg import telemetry
from disagg.engine.prefill import PrefillEngine, PrefillJob, PrefillResult
from disagg.handoff.senders import PushClients, make_sender
from disagg.handoff.shared_memory import SharedMemorySegments
from disagg.kv.codec import KvLayout
from disagg.kv.events import DEFAULT_MAX_PENDING, CacheWatch, batched, event_messages
from disagg.kv.held_prefix import set_skipped, skipped_prefix
from disagg.kv.prefix_cache import PrefixCache
from disagg.kv.transports import DIRECT, RELAYED
from disagg.model.dtypes import DTYPE_NAMES
from disagg.model.grammar import model_grammars
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import new_output
from disagg.model.sampling import for_sequence
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.rpc.convert import layout_to_pb, logprob_to_pb, prompt_logprobs_to_pb
from disagg.rpc.prompt import resolve_request

if TYPE_CHECKING:
    import torch


class PrefillServicer(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(
        self,
        lm: LoadedModel,
        engine: PrefillEngine,
        chunk_bytes: int,
        wire_dtype: str = "auto",
        layerwise: bool = False,
        push_clients: PushClients | None = None,
        segments: SharedMemorySegments | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.lm, self.engine, self.chunk_bytes, self.layerwise = lm, engine, chunk_bytes, layerwise
        # what WatchKvEvents reports (the engine's, or an empty one that is off: a snapshot of nothing)
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache(lm.fingerprint, 0)
        self.instance_id = uuid.uuid4().hex  # a restart is a new id: routers drop what they knew of the old cache
        self.watches: set[CacheWatch] = set()
        self.watch_max_pending = DEFAULT_MAX_PENDING  # keys a watcher may fall behind by before it is dropped
        # "" on the wire = the model's dtype (lossless, no conversion); naming the model's dtype is the same
        self.wire_dtype = "" if wire_dtype in ("auto", "", DTYPE_NAMES[lm.dtype]) else wire_dtype
        self.push_clients = push_clients or PushClients()
        self.segments = segments or SharedMemorySegments()
        self.grammars = model_grammars(lm)  # structured output: each grammar compiled once, on first use
        self.active = 0  # Prefill calls in progress

    def load(self) -> dict[str, int]:
        return dict(active_sequences=self.active, queued=len(self.engine.waiting))

    async def WatchKvEvents(
        self, request: worker_pb2.WatchKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WatchKvEventsResponse]:
        """The snapshot, then the cache's changes in batches (disagg.kv.events), until the caller leaves or the
        worker stops (end_watches); WatcherOverflow (RESOURCE_EXHAUSTED) for a caller that fell too far behind."""
        cache, watch = self.prefix_cache, CacheWatch(self.prefix_cache, self.watch_max_pending)
        self.watches.add(watch)
        try:
            first, *rest = list(batched(watch.snapshot)) or [[]]
            yield worker_pb2.WatchKvEventsResponse(
                snapshot=worker_pb2.KvCacheSnapshot(
                    instance_id=self.instance_id,
                    model=self.lm.name,
                    model_fingerprint=cache.fingerprint,
                    block_tokens=cache.block_tokens,
                    block_keys=first,
                )
            )
            for keys in rest:
                yield worker_pb2.WatchKvEventsResponse(events=worker_pb2.KvCacheEvents(stored=keys))
            while (batch := await watch.next_batch()) is not None:
                for stored, removed in event_messages(*batch):
                    events = worker_pb2.KvCacheEvents(stored=stored, removed=removed)
                    yield worker_pb2.WatchKvEventsResponse(events=events)
        finally:
            watch.close()
            self.watches.discard(watch)

    def end_watches(self) -> None:
        """Shutdown: end every WatchKvEvents stream (they would otherwise hold the grace period to its end)."""
        for watch in list(self.watches):
            watch.close()

    def _layout(self, seq_len: int) -> KvLayout:
        layers, heads, head_dim = self.lm.kv_shape()
        return KvLayout(
            DTYPE_NAMES[self.lm.dtype], layers, heads, seq_len, head_dim, self.lm.fingerprint, self.wire_dtype
        )

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.PrefillResponse | bytes]:  # bytes: chunk messages, serialized already
        self.active += 1
        try:
            async for response in self._prefill(request, context.time_remaining()):
                yield response
        finally:
            self.active -= 1

    async def _prefill(
        self, request: worker_pb2.PrefillRequest, time_remaining: float | None
    ) -> AsyncIterator[worker_pb2.PrefillResponse | bytes]:
        resolved = resolve_request(self.lm, request)
        input_ids, params = resolved.input_ids, resolved.params
        if params.grammar is not None:  # compiled off the event loop (cached: once per grammar)
            await asyncio.to_thread(self.grammars.prepare, params.grammar)
        # (a resumed sequence's generated tokens rebuild its grammar's state)
        lm, grammars = self.lm, self.grammars
        output = new_output(lm.tokenizer, params, lm.eos_token_ids, grammars, resolved.generated)
        forks = [
            new_output(lm.tokenizer, for_sequence(params, i), lm.eos_token_ids, grammars) for i in range(1, params.n)
        ]

        loop = asyncio.get_running_loop()
        done: asyncio.Future[PrefillResult] = loop.create_future()

        def deliver(result: PrefillResult | BaseException) -> None:
            loop.call_soon_threadsafe(_settle, done, result)

        job = PrefillJob(request.request_id, input_ids, output, deliver, forks=forks)
        if not resolved.generated:  # (a resumed sequence's prompt logprobs were sent by its first prefill)
            job.prompt_logprobs = params.prompt_logprobs
        destination = request.kv_destination
        # the decode worker may hold the first blocks already (disagg/kv/held_prefix.py): only the rest is sent
        skipped = skipped_prefix(destination, input_ids, self.lm.fingerprint)
        skip = skipped.tokens if self.engine.kv_cache else 0
        layout = self._layout(len(input_ids) - skip)
        sender = None
        if self.engine.kv_cache:
            sender = make_sender(
                destination,
                layout,
                self.chunk_bytes,
                request.request_id,
                self.push_clients,
                self.segments,
                time_remaining,
            )
        layers: asyncio.Queue[tuple[int, torch.Tensor, torch.Tensor] | None] | None = None
        if self.layerwise and sender is not None:  # K/V of each layer as the forward pass computes it, then None
            layers = asyncio.Queue()
            job.on_kv_layer = lambda *item: loop.call_soon_threadsafe(layers.put_nowait, item)

            def deliver_then_end(result: PrefillResult | BaseException) -> None:  # then the end of the layers
                deliver(result)
                loop.call_soon_threadsafe(layers.put_nowait, None)

            job.deliver = deliver_then_end
        pb_layout = layout_to_pb(layout, kv_included=sender is not None)
        pb_layout.transport = destination.transport or RELAYED
        pb_layout.handle = destination.handle if destination.transport == DIRECT else ""
        if skip:
            set_skipped(pb_layout, skipped)
        handed_over = first_sent = False
        try:  # from the sender's creation: a call ended at any yield (even the first) removes its segment
            self.engine.submit(job)
            yield worker_pb2.PrefillResponse(start=resolved.sequence_start(self.lm.name, pb_layout))
            while layers is not None and (item := await layers.get()) is not None:
                if done.done() and not first_sent:  # the forward pass ended: the first token before queued layers
                    first_sent = True
                    for message in _first_tokens(job, done.result()):
                        yield message
                assert sender is not None  # (layers are queued only with a sender)
                layer, keys, values = item
                for message in await sender.send_layer(layer, keys[:, :, skip:], values[:, :, skip:]):
                    yield message
            result = await done
            if not first_sent:
                for message in _first_tokens(job, result):
                    yield message
            if sender is not None and not result.all_finished:
                if layers is None:
                    assert result.kv is not None  # a sender means the engine keeps the KV cache
                    for layer, (keys, values) in enumerate(result.kv):
                        for message in await sender.send_layer(layer, keys[:, :, skip:], values[:, :, skip:]):
                            yield message
                for message in await sender.finish():
                    yield message
                handed_over = True
        finally:
            job.cancelled = True  # dropped from the queue if the caller left before the forward pass
            if sender is not None and not handed_over:  # failed, cancelled, or finished at its first token
                sender.abort()


def _first_tokens(job: PrefillJob, result: PrefillResult) -> list[worker_pb2.PrefillResponse]:
    """One FirstToken per sequence (n of them from the one forward pass), each with its logprobs if asked; the
    prompt's logprobs before them if asked."""
    phases = telemetry.record_prefill(job, result).to_pb()
    messages = []
    if result.prompt_logprobs is not None:
        messages.append(worker_pb2.PrefillResponse(prompt_logprobs=prompt_logprobs_to_pb(result.prompt_logprobs)))
    for index, sample in enumerate(result.samples):
        first = worker_pb2.FirstToken(
            token_id=sample.token,
            text=sample.text,
            finish_reason=sample.finish_reason or "",
            prefill_seconds=result.forward_seconds,
            index=index,
            cached_tokens=result.cached_tokens,
            phases=phases,
        )
        if sample.logprobs is not None:
            first.logprob.CopyFrom(logprob_to_pb(sample.logprobs))
        messages.append(worker_pb2.PrefillResponse(first_token=first))
    return messages


def _settle(future: asyncio.Future[PrefillResult], result: PrefillResult | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
