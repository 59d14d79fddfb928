"""What a request has been sent so far, on whichever path and attempt: exactly what a resumed attempt needs, and
the responses to the client built from it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from disagg import telemetry
from disagg.pb.disagg.v1 import gateway_pb2, worker_pb2
from disagg.rpc.convert import add_decode_phases, add_prefill_phases
from gateway.worker_calls import HeldPrefix
from gateway.worker_pool import Worker


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
    # The prompt's logprobs from the prefill (when asked), until the first response carries them
    prompt_logprobs: list[gateway_pb2.TokenLogprob] = field(default_factory=list)

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

    def note_start(self, start: worker_pb2.SequenceStart) -> None:
        """The worker that prefills the request resolved it: what a resumption sends instead of the request."""
        self.prompt_token_ids = list(start.prompt_token_ids)
        self.sampling = start.sampling
        telemetry.note_model(start.model)

    def note_cached(self, tokens: int) -> None:
        """The first prefill's prompt tokens from a prefix cache (a resumed prefill's count includes generated
        tokens: only the first one counts, and at most the prompt)."""
        if self.cached_tokens is None:
            self.cached_tokens = min(tokens, len(self.prompt_token_ids or ()))

    def note_prompt_logprobs(self, prompt: worker_pb2.PromptLogprobs) -> None:
        """The prefill's prompt logprobs (sent once: a resumed prefill does not compute them again), for the next
        response to the client, the request's first."""
        if not self.sent_any:
            self.prompt_logprobs = list(prompt.logprobs)

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
            response.prompt_logprobs.extend(self.prompt_logprobs)
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
