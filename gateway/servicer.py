"""Gateway.Generate: prefill on one worker, relay its KV chunk by chunk to a decode worker, stream tokens back.

When a worker fails (UNAVAILABLE, or it cancelled the call while shutting down) the request resumes elsewhere: a
prefill worker recomputes prompt + the tokens already sent, a decode worker continues from there, and the client's
stream goes on with no token lost or repeated.

A decode worker that cannot hold a sequence (its KV budget) is not failing: it refuses the Decode call with
RESOURCE_EXHAUSTED right after reading SequenceStart, before anything else was sent, and the same SequenceStart
goes to another decode worker while the prefill's KV waits in its stream (relayed, shared memory), so the prompt
is not computed again. The client gets RESOURCE_EXHAUSTED only when every healthy decode worker refused.

Aggregated mode (`--aggregated`): each attempt sends the request whole to one aggregated worker
(AggregatedService/Generate: prefill and decode in its one engine) and relays its tokens; retries, resumption,
refusals (another aggregated worker is tried), deadlines and the responses are the same code as above.

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

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from disagg import telemetry
from disagg.config import GatewayConfig
from disagg.errors import DeadlineExceeded, NoWorkerAvailable, Overloaded, ProtocolError, UpstreamError
from disagg.kv.framing import is_chunk_message
from disagg.kv.transports import DIRECT, TRANSPORT_VALUES
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from disagg.rpc.channel import CallEnded, send
from disagg.rpc.convert import add_decode_phases, add_prefill_phases
from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
from disagg.rpc.streams import ReadAhead
from gateway.prefix_routing import PrefixRouter, RoutingOptions
from gateway.stream_interval import coalesced
from gateway.validation import to_prefill_request
from gateway.worker_pool import Worker, WorkerPool

log = logging.getLogger(__name__)
# Status codes that mean "this worker is gone or going", not "this request is wrong": try elsewhere.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# Initial metadata of a Decode call whose worker reserved the sequence's KV budget (see _open_admitted).
ADMITTED = ("disagg-admitted", "1")
DECODE_AFFINITY_KEYS = "disagg-gateway-decode-affinity-v1"  # the decode router's token keys (its own)


class WorkerFailed(Exception):
    def __init__(self, worker: Worker[Any], reason: str):
        super().__init__(f"{worker.kind} worker {worker.address}: {reason}")
        self.worker = worker


class WorkerRefused(UpstreamError):
    """RESOURCE_EXHAUSTED from a worker: healthy but full (a decode worker's KV budget, a queue at its limit).

    Raised to the client as it is, unless the request can go to another worker (a decode worker, see _admit)."""

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


def _failure(worker: Worker[Any], code: grpc.StatusCode, details: str) -> Exception:
    if code in RESUMABLE:
        return WorkerFailed(worker, f"{code.name}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return WorkerRefused(worker, details)
    return UpstreamError(code, f"{worker.kind} worker {worker.address}: {details}")


async def _receive(
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
        raise _failure(worker, error.code(), error.details()) from error


async def _send(worker: Worker[RelayDecodeStub], call: grpc.aio.StreamStreamCall, message: bytes | None = None) -> None:
    """Write one message (None: half-close) to a client-streaming call; a failure names the worker's status."""
    try:
        await send(call, message)
    except CallEnded as ended:
        raise _failure(worker, ended.code, ended.details) from ended


def _admitted(metadata: grpc.aio.Metadata | None) -> bool:
    return metadata is not None and metadata.get(ADMITTED[0]) == ADMITTED[1]


async def _open_admitted(
    worker: Worker[RelayDecodeStub], start: bytes, timeout: float, metadata: Sequence[tuple[str, str]]
) -> grpc.aio.StreamStreamCall:
    """A Decode call on `worker` that was sent the SequenceStart and admitted it.

    The decode worker reserves the sequence's KV budget on reading SequenceStart, before it allocates anything,
    then sends initial metadata `disagg-admitted: 1`; one that cannot hold the sequence ends the call with
    RESOURCE_EXHAUSTED instead (WorkerRefused, with the worker's reason). Nothing but the SequenceStart was sent,
    so the caller may offer the same bytes to another worker. Other statuses are _failure's.
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
        raise _failure(worker, code, details)
    except BaseException:
        call.cancel()
        raise


async def _open_held(
    worker: Worker[RelayDecodeStub],
    held: HeldPrefix,
    start: bytes,
    timeout: float,
    metadata: Sequence[tuple[str, str]],
) -> grpc.aio.StreamStreamCall:
    """_open_admitted for a handoff that leaves out the blocks `worker` holds; HeldPrefixLost when it no longer
    holds them (DATA_LOSS at admission, before the cache was sent) or refuses the sequence."""
    try:
        call = await _open_admitted(worker, start, timeout, metadata)
    except WorkerRefused as refused:
        raise HeldPrefixLost("refused", held.tokens, refused) from refused
    except UpstreamError as error:
        if error.code != grpc.StatusCode.DATA_LOSS:
            raise
        raise HeldPrefixLost("gone", held.tokens) from error
    telemetry.record_held_prefix("suffix", held.tokens)
    return call


def _pick_unrefused(pool: WorkerPool[Any], progress: Progress, router: PrefixRouter | None = None) -> Worker[Any]:
    """The pool's best worker (by `router`'s cost, else load) that has not refused this request;
    RESOURCE_EXHAUSTED once every healthy one did."""
    exclude = frozenset(progress.refusals)
    try:
        return pool.pick(exclude) if router is None else router.pick(progress.prefill_request(), exclude)
    except NoWorkerAvailable as none:
        if not progress.refusals:
            raise
        reasons = "; ".join(f"{address}: {reason}" for address, reason in progress.refusals.items())
        raise Overloaded(f"every healthy {pool.kind} worker refused the sequence: {reasons}") from none


@dataclass
class Progress:
    """What the client has been sent so far: exactly what a resumed attempt needs."""

    request: worker_pb2.PrefillRequest
    prompt_token_ids: list[int] | None = None
    sampling: worker_pb2.SamplingParams | None = None
    generated: list[int] = field(default_factory=list)  # sequence 0's (n = 1 requests resume from these)
    text: str = ""  # sequence 0's, as sent
    sent_any: bool = False
    refusals: dict[str, str] = field(default_factory=dict)  # decode worker address -> why it refused this request
    finished: set[int] = field(default_factory=set)  # indices of the n sequences that have their finish reason
    completion_tokens: int = 0  # of all n sequences
    cached_tokens: int | None = None  # prompt tokens the first prefill took from its prefix cache
    remote_prefill: bool = False  # a decode worker declined to prefill it (conditional disaggregation)
    held: HeldPrefix | None = None  # ... and holds its first blocks (for the next attempt only)
    started: float = field(default_factory=time.perf_counter)
    attempts: int = 0
    phases: gateway_pb2.RequestMetrics = field(default_factory=gateway_pb2.RequestMetrics)  # the current attempt's

    @property
    def n(self) -> int:
        return max(1, self.request.sampling.n)

    @property
    def done(self) -> bool:
        return len(self.finished) >= self.n

    def begin_attempt(self) -> None:
        """A new try: the phases reported are the ones of the attempt that finishes the request."""
        self.attempts += 1
        self.phases = gateway_pb2.RequestMetrics()

    def note_prefill(
        self, location: gateway_pb2.PrefillLocation, worker: Worker[Any], phases: worker_pb2.PrefillPhases
    ) -> None:
        add_prefill_phases(self.phases, location, worker.address, phases)

    def note_decode(self, worker: Worker[Any], phases: worker_pb2.DecodePhases) -> None:
        add_decode_phases(self.phases, worker.address, phases)

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
        self,
        text: str,
        token_ids: Sequence[int],
        finish_reason: str = "",
        index: int = 0,
        logprobs: Sequence[gateway_pb2.TokenLogprob] = (),
    ) -> gateway_pb2.GenerateResponse:
        if index == 0:
            self.generated.extend(token_ids)
            self.text += text
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
                response.usage.cached_prompt_tokens = self.cached_tokens or 0
                response.metrics.CopyFrom(self.phases)
                response.metrics.total_ms = (time.perf_counter() - self.started) * 1e3
                response.metrics.attempts = self.attempts
        return response


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        config: GatewayConfig,
        prefill: WorkerPool[RelayPrefillStub] | None = None,
        decode: WorkerPool[RelayDecodeStub] | None = None,
        aggregated: WorkerPool[worker_pb2_grpc.AggregatedServiceStub] | None = None,
    ):
        """Disaggregated (prefill and decode pools) or, with `aggregated`, aggregated mode (that pool only)."""
        if aggregated is None and (prefill is None or decode is None):
            raise ValueError("a gateway needs prefill and decode workers, or aggregated workers")
        self.config, self._prefill, self._decode, self.aggregated = config, prefill, decode, aggregated
        self.transport = TRANSPORT_VALUES[config.kv_transport]
        self.in_flight = 0
        options = RoutingOptions(
            config.prefix_routing,
            config.prefix_routing_weight,
            config.prefix_balance_abs,
            config.prefix_balance_rel,
            exact=config.prefix_routing_events,
            tokenizer=config.prefix_routing_tokenizer,
        )
        self.prefix_router: PrefixRouter | None = None  # KV-aware choice of prefill worker
        if prefill is not None and aggregated is None:
            self.prefix_router = PrefixRouter(prefill, options)
        # Conditional disaggregation: a conversation's next turn goes back to the decode worker that holds it (the
        # same cost and guard, by the gateway's own index: decode workers report no cache events)
        self.decode_router: PrefixRouter | None = None
        if decode is not None and aggregated is None and config.local_prefill_tokens > 0:
            affinity = dataclasses.replace(options, exact=False)
            self.decode_router = PrefixRouter(decode, affinity, fingerprint=DECODE_AFFINITY_KEYS)

    @property
    def prefill(self) -> WorkerPool[RelayPrefillStub]:
        assert self._prefill is not None  # (disaggregated mode: checked at construction)
        return self._prefill

    @property
    def decode(self) -> WorkerPool[RelayDecodeStub]:
        assert self._decode is not None  # (disaggregated mode: checked at construction)
        return self._decode

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """The pipeline both fronts call (gRPC here, HTTP in gateway.openai_api): validate, route, retry, stream."""
        responses = coalesced(self._generate(request, context), self.config.stream_interval)
        async with contextlib.aclosing(responses):
            async for response in responses:
                yield response

    async def _generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        if self.in_flight >= self.config.max_inflight:
            raise Overloaded(f"gateway has {self.in_flight} requests in flight (--max-inflight); retry later")
        progress = Progress(to_prefill_request(request, self.config))
        attempt = self._attempt
        if self.aggregated is not None:
            attempt = self._attempt_aggregated
        elif self.config.local_prefill_tokens > 0:
            attempt = self._attempt_conditional
        deadline = time.monotonic() + self.config.request_timeout_seconds
        self.in_flight += 1
        try:
            failures = 0
            while True:
                progress.begin_attempt()
                try:
                    async for response in attempt(progress, context, deadline):
                        yield response
                    return
                except WorkerRefused as refused:
                    elsewhere = refused.worker.kind == "aggregated" or (
                        refused.worker.kind == "decode" and self.transport == DIRECT
                    )
                    if not elsewhere:
                        self._pool(refused.worker).note_refusal(refused.worker)
                        raise
                    # direct: the prefill pushed the KV to that worker and cannot redirect it; prefill again for
                    # another; aggregated: it refused before any work. Not a failure: bounded by the workers,
                    # each refuses a request once.
                    self._refused(progress, refused)
                except HeldPrefixLost as lost:  # (once: only a decline sets progress.held, and only the first)
                    telemetry.record_held_prefix(lost.outcome, lost.tokens)
                    log.info("request %s: %s; handing it over whole", progress.request.request_id, lost)
                    if lost.refused is not None:
                        self._refused(progress, lost.refused)
                except WorkerFailed as failure:
                    self._pool(failure.worker).mark_failed(failure.worker)
                    failures += 1
                    if progress.n > 1 and progress.sent_any:  # n sequences from one prefill: none resumes alone
                        raise NoWorkerAvailable(
                            f"n > 1 request cannot resume after its first tokens: {failure}"
                        ) from failure
                    if failures >= self.config.max_attempts:
                        raise NoWorkerAvailable(f"request failed on {failures} workers; last: {failure}") from failure
                    log.warning(
                        "request %s: %s; resuming after %d tokens",
                        progress.request.request_id,
                        failure,
                        len(progress.generated),
                    )
                    progress.refusals.clear()  # later: the workers that refused may have room now
        finally:
            self.in_flight -= 1

    def _pool(self, worker: Worker[Any]) -> WorkerPool[Any]:
        if worker.kind == "aggregated" and self.aggregated is not None:
            return self.aggregated
        return self.prefill if worker.kind == "prefill" else self.decode

    def _refused(self, progress: Progress, refused: WorkerRefused) -> None:
        """A decode (or aggregated) worker refused this request: others go first for it (the pool) and it is not
        asked again."""
        self._pool(refused.worker).note_refusal(refused.worker)
        progress.refusals[refused.worker.address] = refused.details
        log.info("request %s: %s; trying another %s worker", progress.request.request_id, refused, refused.worker.kind)

    def _pick_decode(self, progress: Progress) -> Worker[RelayDecodeStub]:
        """The next decode worker to offer the sequence; RESOURCE_EXHAUSTED once every healthy one refused it."""
        return _pick_unrefused(self.decode, progress)

    async def _admit(
        self, progress: Progress, start: bytes, timeout: float, metadata: Sequence[tuple[str, str]]
    ) -> tuple[Worker[RelayDecodeStub], grpc.aio.StreamStreamCall]:
        """A decode worker that admitted the sequence (counted in flight), and its Decode call, SequenceStart sent.

        Offers the SequenceStart to the best decode worker, then, while they refuse, to the next. The prefill
        stream is not read meanwhile (its ReadAhead holds a few chunks, flow control the rest), so its KV goes to
        whichever worker admits the sequence: the prompt is not computed again.
        """
        while True:
            worker = self._pick_decode(progress)
            worker.begin()
            try:
                return worker, await _open_admitted(worker, start, timeout, metadata)
            except WorkerRefused as refused:
                worker.end()
                self._refused(progress, refused)
            except BaseException:
                worker.end()
                raise

    async def _attempt_aggregated(
        self, progress: Progress, context: grpc.aio.ServicerContext, deadline: float
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """One try on an aggregated worker (aggregated mode)."""
        assert self.aggregated is not None  # (aggregated mode)
        worker = _pick_unrefused(self.aggregated, progress)
        async for response in self._attempt_whole(worker, worker.stub, progress, context, deadline):
            yield response

    async def _attempt_conditional(
        self, progress: Progress, context: grpc.aio.ServicerContext, deadline: float
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """One try with conditional disaggregation: offered to a decode worker to prefill itself; if it declines
        (or is full), the disaggregated path."""
        if not progress.remote_prefill:
            worker = _pick_unrefused(self.decode, progress, self.decode_router)
            local = worker_pb2_grpc.AggregatedServiceStub(worker.channel)
            try:
                async for response in self._attempt_whole(
                    worker, local, progress, context, deadline, self.config.local_prefill_tokens
                ):
                    yield response
            except WorkerRefused as refused:  # (before anything was sent) full: its Decode calls would be refused
                self._refused(progress, refused)
                progress.remote_prefill = True
                telemetry.record_local_prefill("refused")
            if not progress.remote_prefill:
                return
        async for response in self._attempt(progress, context, deadline):
            yield response

    async def _attempt_whole(
        self,
        worker: Worker[Any],
        stub: worker_pb2_grpc.AggregatedServiceStub,
        progress: Progress,
        context: grpc.aio.ServicerContext,
        deadline: float,
        max_uncached_tokens: int = 0,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """One try on a worker that prefills and decodes: the request (or, resumed, prompt + tokens sent) goes there
        whole; its SequenceStart says what a resumption needs, then its tokens stream back, the first one included.
        With `max_uncached_tokens`, the worker may decline instead: `progress.remote_prefill` is set, nothing sent.
        """
        request = progress.prefill_request()
        metadata = telemetry.call_metadata(request.request_id)
        timeout = self._timeout(context, deadline)
        location = (
            gateway_pb2.PREFILL_LOCATION_LOCAL if worker.kind == "decode" else gateway_pb2.PREFILL_LOCATION_AGGREGATED
        )
        worker.begin()
        call = stub.Generate(
            worker_pb2.AggregatedServiceGenerateRequest(
                request=request,
                max_uncached_tokens=max_uncached_tokens,
                min_cached_share=self.config.local_prefill_min_cached if max_uncached_tokens else 0.0,
            ),
            timeout=timeout,
            metadata=metadata,
        )
        try:
            async for message in _receive(worker, call):
                kind = message.WhichOneof("event")
                if kind == "declined":
                    declined = message.declined
                    progress.remote_prefill = True
                    telemetry.record_local_prefill("declined", declined.uncached_tokens)
                    if self.config.handoff_held_prefix and declined.held_prefix_tokens and declined.block_tokens:
                        progress.held = HeldPrefix(worker, declined.held_prefix_tokens, declined.block_tokens)
                    return
                if kind == "start":
                    progress.prompt_token_ids = list(message.start.prompt_token_ids)
                    progress.sampling = message.start.sampling
                    telemetry.note_model(message.start.model)
                    if max_uncached_tokens:
                        telemetry.record_local_prefill("local")
                    continue
                out = message.tokens
                if progress.cached_tokens is None and not progress.sent_any:
                    progress.cached_tokens = min(message.cached_tokens, len(progress.prompt_token_ids or ()))
                if message.HasField("prefill_phases"):
                    progress.note_prefill(location, worker, message.prefill_phases)
                if out.HasField("phases"):
                    progress.note_decode(worker, out.phases)
                response = progress.response(out.text, out.token_ids, out.finish_reason, out.index, out.logprobs)
                if progress.done:  # remembered before the client hears of it (and may send the next turn)
                    self._finished_on(worker, progress)
                yield response
                if progress.done:
                    return
            raise WorkerFailed(worker, "stream ended without a finish reason")
        finally:
            call.cancel()
            worker.end()

    def _finished_on(self, worker: Worker[Any], progress: Progress) -> None:
        """`worker` decoded the whole request: with conditional disaggregation, its cache now holds prompt +
        reply, which a next turn starts with (the decode router remembers where)."""
        if self.decode_router is not None and worker.kind == "decode":
            tokens = [*(progress.prompt_token_ids or ()), *progress.generated]
            self.decode_router.record_continuation(worker, progress.request, tokens, progress.text)

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
        """One try: prefill, hand the KV to a decode worker that admits it, stream the tokens.

        Relayed and shared memory: the decode worker is chosen when SequenceStart arrives, and a refusal moves the
        same handoff to another one (_admit). Direct: it is chosen first, because the prefill worker pushes the KV
        to it; its refusal (of the Decode call, or of the push, reported by the prefill worker) raises
        WorkerRefused, and Generate runs the whole attempt again for another decode worker: a pushed cache cannot
        be redirected, so that prompt is computed again.
        """
        request = progress.prefill_request()
        metadata = telemetry.call_metadata(request.request_id)
        timeout = self._timeout(context, deadline)  # (before any worker counts this attempt in flight)
        prefill_worker: Worker[RelayPrefillStub] | None  # None once its stream is done
        router = self.prefix_router
        if router is None:
            prefill_worker = self.prefill.pick()
        else:
            prefill_worker = router.pick(request, blocks=await router.prompt_blocks(request))
        decode_worker: Worker[RelayDecodeStub] | None = None
        pushes_to: Worker[RelayDecodeStub] | None = None
        decode_call: grpc.aio.StreamStreamCall | None = None
        held, progress.held = progress.held, None  # this attempt only: a retry or resumption hands over whole
        if held is not None and (not held.worker.healthy or held.worker.address in progress.refusals):
            held = None
        if held is not None:  # only the worker that holds the first blocks can take this handoff
            decode_worker = held.worker
            decode_worker.begin()
        # (set on every attempt: `request` may be the one the last attempt changed)
        request.kv_destination.prefix_tokens = held.tokens if held is not None else 0
        request.kv_destination.prefix_block_tokens = held.block_tokens if held is not None else 0
        if self.transport == DIRECT:  # the decode worker is chosen first: the prefill worker pushes the KV to it
            if decode_worker is None:
                decode_worker = self._pick_decode(progress)
                decode_worker.begin()
            pushes_to = decode_worker
            request.kv_destination.decode_address = decode_worker.address
            request.kv_destination.handle = f"{request.request_id}/{uuid.uuid4().hex}"
        request.kv_destination.transport = self.transport
        prefill_worker.begin()
        prefill_call = prefill_worker.stub.Prefill(request, timeout=timeout, metadata=metadata)
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
                    if router is not None:
                        router.record(prefill_worker, request, message.start)
                    timeout = self._timeout(context, deadline)
                    if decode_worker is None:
                        decode_worker, decode_call = await self._admit(progress, raw, timeout, metadata)
                    elif held is None:  # direct: only the worker the KV is pushed to will do
                        decode_call = await _open_admitted(decode_worker, raw, timeout, metadata)
                    else:
                        decode_call = await _open_held(decode_worker, held, raw, timeout, metadata)
                    continue
                if decode_call is None:
                    raise ProtocolError(f"prefill worker sent {kind} before SequenceStart")
                if kind == "first_token":
                    first = message.first_token
                    if first.HasField("phases"):
                        assert prefill_worker is not None  # (its stream is being read)
                        progress.note_prefill(gateway_pb2.PREFILL_LOCATION_REMOTE, prefill_worker, first.phases)
                    if progress.cached_tokens is None:  # (a resumed prefill's count includes generated tokens)
                        progress.cached_tokens = min(first.cached_tokens, len(progress.prompt_token_ids or ()))
                    logprobs = [first.logprob] if first.HasField("logprob") else []
                    yield progress.response(first.text, [first.token_id], first.finish_reason, first.index, logprobs)
                    if progress.done:
                        return
                assert decode_worker is not None  # chosen before its call was made
                await _send(decode_worker, decode_call, raw)
            prefill_worker.end()
            prefill_worker = None
            if decode_call is None:
                raise ProtocolError("prefill worker ended the stream without SequenceStart")
            assert decode_worker is not None  # chosen before its call was made
            await _send(decode_worker, decode_call)
            async for out in _receive(decode_worker, decode_call):
                if out.HasField("phases"):
                    progress.note_decode(decode_worker, out.phases)
                response = progress.response(out.text, out.token_ids, out.finish_reason, out.index, out.logprobs)
                if progress.done:  # remembered before the client hears of it (and may send the next turn)
                    self._finished_on(decode_worker, progress)
                yield response
                if progress.done:
                    return
            raise WorkerFailed(decode_worker, "stream ended without a finish reason")
        finally:
            relayed.close()
            prefill_call.cancel()
            if prefill_worker is not None:
                prefill_worker.end()
            if decode_call is not None:
                decode_call.cancel()
            if decode_worker is not None:
                decode_worker.end()
