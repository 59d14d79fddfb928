"""Gateway.Generate: prefill on one worker, relay its KV chunk by chunk to a decode worker, stream tokens back.

When a worker fails (UNAVAILABLE, or it cancelled the call while shutting down) the request resumes elsewhere: a
prefill worker recomputes prompt + the tokens already sent, a decode worker continues from there, and the client's
stream goes on with no token lost or repeated.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from disagg import telemetry
from disagg.config import GatewayConfig
from disagg.errors import DeadlineExceeded, NoWorkerAvailable, Overloaded, ProtocolError, UpstreamError
from disagg.kv.framing import is_chunk_message
from disagg.kv.transports import DIRECT, TRANSPORT_VALUES
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2
from disagg.rpc.channel import CallEnded, send
from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
from disagg.rpc.streams import ReadAhead
from gateway.validation import to_prefill_request
from gateway.worker_pool import Worker, WorkerPool

log = logging.getLogger(__name__)
# Status codes that mean "this worker is gone or going", not "this request is wrong": try elsewhere.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class WorkerFailed(Exception):
    def __init__(self, worker: Worker[Any], reason: str):
        super().__init__(f"{worker.kind} worker {worker.address}: {reason}")
        self.worker = worker


def _failure(worker: Worker[Any], code: grpc.StatusCode, details: str) -> Exception:
    if code in RESUMABLE:
        return WorkerFailed(worker, f"{code.name}: {details}")
    return UpstreamError(code, f"{worker.kind} worker {worker.address}: {details}")


async def _receive(
    worker: Worker[Any],
    call: grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall,
    pushes_to: Worker[RelayDecodeStub] | None = None,
) -> AsyncIterator[Any]:  # (a relayed Prefill call's serialized messages, a Decode call's DecodeResponses)
    """The call's messages; a worker's failure surfaces as WorkerFailed or UpstreamError.

    `pushes_to`: the decode worker a prefill call pushes its KV cache to; ABORTED from the prefill worker means
    that one failed.
    """
    try:
        async for message in call:
            yield message
    except grpc.aio.AioRpcError as error:
        if pushes_to is not None and error.code() == grpc.StatusCode.ABORTED:
            raise WorkerFailed(pushes_to, f"prefill worker {worker.address}: {error.details()}") from error
        raise _failure(worker, error.code(), error.details()) from error


async def _send(worker: Worker[RelayDecodeStub], call: grpc.aio.StreamStreamCall, message: bytes | None = None) -> None:
    """Write one message (None: half-close) to a client-streaming call; a failure names the worker's status."""
    try:
        await send(call, message)
    except CallEnded as ended:
        raise _failure(worker, ended.code, ended.details) from ended


@dataclass
class Progress:
    """What the client has been sent so far: exactly what a resumed attempt needs."""

    request: worker_pb2.PrefillRequest
    prompt_token_ids: list[int] | None = None
    sampling: worker_pb2.SamplingParams | None = None
    generated: list[int] = field(default_factory=list)
    sent_any: bool = False

    def prefill_request(self) -> worker_pb2.PrefillRequest:
        """The original request, or (after a failure) prompt + generated tokens with the resolved sampling."""
        if self.prompt_token_ids is None:
            return self.request
        resumed = worker_pb2.PrefillRequest()
        resumed.CopyFrom(self.request)
        resumed.prompt_token_ids[:] = self.prompt_token_ids
        resumed.generated_token_ids[:] = self.generated
        resumed.sampling.CopyFrom(self.sampling)
        return resumed

    def response(self, text: str, token_ids: Sequence[int], finish_reason: str = "") -> gateway_pb2.GenerateResponse:
        self.generated.extend(token_ids)
        response = gateway_pb2.GenerateResponse(text=text, token_ids=token_ids, finish_reason=finish_reason)
        if not self.sent_any:
            response.request_id, self.sent_any = self.request.request_id, True
        if finish_reason:
            response.usage.prompt_tokens = len(self.prompt_token_ids or ())
            response.usage.completion_tokens = len(self.generated)
        return response


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self, config: GatewayConfig, prefill: WorkerPool[RelayPrefillStub], decode: WorkerPool[RelayDecodeStub]
    ):
        self.config, self.prefill, self.decode = config, prefill, decode
        self.transport = TRANSPORT_VALUES[config.kv_transport]
        self.in_flight = 0

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        if self.in_flight >= self.config.max_inflight:
            raise Overloaded(f"gateway has {self.in_flight} requests in flight (--max-inflight); retry later")
        progress = Progress(to_prefill_request(request, self.config))
        deadline = time.monotonic() + self.config.request_timeout_seconds
        self.in_flight += 1
        try:
            for attempt in itertools.count(1):
                try:
                    async for response in self._attempt(progress, context, deadline):
                        yield response
                    return
                except WorkerFailed as failure:
                    (self.prefill if failure.worker.kind == "prefill" else self.decode).mark_failed(failure.worker)
                    if attempt >= self.config.max_attempts:
                        raise NoWorkerAvailable(f"request failed on {attempt} workers; last: {failure}") from failure
                    log.warning(
                        "request %s: %s; resuming after %d tokens",
                        progress.request.request_id,
                        failure,
                        len(progress.generated),
                    )
        finally:
            self.in_flight -= 1

    def _timeout(self, context: grpc.aio.ServicerContext, deadline: float) -> float:
        """Seconds left for worker calls: the client's deadline or the server's limit, whichever comes first."""
        left = deadline - time.monotonic()
        client_left = context.time_remaining()
        left = left if client_left is None else min(left, client_left)
        if left <= 0:
            raise DeadlineExceeded("request deadline exceeded")
        return left

    async def _attempt(
        self, progress: Progress, context: grpc.aio.ServicerContext, deadline: float
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        request = progress.prefill_request()
        metadata = telemetry.call_metadata(request.request_id)
        prefill_worker: Worker[RelayPrefillStub] | None  # None once its stream is done
        prefill_worker = self.prefill.pick()
        decode_worker: Worker[RelayDecodeStub] | None = None
        pushes_to: Worker[RelayDecodeStub] | None = None
        decode_call: grpc.aio.StreamStreamCall | None = None
        if self.transport == DIRECT:  # the decode worker is chosen first: the prefill worker pushes the KV to it
            decode_worker = pushes_to = self.decode.pick()
            decode_worker.in_flight += 1
            request.kv_destination.decode_address = decode_worker.address
            request.kv_destination.handle = f"{request.request_id}/{uuid.uuid4().hex}"
        request.kv_destination.transport = self.transport
        prefill_worker.in_flight += 1
        prefill_call = prefill_worker.stub.Prefill(request, timeout=self._timeout(context, deadline), metadata=metadata)
        relayed = ReadAhead(_receive(prefill_worker, prefill_call, pushes_to))
        try:
            async for raw in relayed:
                if is_chunk_message(raw):  # relayed unparsed; the decode worker checks it
                    kind = "kv_chunk"
                else:
                    message = worker_pb2.PrefillResponse.FromString(raw)
                    kind = message.WhichOneof("event")
                if kind == "start":
                    progress.prompt_token_ids = list(message.start.prompt_token_ids)
                    progress.sampling = message.start.sampling
                    telemetry.note_model(message.start.model)
                    if decode_worker is None:
                        decode_worker = self.decode.pick()
                        decode_worker.in_flight += 1
                    decode_call = decode_worker.stub.Decode(timeout=self._timeout(context, deadline), metadata=metadata)
                elif decode_call is None:
                    raise ProtocolError(f"prefill worker sent {kind} before SequenceStart")
                if kind == "first_token":
                    first = message.first_token
                    yield progress.response(first.text, [first.token_id], first.finish_reason)
                    if first.finish_reason:
                        return
                assert decode_worker is not None  # chosen before its call was made
                await _send(decode_worker, decode_call, raw)
            prefill_worker.in_flight -= 1
            prefill_worker = None
            if decode_call is None:
                raise ProtocolError("prefill worker ended the stream without SequenceStart")
            assert decode_worker is not None  # chosen before its call was made
            await _send(decode_worker, decode_call)
            async for out in _receive(decode_worker, decode_call):
                yield progress.response(out.text, out.token_ids, out.finish_reason)
                if out.finish_reason:
                    return
            raise WorkerFailed(decode_worker, "stream ended without a finish reason")
        finally:
            relayed.close()
            prefill_call.cancel()
            if prefill_worker is not None:
                prefill_worker.in_flight -= 1
            if decode_call is not None:
                decode_call.cancel()
            if decode_worker is not None:
                decode_worker.in_flight -= 1
