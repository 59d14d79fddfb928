"""The gateway's calls to workers, as every request path makes them: a worker's failure or refusal as an exception
that names it, writes to client-streaming calls, the admission of a Decode call, and the time a request has left.

A decode worker that cannot hold a sequence (its KV budget) is not failing: it refuses the Decode call with
RESOURCE_EXHAUSTED right after reading SequenceStart, before anything else was sent (`open_admitted`), so the same
SequenceStart can go to another decode worker.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from disagg import telemetry
from disagg.errors import DeadlineExceeded, ProtocolError, UpstreamError
from disagg.rpc.channel import CallEnded, send
from disagg.rpc.services import RelayDecodeStub
from gateway.worker_pool import Worker

# Status codes that mean "this worker is gone or going", not "this request is wrong": try elsewhere.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# Initial metadata of a Decode call whose worker reserved the sequence's KV budget (see open_admitted).
ADMITTED = ("disagg-admitted", "1")


class WorkerFailed(Exception):
    def __init__(self, worker: Worker[Any], reason: str):
        super().__init__(f"{worker.kind} worker {worker.address}: {reason}")
        self.worker = worker


class WorkerRefused(UpstreamError):
    """RESOURCE_EXHAUSTED from a worker: healthy but full (a decode worker's KV budget, a queue at its limit).

    Raised to the client as it is, unless the request can go to another worker (a decode worker, see
    Routes.admit)."""

    def __init__(self, worker: Worker[Any], details: str):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{worker.kind} worker {worker.address}: {details}")
        self.worker, self.details = worker, details


class HeldPrefixLost(Exception):
    """The decode worker a handoff left its held blocks out for cannot take it (evicted them, or full): the
    attempt is made again, handed over whole."""

    def __init__(self, outcome: str, tokens: int, refused: WorkerRefused | None = None):
        super().__init__(f"held prefix of {tokens} tokens: {outcome}")
        self.outcome, self.tokens, self.refused = outcome, tokens, refused


@dataclass
class HeldPrefix:
    """What a declining decode worker said it holds: the prompt's first `tokens` tokens, in blocks."""

    worker: Worker[Any]
    tokens: int
    block_tokens: int


class Deadline:
    """A request's time: the client's deadline or the server's limit (`seconds` from now), whichever comes first."""

    def __init__(self, context: grpc.aio.ServicerContext, seconds: float):
        self.context, self.at = context, time.monotonic() + seconds

    def timeout(self) -> float:
        """Seconds left for worker calls; DEADLINE_EXCEEDED when none are."""
        left = self.at - time.monotonic()
        client_left = self.context.time_remaining()
        left = left if client_left is None else min(left, client_left)
        if left <= 0:
            raise DeadlineExceeded("request deadline exceeded")
        return left


def failure(worker: Worker[Any], code: grpc.StatusCode, details: str) -> Exception:
    """A worker's status as the exception the request paths handle."""
    if code in RESUMABLE:
        return WorkerFailed(worker, f"{code.name}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return WorkerRefused(worker, details)
    return UpstreamError(code, f"{worker.kind} worker {worker.address}: {details}")


async def receive(
    worker: Worker[Any],
    call: grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall,
    pushes_to: Worker[RelayDecodeStub] | None = None,
) -> AsyncIterator[Any]:  # (a relayed Prefill call's serialized messages, a Decode call's DecodeResponses)
    """The call's messages; a worker's failure surfaces as WorkerFailed or UpstreamError.

    `pushes_to`: the decode worker a prefill call pushes its KV cache to; ABORTED from the prefill worker means
    that one failed, and RESOURCE_EXHAUSTED after SequenceStart (the prefill worker's own refusal, a full queue,
    comes before it) that one refused the push.
    """
    started = False
    try:
        async for message in call:
            started = True
            yield message
    except grpc.aio.AioRpcError as error:
        if pushes_to is not None and error.code() == grpc.StatusCode.ABORTED:
            raise WorkerFailed(pushes_to, f"prefill worker {worker.address}: {error.details()}") from error
        if pushes_to is not None and started and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise WorkerRefused(pushes_to, f"(via prefill worker {worker.address}) {error.details()}") from error
        raise failure(worker, error.code(), error.details()) from error


async def send_to(
    worker: Worker[RelayDecodeStub], call: grpc.aio.StreamStreamCall, message: bytes | None = None
) -> None:
    """Write one message (None: half-close) to a client-streaming call; a failure names the worker's status."""
    try:
        await send(call, message)
    except CallEnded as ended:
        raise failure(worker, ended.code, ended.details) from ended


def _admitted(metadata: grpc.aio.Metadata | None) -> bool:
    return metadata is not None and metadata.get(ADMITTED[0]) == ADMITTED[1]


async def open_admitted(
    worker: Worker[RelayDecodeStub], start: bytes, timeout: float, metadata: Sequence[tuple[str, str]]
) -> grpc.aio.StreamStreamCall:
    """A Decode call on `worker` that was sent the SequenceStart and admitted it.

    The decode worker reserves the sequence's KV budget on reading SequenceStart, before it allocates anything,
    then sends initial metadata `disagg-admitted: 1`; one that cannot hold the sequence ends the call with
    RESOURCE_EXHAUSTED instead (WorkerRefused, with the worker's reason). Nothing but the SequenceStart was sent,
    so the caller may offer the same bytes to another worker. Other statuses are `failure`'s.
    """
    call = worker.stub.Decode(timeout=timeout, metadata=metadata)
    try:
        try:
            await send(call, start)
        except CallEnded as ended:
            code, details = ended.code, ended.details
        else:
            if _admitted(await call.initial_metadata()):
                return call
            code, details = await call.code(), await call.details()  # (no admission: the call has ended)
        if code == grpc.StatusCode.OK:
            raise ProtocolError(f"decode worker {worker.address} ended the Decode call without admitting it")
        raise failure(worker, code, details)
    except BaseException:
        call.cancel()
        raise


async def open_held(
    worker: Worker[RelayDecodeStub],
    held: HeldPrefix,
    start: bytes,
    timeout: float,
    metadata: Sequence[tuple[str, str]],
) -> grpc.aio.StreamStreamCall:
    """open_admitted for a handoff that leaves out the blocks `worker` holds; HeldPrefixLost when it no longer
    holds them (DATA_LOSS at admission, before the cache was sent) or refuses the sequence."""
    try:
        call = await open_admitted(worker, start, timeout, metadata)
    except WorkerRefused as refused:
        raise HeldPrefixLost("refused", held.tokens, refused) from refused
    except UpstreamError as error:
        if error.code != grpc.StatusCode.DATA_LOSS:
            raise
        raise HeldPrefixLost("gone", held.tokens) from error
    telemetry.record_held_prefix("suffix", held.tokens)
    return call
