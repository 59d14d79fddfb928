"""Gateway.Generate: each request takes one path, tried again until an attempt finishes it.

- disaggregated (gateway/disaggregated.py): prefill on one worker, its KV relayed (or pushed, or shared) to a
  decode worker that admits it, tokens streamed back;
- aggregated or local (gateway/whole_request.py): the request whole to one worker that prefills and decodes it
  (`--aggregated`), or first offered to a decode worker that may prefill it itself (`--local-prefill-tokens`);
- resumption (gateway/resumption.py): after a worker's failure the request resumes elsewhere from the tokens sent,
  after a refusal another worker is asked.

The pieces they share: the workers and routers (gateway/routes.py), the calls to workers (gateway/worker_calls.py)
and what the client has been sent (gateway/progress.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from disagg import telemetry
from disagg.config import GatewayConfig
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2_grpc
from disagg.rpc.services import RelayDecodeStub, RelayPrefillStub
from gateway.admission import AdmissionGate
from gateway.disaggregated import disaggregated_attempt
from gateway.prefix_routing import PrefixRouter
from gateway.progress import Progress
from gateway.resumption import Attempt, resuming
from gateway.routes import Routes
from gateway.stream_interval import coalesced
from gateway.validation import to_prefill_request
from gateway.whole_request import aggregated_attempt, conditional_attempt
from gateway.worker_calls import Deadline
from gateway.worker_pool import WorkerPool


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        config: GatewayConfig,
        prefill: WorkerPool[RelayPrefillStub] | None = None,
        decode: WorkerPool[RelayDecodeStub] | None = None,
        aggregated: WorkerPool[worker_pb2_grpc.AggregatedServiceStub] | None = None,
    ):
        """Disaggregated (prefill and decode pools) or, with `aggregated`, aggregated mode (that pool only)."""
        self.config = config
        self.routes = Routes(config, prefill, decode, aggregated)
        # --max-inflight places; with --admission-queue, requests wait for one in priority order
        self.admission = AdmissionGate(config.max_inflight, config.admission_queue)
        telemetry.watch_admission(self.admission)
        self.attempt: Attempt = disaggregated_attempt
        if aggregated is not None:
            self.attempt = aggregated_attempt
        elif config.local_prefill_tokens > 0:
            self.attempt = conditional_attempt

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    @property
    def prefill(self) -> WorkerPool[RelayPrefillStub]:
        return self.routes.prefill

    @property
    def decode(self) -> WorkerPool[RelayDecodeStub]:
        return self.routes.decode

    @property
    def prefix_router(self) -> PrefixRouter | None:
        """The KV-aware choice of prefill worker (disaggregated mode)."""
        return self.routes.prefix_router

    @property
    def decode_router(self) -> PrefixRouter | None:
        """Conditional disaggregation's choice of decode worker: the one that holds the conversation."""
        return self.routes.decode_router

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
        progress = Progress(to_prefill_request(request, self.config))
        deadline = Deadline(context, self.config.request_timeout_seconds)  # (the wait for a place counts)
        attempts = resuming(self.routes, self.attempt, progress, deadline)
        async with self.admission.admitted(request.priority), contextlib.aclosing(attempts) as responses:
            async for response in responses:
                yield response
