"""AggregatedService: a request prefilled and decoded in this worker's one engine (`disagg decode --aggregated`).

The request is the one a prefill worker would get; the worker tokenizes and resolves it as a prefill worker does,
reserves its final KV size in the budget (as a Decode call does at SequenceStart: a refusal is RESOURCE_EXHAUSTED
before anything was sent), answers with SequenceStart, then streams each sequence's tokens, the first one (from
the prefill in the engine's loop) included. A call that ends early (client gone, deadline) cancels its sequences
in the engine, which frees their KV at its next step; the reservation is released whichever way the call ends.

Conditional disaggregation (`disagg decode --local-prefill`, the gateway's --local-prefill-tokens): a request
with `max_uncached_tokens` is served only if at most that many of its tokens are missing from this worker's prefix
cache and at least `min_cached_share` of them are there; otherwise the one response is LocalPrefillDeclined,
before anything was queued or reserved, and the caller sends it to a prefill worker instead (the decline says how
many of its leading tokens this worker holds in whole blocks: a handoff back here may leave their KV out). The
count is the worker's own (its tokenizer, its cache, now): exact, at the cost of one round trip for a request that
goes remote after all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from decode_worker.forks import response_of, sequence_id
from decode_worker.servicer import final_kv_bytes
from decode_worker.token_events import TokenEvents
from disagg import telemetry
from disagg.engine.aggregated import AggregatedEngine, Prompt
from disagg.engine.decode import DecodeSequence
from disagg.kv.budget import KvBudget, Reservation
from disagg.model.grammar import model_grammars
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import new_output
from disagg.model.sampling import for_sequence
from disagg.pb.disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.rpc.convert import prompt_logprobs_to_pb
from disagg.rpc.prompt import resolve_request
from disagg.telemetry.decode import aggregated_prefill_times, decode_times


class AggregatedServicer(worker_pb2_grpc.AggregatedServiceServicer):
    def __init__(self, lm: LoadedModel, engine: AggregatedEngine, budget: KvBudget):
        self.lm, self.engine, self.budget = lm, engine, budget
        self.grammars = model_grammars(lm)  # structured output: each grammar compiled once, on first use
        self.active = 0  # Generate calls in progress

    async def Generate(
        self, request: worker_pb2.AggregatedServiceGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.AggregatedServiceGenerateResponse]:
        self.active += 1
        reservation: Reservation | None = None
        try:
            prefill = request.request
            resolved = resolve_request(self.lm, prefill)
            input_ids, generated, params = resolved.input_ids, resolved.generated, resolved.params
            if request.max_uncached_tokens:
                total = len(input_ids)
                wants_prompt_logprobs = params.prompt_logprobs is not None and not generated
                uncached = total if wants_prompt_logprobs else self.engine.uncached_tokens(input_ids)  # (bypassed)
                if uncached > request.max_uncached_tokens or total - uncached < request.min_cached_share * total:
                    declined = worker_pb2.LocalPrefillDeclined(prompt_tokens=total, uncached_tokens=uncached)
                    if (cache := self.engine.prefix_cache) is not None:  # a handoff here may leave these out
                        declined.held_prefix_tokens = cache.held_prefix(input_ids)
                        declined.block_tokens = cache.block_tokens
                    yield worker_pb2.AggregatedServiceGenerateResponse(declined=declined)
                    return
            if params.grammar is not None:  # compiled off the event loop (cached: once per grammar)
                await asyncio.to_thread(self.grammars.prepare, params.grammar)
            start = resolved.sequence_start(self.lm.name)
            if self.engine.kv_cache:  # before anything is allocated for it: refused here, nothing was sent
                nbytes = final_kv_bytes(self.lm, start) * params.n
                reservation = self.budget.reserve(nbytes, f"sequence {prefill.request_id}")
            parent = telemetry.call_context()
            # (`queued` is set below, before any of its sequences can end)
            events = TokenEvents(self.engine, lambda seq: telemetry.record_aggregated(queued, seq, parent))
            lm = self.lm
            for index in range(params.n):
                sequence_params = for_sequence(params, index)
                output = new_output(lm.tokenizer, sequence_params, lm.eos_token_ids, self.grammars, generated)
                events.running[index] = DecodeSequence(
                    sequence_id(prefill.request_id, index),
                    input_ids,
                    output,
                    kv=None,  # computed by the engine's prefill
                    deliver=events.deliver_to(index),
                    reservation=reservation,  # one for all n (the budget counts it once)
                )
            queued = Prompt(list(events.running.values()))
            if not generated:  # (a resumed sequence's prompt logprobs were sent by its first prefill)
                queued.prompt_logprobs = params.prompt_logprobs
            self.engine.submit_prompt(queued)  # may refuse: queue full
            with events:
                yield worker_pb2.AggregatedServiceGenerateResponse(start=start)
                first = True
                async for index, event in events:
                    response = worker_pb2.AggregatedServiceGenerateResponse(tokens=response_of(index, event))
                    if first and index == 0:  # (set by the engine before it delivered this first token)
                        response.cached_tokens, first = queued.cached_tokens, False
                        response.prefill_phases.CopyFrom(aggregated_prefill_times(queued).to_pb())
                        if queued.prompt_logprob_values is not None:
                            response.prompt_logprobs.CopyFrom(prompt_logprobs_to_pb(queued.prompt_logprob_values))
                    if not events.running:  # the call's last message: no handoff, queued from the prefill's end
                        decoded = [s for s in queued.sequences if s.admitted_at] or queued.sequences
                        times = decode_times(decoded, queued_from=aggregated_prefill_times(queued).ended)
                        response.tokens.phases.CopyFrom(times.to_pb(None))
                    yield response
        finally:
            if reservation is not None:  # exactly once, whichever way the call ends
                reservation.release()
            self.active -= 1
