"""The request whole to one worker that prefills and decodes it: aggregated mode, and conditional disaggregation's
local prefill on a decode worker.

Aggregated mode (`--aggregated`): each attempt sends the request whole to one aggregated worker
(AggregatedService/Generate: prefill and decode in its one engine) and relays its tokens; retries, resumption,
refusals (another aggregated worker is tried), deadlines and the responses are the disaggregated path's.

Conditional disaggregation (`--local-prefill-tokens N`, decode workers with `--local-prefill`): an attempt first
offers the request whole to a decode worker (the one that decoded the conversation's last turn, by the decode
router's affinity), as in aggregated mode but with `max_uncached_tokens = N` and `min_cached_share`
(--local-prefill-min-cached); that worker prefills it itself when at most N of its tokens are missing from its own
prefix cache and it holds at least that share (a conversation's next turn after the reply it decoded), and
otherwise declines before doing anything. A declined or refused request takes the disaggregated path (a prefill
worker, then a decode worker), and its retries too. A declined one whose first blocks that worker holds (a long new
message after a conversation it decoded) goes back to it, and the prefill worker sends only the KV after those
blocks (`--handoff-held-prefix`, disagg/kv/held_prefix.py); if the worker evicted them meanwhile (DATA_LOSS at
admission) or is full, the request is handed over again, whole, to whichever decode worker admits it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from disagg import telemetry
from disagg.pb.disagg.v1 import gateway_pb2, worker_pb2, worker_pb2_grpc
from gateway.disaggregated import disaggregated_attempt
from gateway.progress import Progress
from gateway.routes import Routes
from gateway.worker_calls import Deadline, HeldPrefix, WorkerFailed, WorkerRefused, receive
from gateway.worker_pool import Worker


async def aggregated_attempt(
    routes: Routes, progress: Progress, deadline: Deadline
) -> AsyncIterator[gateway_pb2.GenerateResponse]:
    """One try on an aggregated worker (aggregated mode)."""
    assert routes.aggregated is not None  # (aggregated mode)
    worker = routes.pick_unrefused(routes.aggregated, progress)
    async for response in whole_attempt(routes, worker, worker.stub, progress, deadline):
        yield response


async def conditional_attempt(
    routes: Routes, progress: Progress, deadline: Deadline
) -> AsyncIterator[gateway_pb2.GenerateResponse]:
    """One try with conditional disaggregation: offered to a decode worker to prefill itself; if it declines (or
    is full), the disaggregated path."""
    if not progress.remote_prefill:
        worker = routes.pick_unrefused(routes.decode, progress, routes.decode_router)
        local = worker_pb2_grpc.AggregatedServiceStub(worker.channel)
        try:
            async for response in whole_attempt(
                routes, worker, local, progress, deadline, routes.config.local_prefill_tokens
            ):
                yield response
        except WorkerRefused as refused:  # (before anything was sent) full: its Decode calls would be refused
            routes.refused(progress, refused)
            progress.remote_prefill = True
            telemetry.record_local_prefill("refused")
        if not progress.remote_prefill:
            return
    async for response in disaggregated_attempt(routes, progress, deadline):
        yield response


async def whole_attempt(
    routes: Routes,
    worker: Worker[Any],
    stub: worker_pb2_grpc.AggregatedServiceStub,
    progress: Progress,
    deadline: Deadline,
    max_uncached_tokens: int = 0,
) -> AsyncIterator[gateway_pb2.GenerateResponse]:
    """One try on a worker that prefills and decodes: the request (or, resumed, prompt + tokens sent) goes there
    whole; its SequenceStart says what a resumption needs, then its tokens stream back, the first one included.
    With `max_uncached_tokens`, the worker may decline instead: `progress.remote_prefill` is set, nothing sent.
    """
    request = progress.prefill_request()
    metadata = telemetry.call_metadata(request.request_id)
    timeout = deadline.timeout()
    location = (
        gateway_pb2.PREFILL_LOCATION_LOCAL if worker.kind == "decode" else gateway_pb2.PREFILL_LOCATION_AGGREGATED
    )
    worker.begin()
    call = stub.Generate(
        worker_pb2.AggregatedServiceGenerateRequest(
            request=request,
            max_uncached_tokens=max_uncached_tokens,
            min_cached_share=routes.config.local_prefill_min_cached if max_uncached_tokens else 0.0,
        ),
        timeout=timeout,
        metadata=metadata,
    )
    try:
        async for message in receive(worker, call):
            kind = message.WhichOneof("event")
            if kind == "declined":
                _declined(routes, worker, progress, message.declined)
                return
            if kind == "start":
                progress.note_start(message.start)
                if max_uncached_tokens:
                    telemetry.record_local_prefill("local")
                continue
            progress.note_cached(message.cached_tokens)
            if message.HasField("prefill_phases"):
                progress.note_prefill(location, worker, message.prefill_phases)
            if message.HasField("prompt_logprobs"):
                progress.note_prompt_logprobs(message.prompt_logprobs)
            yield routes.respond(worker, progress, message.tokens)
            if progress.done:
                return
        raise WorkerFailed(worker, "stream ended without a finish reason")
    finally:
        call.cancel()
        worker.end()


def _declined(
    routes: Routes, worker: Worker[Any], progress: Progress, declined: worker_pb2.LocalPrefillDeclined
) -> None:
    """The decode worker would compute too much of the prompt: a prefill worker does, and the KV goes back to this
    worker without the blocks it holds (when it holds some and `--handoff-held-prefix`)."""
    progress.remote_prefill = True
    telemetry.record_local_prefill("declined", declined.uncached_tokens)
    if routes.config.handoff_held_prefix and declined.held_prefix_tokens and declined.block_tokens:
        progress.held = HeldPrefix(worker, declined.held_prefix_tokens, declined.block_tokens)
