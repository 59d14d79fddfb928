"""DecodeService: receive a handed-over sequence (start, first token, KV chunks), decode it in the shared batch."""

from __future__ import annotations

import asyncio

from decode_worker.forks import Deliver, forked_sequences, response_of
from disagg import telemetry
from disagg.engine.budget import KvBudget
from disagg.engine.decode import DecodeEngine, TokenEvent
from disagg.kv.inbox import KvInbox
from disagg.kv.receive import Handoff, receive_handoff
from disagg.model.loading import LoadedModel
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc


def final_kv_bytes(lm: LoadedModel, start: worker_pb2.SequenceStart) -> int:
    """KV bytes the sequence holds when it reaches max_new_tokens (what the budget reserves up front)."""
    layers, heads, head_dim = lm.kv_shape()
    tokens = len(start.prompt_token_ids) + start.sampling.max_new_tokens
    return 2 * layers * heads * head_dim * tokens * lm.dtype.itemsize


class DecodeServicer(worker_pb2_grpc.DecodeServiceServicer):
    def __init__(self, lm: LoadedModel, engine: DecodeEngine, budget: KvBudget):
        self.lm, self.engine, self.budget = lm, engine, budget
        self.inbox = KvInbox(lm.fingerprint, max_bytes=budget.limit)
        self.active = 0  # Decode calls in progress: receiving KV, waiting or running

    def load(self) -> dict:
        return dict(
            active_sequences=self.active,
            queued=len(self.engine.waiting),
            kv_bytes=self.engine.batch.kv_bytes + self.inbox.bytes_held,
            kv_budget_bytes=self.budget.limit,
        )

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
            handoff = await receive_handoff(
                telemetry.observe_kv_transfer(request_iterator),
                self.lm,
                self.engine.kv_cache,
                self.inbox,
                context.time_remaining() or 60.0,
            )
            if self.engine.kv_cache:
                reserved = final_kv_bytes(self.lm, handoff.start) * max(1, handoff.start.sampling.n)
                self.budget.reserve(reserved)
            async for response in self._decode(handoff):
                yield response
        finally:
            self.budget.release(reserved)
            self.active -= 1

    async def _decode(self, handoff: Handoff):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, TokenEvent | BaseException]] = asyncio.Queue()

        def deliver_to(index: int) -> Deliver:
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))

        running = forked_sequences(self.lm, handoff, deliver_to)  # n > 1: n sequences sharing the received KV
        try:
            for seq in running.values():
                self.engine.submit(seq)  # may refuse (queue full): the ones already in are cancelled below
            while running:
                index, event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                if event.finish_reason is not None:  # record now: a closed stream is finalized later, maybe much later
                    telemetry.record_decode(running.pop(index))
                yield response_of(index, event)
        finally:
            for seq in running.values():  # client gone, deadline passed or a failure: free the sequences' KV now
                self.engine.cancel(seq.request_id)
                telemetry.record_decode(seq)
