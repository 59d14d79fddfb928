"""DecodeService: receive a handed-over sequence (start, first token, KV chunks), decode it in the shared batch.

Admission comes first: at SequenceStart the sequence reserves its final KV size in the worker's budget, before
anything is allocated, and the call's initial metadata (`disagg-admitted: 1`) tells the sender to go on; a refusal
is RESOURCE_EXHAUSTED at once, so the gateway can take the same handoff to another decode worker.

A handoff may leave out the first blocks of the sequence's KV when this worker's prefix cache holds them
(disagg/kv/held_prefix.py): they are checked and pinned at admission too (DATA_LOSS, before the cache is sent, when
they are gone) and joined to the received rest before the sequence is queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from decode_worker.forks import forked_sequences, response_of
from decode_worker.token_events import TokenEvents
from disagg import telemetry
from disagg.engine.decode import DecodeEngine
from disagg.handoff.inbox import KvInbox
from disagg.handoff.receive import Handoff, receive_handoff
from disagg.kv.budget import KvBudget, Reservation
from disagg.kv.framing import HandoffMessage
from disagg.kv.held_prefix import pin_held_prefix
from disagg.kv.prefix_cache import PrefixCache, PrefixHit
from disagg.kv.transports import DIRECT
from disagg.model.grammar import model_grammars
from disagg.model.loading import LoadedModel
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.rpc.convert import sampling_from_pb
from disagg.telemetry.decode import KvTransfer, decode_times, received_transfer

ADMITTED = ("disagg-admitted", "1")  # initial metadata: the sequence's KV is reserved, send the cache


def final_kv_bytes(lm: LoadedModel, start: worker_pb2.SequenceStart) -> int:
    """KV bytes the sequence holds when it reaches max_new_tokens (what the budget reserves up front)."""
    layers, heads, head_dim = lm.kv_shape()
    tokens = len(start.prompt_token_ids) + len(start.generated_token_ids) + start.sampling.max_new_tokens
    return 2 * layers * heads * head_dim * tokens * lm.dtype.itemsize


class DecodeServicer(worker_pb2_grpc.DecodeServiceServicer):
    def __init__(
        self, lm: LoadedModel, engine: DecodeEngine, budget: KvBudget, prefix_cache: PrefixCache | None = None
    ):
        """`prefix_cache`: the engine's (a worker with --local-prefill), which handoffs may leave blocks of out."""
        self.lm, self.engine, self.budget, self.prefix_cache = lm, engine, budget, prefix_cache
        self.inbox = KvInbox(lm.fingerprint, budget)
        self.grammars = model_grammars(lm)  # structured output: each grammar compiled once, on first use
        self.active = 0  # Decode calls in progress: receiving KV, waiting or running

    async def PushKv(
        self, request_iterator: AsyncIterator[HandoffMessage], context: grpc.aio.ServicerContext
    ) -> worker_pb2.PushKvResponse:
        """The direct transport: a prefill worker's push of one cache, kept until its Decode call claims it."""
        observed = telemetry.observe_kv_push(request_iterator)
        try:
            received = await self.inbox.receive(observed)
        finally:
            telemetry.record_kv_push(observed)
        return worker_pb2.PushKvResponse(received_bytes=received)

    async def Decode(
        self, request_iterator: AsyncIterator[HandoffMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        self.active += 1
        reservation: Reservation | None = None
        held: PrefixHit | None = None  # the blocks the handoff left out, pinned

        async def admit(start: worker_pb2.SequenceStart) -> None:
            nonlocal reservation, held
            if self.engine.kv_cache:
                held = pin_held_prefix(self.prefix_cache, start)
                nbytes = final_kv_bytes(self.lm, start) * max(1, start.sampling.n)
                label = f"sequence {start.request_id}"
                reservation = (
                    self.inbox.reserve(start.kv_layout.handle, nbytes, label)
                    if start.kv_layout.transport == DIRECT
                    else self.budget.reserve(nbytes, label)
                )
            await context.send_initial_metadata((ADMITTED,))

        try:
            observed = telemetry.observe_kv_transfer(request_iterator)
            handoff = await receive_handoff(
                observed,
                self.lm,
                self.engine.kv_cache,
                self.inbox,
                context.time_remaining() or 60.0,
                admit=admit,
            )
            transfer = received_transfer(observed, handoff.start.kv_layout.handle)
            if held is not None:  # joined to the received rest (a copy of each tensor: off the event loop)
                pinned, held = held, None
                try:
                    assert handoff.kv is not None  # (blocks are pinned only when the worker keeps KV)
                    handoff.kv = await asyncio.to_thread(pinned.joined, handoff.kv)
                finally:
                    self._release(pinned)
            async for response in self._decode(handoff, reservation, transfer, observed.transfer):
                yield response
        finally:
            if held is not None:
                self._release(held)
            if reservation is not None:  # exactly once, whichever way the call ends
                reservation.release()
            self.active -= 1

    def _release(self, held: PrefixHit) -> None:
        assert self.prefix_cache is not None  # (blocks are pinned only in it)
        self.prefix_cache.release(held)

    async def _decode(
        self, handoff: Handoff, reservation: Reservation | None, transfer: KvTransfer, call: KvTransfer
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        """The handoff's sequences through the batch; the call's last message reports the phases (and `transfer`).
        Each sequence's spans go under the call's trace context, kept in `call` (this call's own stream)."""
        if (grammar := sampling_from_pb(handoff.start.sampling).grammar) is not None:  # compiled off the event loop
            await asyncio.to_thread(self.grammars.prepare, grammar)  # (cached: once per grammar)
        events = TokenEvents(self.engine, lambda seq: telemetry.record_decode(seq, call))
        # n > 1: n sequences sharing the received KV
        events.running.update(forked_sequences(self.lm, handoff, events.deliver_to, self.grammars))
        sequences = list(events.running.values())
        for seq in sequences:
            seq.reservation = reservation  # one reservation for all n (the budget counts it once)
        with events:
            for seq in sequences:
                self.engine.submit(seq)  # may refuse (queue full): the ones already in are cancelled on leaving
            async for index, event in events:
                response = response_of(index, event)
                if not events.running:  # the call's last message
                    response.phases.CopyFrom(decode_times(sequences).to_pb(transfer))
                yield response
