"""Gateway.Generate: prefill on one worker, relay its KV chunk by chunk to a decode worker, stream tokens back.

When a worker fails (UNAVAILABLE, or it cancelled the call while shutting down) the request resumes elsewhere: a
prefill worker recomputes prompt + the tokens already sent, a decode worker continues from there, and the client's
stream goes on with no token lost or repeated.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from disagg import telemetry
from disagg.config import GatewayConfig
from disagg.errors import DeadlineExceeded, NoWorkerAvailable, Overloaded, ProtocolError, UpstreamError
from disagg.kv.framing import is_chunk_message
from disagg.kv.transports import DIRECT, TRANSPORT_VALUES
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2
from disagg.rpc.channel import CallEnded, send
from disagg.rpc.streams import ReadAhead
from gateway.stream_interval import coalesced
from gateway.validation import to_prefill_request
from gateway.worker_pool import Worker, WorkerPool

log = logging.getLogger(__name__)
# Status codes that mean "this worker is gone or going", not "this request is wrong": try elsewhere.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class WorkerFailed(Exception):
    def __init__(self, worker: Worker, reason: str):
        super().__init__(f"{worker.kind} worker {worker.address}: {reason}")
        self.worker = worker


def _failure(worker: Worker, code: grpc.StatusCode, details: str) -> Exception:
    if code in RESUMABLE:
        return WorkerFailed(worker, f"{code.name}: {details}")
    return UpstreamError(code, f"{worker.kind} worker {worker.address}: {details}")


async def _receive(worker: Worker, call, pushes_to: Worker | None = None):
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


async def _send(worker: Worker, call, message=None) -> None:
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
    generated: list[int] = field(default_factory=list)  # sequence 0's (n = 1 requests resume from these)
    sent_any: bool = False
    finished: set[int] = field(default_factory=set)  # indices of the n sequences that have their finish reason
    completion_tokens: int = 0  # of all n sequences

    @property
    def n(self) -> int:
        return max(1, self.request.sampling.n)

    @property
    def done(self) -> bool:
        return len(self.finished) >= self.n

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

    def response(
        self, text: str, token_ids, finish_reason: str = "", index: int = 0, logprobs=()
    ) -> gateway_pb2.GenerateResponse:
        if index == 0:
            self.generated.extend(token_ids)
        self.completion_tokens += len(token_ids)
        response = gateway_pb2.GenerateResponse(
            text=text, token_ids=token_ids, finish_reason=finish_reason, index=index, logprobs=logprobs
        )
        if not self.sent_any:
            response.request_id, self.sent_any = self.request.request_id, True
        if finish_reason:
            self.finished.add(index)
            if self.done:
                response.usage.prompt_tokens = len(self.prompt_token_ids or ())
                response.usage.completion_tokens = self.completion_tokens
        return response


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig, prefill: WorkerPool, decode: WorkerPool):
        self.config, self.prefill, self.decode = config, prefill, decode
        self.transport = TRANSPORT_VALUES[config.kv_transport]
        self.in_flight = 0

    async def Generate(self, request: gateway_pb2.GenerateRequest, context):
        """The pipeline both fronts call (gRPC here, HTTP in gateway.openai_api): validate, route, retry, stream."""
        responses = coalesced(self._generate(request, context), self.config.stream_interval)
        async with contextlib.aclosing(responses):
            async for response in responses:
                yield response

    async def _generate(self, request: gateway_pb2.GenerateRequest, context):
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
                    if progress.n > 1 and progress.sent_any:  # n sequences from one prefill: none resumes alone
                        raise NoWorkerAvailable(
                            f"n > 1 request cannot resume after its first tokens: {failure}"
                        ) from failure
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

    def _timeout(self, context, deadline: float) -> float:
        """Seconds left for worker calls: the client's deadline or the server's limit, whichever comes first."""
        left = deadline - time.monotonic()
        client_left = context.time_remaining()
        left = left if client_left is None else min(left, client_left)
        if left <= 0:
            raise DeadlineExceeded("request deadline exceeded")
        return left

    async def _attempt(self, progress: Progress, context, deadline: float):
        request = progress.prefill_request()
        metadata = telemetry.call_metadata(request.request_id)
        prefill_worker = self.prefill.pick()
        decode_worker = decode_call = pushes_to = None
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
                    logprobs = [first.logprob] if first.HasField("logprob") else []
                    yield progress.response(first.text, [first.token_id], first.finish_reason, first.index, logprobs)
                    if progress.done:
                        return
                await _send(decode_worker, decode_call, raw)
            prefill_worker.in_flight -= 1
            prefill_worker = None
            if decode_call is None:
                raise ProtocolError("prefill worker ended the stream without SequenceStart")
            await _send(decode_worker, decode_call)
            async for out in _receive(decode_worker, decode_call):
                yield progress.response(out.text, out.token_ids, out.finish_reason, out.index, out.logprobs)
                if progress.done:
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
