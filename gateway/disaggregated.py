"""The disaggregated path: prefill on one worker, relay its KV chunk by chunk to a decode worker, stream tokens back.

Relayed and shared memory: the decode worker is chosen when SequenceStart arrives, and a refusal moves the same
handoff to another one (Routes.admit), while the prefill's KV waits in its stream, so the prompt is not computed
again. Direct: it is chosen first, because the prefill worker pushes the KV to it; its refusal (of the Decode call,
or of the push, reported by the prefill worker) raises WorkerRefused, and the request runs the whole attempt again
for another decode worker: a pushed cache cannot be redirected, so that prompt is computed again. A handoff that
leaves out the blocks a decode worker holds (disagg/kv/held_prefix.py) can go only to that worker.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from disagg import telemetry
from disagg.errors import ProtocolError
from disagg.kv.framing import is_chunk_message
from disagg.kv.transports import DIRECT
from disagg.pb.disagg.v1 import gateway_pb2, worker_pb2
from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
from disagg.rpc.streams import ReadAhead
from gateway.progress import Progress
from gateway.routes import Routes
from gateway.worker_calls import Deadline, WorkerFailed, open_admitted, open_held, receive, send_to
from gateway.worker_pool import Worker


async def disaggregated_attempt(
    routes: Routes, progress: Progress, deadline: Deadline
) -> AsyncIterator[gateway_pb2.GenerateResponse]:
    """One try: prefill, hand the KV to a decode worker that admits it, stream the tokens."""
    attempt = _Handoff(routes, progress, deadline)
    try:
        async with contextlib.aclosing(attempt.run()) as responses:
            async for response in responses:
                yield response
    finally:
        attempt.close()


class _Handoff:
    """One attempt's workers and calls, each released by `close` whatever happened."""

    def __init__(self, routes: Routes, progress: Progress, deadline: Deadline):
        self.routes, self.progress, self.deadline = routes, progress, deadline
        self.request = progress.prefill_request()
        self.metadata = telemetry.call_metadata(self.request.request_id)
        self.prefill_worker: Worker[RelayPrefillStub] | None = None  # None again once its stream is done
        self.prefill_call: grpc.aio.UnaryStreamCall | None = None
        self.relayed: ReadAhead | None = None
        self.decode_worker: Worker[RelayDecodeStub] | None = None
        self.decode_call: grpc.aio.StreamStreamCall | None = None
        self.held, progress.held = progress.held, None  # this attempt only: a retry or resumption hands over whole

    async def run(self) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        """The recipe: workers, the prefill call, its stream relayed to the decode call, then the decode stream."""
        timeout = self.deadline.timeout()  # (before any worker counts this attempt in flight)
        prefill_worker, pushes_to = await self._choose_workers()
        prefill_worker.begin()
        self.prefill_worker = prefill_worker
        self.prefill_call = prefill_worker.stub.Prefill(self.request, timeout=timeout, metadata=self.metadata)
        self.relayed = ReadAhead(receive(prefill_worker, self.prefill_call, pushes_to))
        async for raw in self.relayed:
            if is_chunk_message(raw):  # relayed unparsed; the decode worker checks it
                kind = "kv_chunk"
            else:
                message = worker_pb2.PrefillResponse.FromString(raw)
                kind = message.WhichOneof("event")
            if kind == "start":
                await self._open_decode(message.start, raw)
                continue
            if self.decode_call is None:
                raise ProtocolError(f"prefill worker sent {kind} before SequenceStart")
            if kind == "prompt_logprobs":  # for the client only: the decode worker does not need them
                self.progress.note_prompt_logprobs(message.prompt_logprobs)
                continue
            if kind == "first_token":
                yield self._first_token(message.first_token)
                if self.progress.done:
                    return
            assert self.decode_worker is not None  # chosen before its call was made
            await send_to(self.decode_worker, self.decode_call, raw)
        prefill_worker.end()
        self.prefill_worker = None
        if self.decode_call is None:
            raise ProtocolError("prefill worker ended the stream without SequenceStart")
        assert self.decode_worker is not None  # chosen before its call was made
        await send_to(self.decode_worker, self.decode_call)
        async for out in receive(self.decode_worker, self.decode_call):
            yield self.routes.respond(self.decode_worker, self.progress, out)
            if self.progress.done:
                return
        raise WorkerFailed(self.decode_worker, "stream ended without a finish reason")

    async def _choose_workers(self) -> tuple[Worker[RelayPrefillStub], Worker[RelayDecodeStub] | None]:
        """The prefill worker (KV-aware when routing by prefix) and, where the KV's destination must be named in the
        request (a held prefix, direct), the decode worker (counted in flight); returns the prefill worker and the
        one it pushes the KV to (direct)."""
        routes, request, held = self.routes, self.request, self.held
        router = routes.prefix_router
        if router is None:
            prefill_worker = routes.prefill.pick()
        else:
            prefill_worker = router.pick(request, blocks=await router.prompt_blocks(request))
        if held is not None and (not held.worker.healthy or held.worker.address in self.progress.refusals):
            self.held = held = None
        if held is not None:  # only the worker that holds the first blocks can take this handoff
            self.decode_worker = held.worker
            self.decode_worker.begin()
        # (set on every attempt: `request` may be the one the last attempt changed)
        request.kv_destination.prefix_tokens = held.tokens if held is not None else 0
        request.kv_destination.prefix_block_tokens = held.block_tokens if held is not None else 0
        pushes_to = None
        if routes.transport == DIRECT:  # the decode worker is chosen first: the prefill worker pushes the KV to it
            if self.decode_worker is None:
                self.decode_worker = routes.pick_decode(self.progress)
                self.decode_worker.begin()
            pushes_to = self.decode_worker
            request.kv_destination.decode_address = pushes_to.address
            request.kv_destination.handle = f"{request.request_id}/{uuid.uuid4().hex}"
        request.kv_destination.transport = routes.transport
        return prefill_worker, pushes_to

    async def _open_decode(self, start: worker_pb2.SequenceStart, raw: bytes) -> None:
        """SequenceStart arrived: the Decode call, on a worker that admitted the sequence."""
        self.progress.note_start(start)
        router = self.routes.prefix_router
        if router is not None:
            assert self.prefill_worker is not None  # (its stream is being read)
            router.record(self.prefill_worker, self.request, start)
        timeout = self.deadline.timeout()
        if self.decode_worker is None:
            self.decode_worker, self.decode_call = await self.routes.admit(self.progress, raw, timeout, self.metadata)
        elif self.held is None:  # direct: only the worker the KV is pushed to will do
            self.decode_call = await open_admitted(self.decode_worker, raw, timeout, self.metadata)
        else:
            self.decode_call = await open_held(self.decode_worker, self.held, raw, timeout, self.metadata)

    def _first_token(self, first: worker_pb2.FirstToken) -> gateway_pb2.GenerateResponse:
        """The prefill worker's first token (it is relayed to the decode worker too, which continues from it)."""
        if first.HasField("phases"):
            assert self.prefill_worker is not None  # (its stream is being read)
            self.progress.note_prefill(gateway_pb2.PREFILL_LOCATION_REMOTE, self.prefill_worker, first.phases)
        self.progress.note_cached(first.cached_tokens)
        logprobs = [first.logprob] if first.HasField("logprob") else []
        return self.progress.response(first.text, [first.token_id], first.finish_reason, first.index, logprobs)

    def close(self) -> None:
        """Release what the attempt holds: its calls cancelled, its workers no longer counting it in flight."""
        if self.relayed is not None:
            self.relayed.close()
        if self.prefill_call is not None:
            self.prefill_call.cancel()
        if self.prefill_worker is not None:
            self.prefill_worker.end()
        if self.decode_call is not None:
            self.decode_call.cancel()
        if self.decode_worker is not None:
            self.decode_worker.end()
