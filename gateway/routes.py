"""The gateway's workers and routers, and the choices every request path makes with them: which worker next (never
one that refused the request), a decode worker that admits a sequence, and each token message to the client."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import grpc

from disagg.config import GatewayConfig
from disagg.errors import NoWorkerAvailable, Overloaded
from disagg.kv.transports import TRANSPORT_VALUES
from disagg.pb.disagg.v1 import gateway_pb2, worker_pb2, worker_pb2_grpc
from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
from gateway.prefix_routing import PrefixRouter, RoutingOptions
from gateway.progress import Progress
from gateway.worker_calls import WorkerRefused, open_admitted
from gateway.worker_pool import Worker, WorkerPool

log = logging.getLogger(__name__)
DECODE_AFFINITY_KEYS = "disagg-gateway-decode-affinity-v1"  # the decode router's token keys (its own)


class Routes:
    """Disaggregated (prefill and decode pools) or, with `aggregated`, aggregated mode (that pool only)."""

    def __init__(
        self,
        config: GatewayConfig,
        prefill: WorkerPool[RelayPrefillStub] | None = None,
        decode: WorkerPool[RelayDecodeStub] | None = None,
        aggregated: WorkerPool[worker_pb2_grpc.AggregatedServiceStub] | None = None,
    ):
        if aggregated is None and (prefill is None or decode is None):
            raise ValueError("a gateway needs prefill and decode workers, or aggregated workers")
        self.config, self._prefill, self._decode, self.aggregated = config, prefill, decode, aggregated
        self.transport = TRANSPORT_VALUES[config.kv_transport]
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

    def pool(self, worker: Worker[Any]) -> WorkerPool[Any]:
        if worker.kind == "aggregated" and self.aggregated is not None:
            return self.aggregated
        return self.prefill if worker.kind == "prefill" else self.decode

    def refused(self, progress: Progress, refused: WorkerRefused) -> None:
        """A decode (or aggregated) worker refused this request: others go first for it (the pool) and it is not
        asked again."""
        self.pool(refused.worker).note_refusal(refused.worker)
        progress.refusals[refused.worker.address] = refused.details
        log.info("request %s: %s; trying another %s worker", progress.request.request_id, refused, refused.worker.kind)

    def pick_unrefused(
        self, pool: WorkerPool[Any], progress: Progress, router: PrefixRouter | None = None
    ) -> Worker[Any]:
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

    def pick_decode(self, progress: Progress) -> Worker[RelayDecodeStub]:
        """The next decode worker to offer the sequence; RESOURCE_EXHAUSTED once every healthy one refused it."""
        return self.pick_unrefused(self.decode, progress)

    async def admit(
        self, progress: Progress, start: bytes, timeout: float, metadata: Sequence[tuple[str, str]]
    ) -> tuple[Worker[RelayDecodeStub], grpc.aio.StreamStreamCall]:
        """A decode worker that admitted the sequence (counted in flight), and its Decode call, SequenceStart sent.

        Offers the SequenceStart to the best decode worker, then, while they refuse, to the next. The prefill
        stream is not read meanwhile (its ReadAhead holds a few chunks, flow control the rest), so its KV goes to
        whichever worker admits the sequence: the prompt is not computed again.
        """
        while True:
            worker = self.pick_decode(progress)
            worker.begin()
            try:
                return worker, await open_admitted(worker, start, timeout, metadata)
            except WorkerRefused as refused:
                worker.end()
                self.refused(progress, refused)
            except BaseException:
                worker.end()
                raise

    def respond(
        self, worker: Worker[Any], progress: Progress, out: worker_pb2.DecodeResponse
    ) -> gateway_pb2.GenerateResponse:
        """A decoding worker's token message, as the client's response; a finished request is remembered on
        `worker` before the client hears of it (and may send the next turn)."""
        if out.HasField("phases"):
            progress.note_decode(worker, out.phases)
        response = progress.response(out.text, out.token_ids, out.finish_reason, out.index, out.logprobs)
        if progress.done:
            self._finished_on(worker, progress)
        return response

    def _finished_on(self, worker: Worker[Any], progress: Progress) -> None:
        """`worker` decoded the whole request: with conditional disaggregation, its cache now holds prompt +
        reply, which a next turn starts with (the decode router remembers where)."""
        if self.decode_router is not None and worker.kind == "decode":
            tokens = [*(progress.prompt_token_ids or ()), *progress.generated]
            self.decode_router.record_continuation(worker, progress.request, tokens, progress.text)
