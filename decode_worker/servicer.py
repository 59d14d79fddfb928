"""DecodeService: receive a handed-over sequence (start, first token, KV chunks), decode it in the shared batch."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from disagg import telemetry
from disagg.decode_engine import DecodeEngine, DecodeSequence, TokenEvent
from disagg.errors import DisaggError, InvalidRequest, KvIntegrityError, ProtocolError
from disagg.kv_codec import KvAssembler
from disagg.kv_transport import DIRECT, KvInbox, adopt_shared_memory
from disagg.model import LoadedModel
from disagg.output_stream import OutputStream
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.prefill_batch import KvLayers
from disagg.serving import ReadAhead
from disagg.wire import event_of, layout_from_pb, sampling_from_pb
from disagg.worker_load import KvBudget


@dataclass
class Handoff:
    start: worker_pb2.SequenceStart
    first_token: worker_pb2.FirstToken
    kv: KvLayers | None


async def receive_handoff(requests, lm: LoadedModel, kv_cache: bool, inbox: KvInbox | None = None,
                          timeout: float = 60.0) -> Handoff:
    """Read SequenceStart, then FirstToken and the KV cache in any order, until both are complete.

    The cache comes as KvChunk messages in this stream (relayed), as one KvSharedMemory message (co-located
    workers), or pushed by the prefill worker to `inbox` under the layout's handle (direct).
    """
    start = None
    try:
        with ReadAhead(requests) as messages:  # the next chunk arrives while this one is checked and copied
            try:
                async for message in messages:
                    kind = event_of(message)
                    if kind != "start":
                        raise ProtocolError(f"{kind} before SequenceStart")
                    start = message.start
                    break
                if start is None:
                    raise ProtocolError("stream ended before SequenceStart")
                return await _receive_cache(start, messages, lm, kv_cache, inbox, timeout)
            except DisaggError:
                await drain(messages)  # the same reader: no read is cancelled and restarted in between
                raise
    except BaseException:  # failed or cancelled: a directly pushed cache nobody will claim goes now, not at its TTL
        if start is not None and start.kv_layout.transport == DIRECT and inbox is not None:
            inbox.abandon(start.kv_layout.handle)
        raise


async def _receive_cache(start: worker_pb2.SequenceStart, requests, lm: LoadedModel, kv_cache: bool,
                         inbox: KvInbox | None, timeout: float) -> Handoff:
    """After SequenceStart: FirstToken and the cache, in any order."""
    first = assembler = None
    if kv_cache:
        if start.kv_layout.total_bytes == 0:
            raise ProtocolError("this decode worker needs the KV cache, the prefill worker sent none "
                                "(is one of them running with --no-kv-cache?)")
        if start.kv_layout.transport != DIRECT:
            assembler = KvAssembler(layout_from_pb(start.kv_layout), expected_fingerprint=lm.fingerprint)
            if assembler.layout.total_bytes != start.kv_layout.total_bytes:
                raise KvIntegrityError("KV layout's total_bytes does not match its shape")
        elif inbox is None or not start.kv_layout.handle:
            raise ProtocolError("a directly pushed KV cache needs a handle and a decode worker that takes pushes")
    async for message in requests:
        kind = event_of(message)
        if kind == "start":
            raise ProtocolError("SequenceStart sent twice")
        if kind in ("kv_chunk", "shared_memory"):
            if assembler is None:
                raise ProtocolError(f"{kind} sent to a decode worker running with --no-kv-cache, or with a "
                                    "directly pushed KV cache")
            if kind == "kv_chunk":
                assembler.add(message)  # a Chunk: see wire.handoff_deserializer
            else:
                adopt_shared_memory(message.shared_memory, assembler)
        elif kind == "first_token":
            first = message.first_token
        if first is not None and (assembler is None or assembler.complete):
            if kv_cache and assembler is None:  # direct: the prefill worker pushes the cache to the inbox
                layers = await inbox.claim(start.kv_layout.handle, layout_from_pb(start.kv_layout), timeout)
                return Handoff(start, first, layers)
            return Handoff(start, first, assembler.layers() if assembler else None)
    if first is None:
        raise ProtocolError("stream ended before FirstToken")
    raise KvIntegrityError(f"KV cache incomplete: {assembler.received} of {assembler.layout.total_bytes} bytes")


def final_kv_bytes(lm: LoadedModel, start: worker_pb2.SequenceStart) -> int:
    """KV bytes the sequence holds when it reaches max_new_tokens (what the budget reserves up front)."""
    layers, heads, head_dim = lm.kv_shape()
    tokens = len(start.prompt_token_ids) + start.sampling.max_new_tokens
    return 2 * layers * heads * head_dim * tokens * lm.dtype.itemsize


async def drain(requests, max_messages: int = 256, seconds: float = 5.0) -> None:
    """Read and drop what the client is still sending before refusing its handoff.

    A gRPC client whose write races with the server's early abort sees a local INTERNAL error instead of the
    server's status; letting it finish writing (within bounds) lets it see why the handoff was refused.
    """
    async def consume() -> None:
        count = 0
        async for _ in requests:
            count += 1
            if count >= max_messages:
                return

    with contextlib.suppress(Exception):
        await asyncio.wait_for(consume(), seconds)


class DecodeServicer(worker_pb2_grpc.DecodeServiceServicer):
    def __init__(self, lm: LoadedModel, engine: DecodeEngine, budget: KvBudget):
        self.lm, self.engine, self.budget = lm, engine, budget
        self.inbox = KvInbox(lm.fingerprint, max_bytes=budget.limit)
        self.active = 0  # Decode calls in progress: receiving KV, waiting or running

    def load(self) -> dict:
        return dict(active_sequences=self.active, queued=len(self.engine.waiting),
                    kv_bytes=self.engine.batch.kv_bytes + self.inbox.bytes_held, kv_budget_bytes=self.budget.limit)

    async def PushKv(self, request_iterator, context):
        """The direct transport: a prefill worker's push of one cache, kept until its Decode call claims it."""
        observed = telemetry.observe_kv_push(request_iterator)
        try:
            received = await self.inbox.receive(observed)
        finally:
            telemetry.record_kv_push(observed)
        return worker_pb2.PushKvResponse(received_bytes=received)

    async def Decode(self, request_iterator, context):
        self.active += 1
        reserved = 0
        try:
            handoff = await receive_handoff(telemetry.observe_kv_transfer(request_iterator), self.lm,
                                            self.engine.kv_cache, self.inbox, context.time_remaining() or 60.0)
            if self.engine.kv_cache:
                reserved = final_kv_bytes(self.lm, handoff.start)
                self.budget.reserve(reserved)
            async for response in self._decode(handoff):
                yield response
        finally:
            self.budget.release(reserved)
            self.active -= 1

    async def _decode(self, handoff: Handoff):
        start = handoff.start
        params = sampling_from_pb(start.sampling)
        if params.max_new_tokens <= 0:
            raise InvalidRequest("sampling.max_new_tokens must be resolved (> 0) before decode")
        output = OutputStream(self.lm.tokenizer, params, self.lm.eos_token_ids)
        output.replay([*start.generated_token_ids, handoff.first_token.token_id])
        if output.finish_reason is not None:
            raise ProtocolError(f"sequence already finished ({output.finish_reason}); nothing to decode")

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        seq = DecodeSequence(start.request_id, [*start.prompt_token_ids, *start.generated_token_ids], output,
                             handoff.kv, deliver=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        self.engine.submit(seq)
        finished = False
        try:
            while not finished:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                finished = event.finish_reason is not None
                if finished:  # record now: a stream the client closes is finalized later, maybe much later
                    telemetry.record_decode(seq)
                yield worker_pb2.DecodeResponse(token_ids=[event.token], text=event.text,
                                                finish_reason=event.finish_reason or "")
        finally:
            if not finished:  # client gone, deadline passed or a failure: free the sequence's KV now
                self.engine.cancel(start.request_id)
                telemetry.record_decode(seq)
