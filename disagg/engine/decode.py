"""Decode worker engine: continuous batching over handed-over sequences.

Sequences wait until their KV cache has fully arrived (the servicer submits them only then), join the running
batch at the next step, stream one token per step, and leave the batch the step they finish or are cancelled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from disagg.config import BatchPolicy
from disagg.engine.thread import EngineThread
from disagg.kv.types import KvLayers
from disagg.model.decode_batch import DecodeBatch, RecomputeBatch
from disagg.model.loading import LoadedModel
from disagg.model.logprobs import TokenLogprobs, batch_logprobs
from disagg.model.output_stream import OutputStream
from disagg.model.sampling import sample_batch


@dataclass
class TokenEvent:
    token: int
    text: str
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None  # when the sequence's sampling asked for them


@dataclass
class DecodeSequence:
    """A sequence handed over by prefill: its output so far, its KV cache, and where its tokens go."""

    request_id: str
    context: list[int]  # prompt + generated tokens except the newest (whose KV is not computed yet)
    output: OutputStream
    kv: KvLayers | None
    deliver: Callable[[TokenEvent | BaseException], None]
    enqueued_at: float = field(default_factory=time.monotonic)
    # time.monotonic() stamps and step batch sizes, read by disagg.telemetry once the request ends.
    admitted_at: float = 0.0  # left the queue for the running batch
    kv_loaded_at: float = 0.0  # its KV cache was copied into the batch
    last_token_at: float = 0.0  # its latest token was sampled
    batch_sizes: list[int] = field(default_factory=list)  # running batch size at each step it took part in


@dataclass
class StepStats:
    batch_size: int
    joined: int
    finished: int
    seconds: float


class DecodeEngine(EngineThread[DecodeSequence]):
    name = "decode"

    def __init__(self, lm: LoadedModel, policy: BatchPolicy, kv_cache: bool = True):
        super().__init__(policy)
        self.lm, self.kv_cache = lm, kv_cache
        layers, heads, head_dim = lm.kv_shape()
        self.batch = (
            DecodeBatch(layers, heads, head_dim, lm.dtype, lm.device) if kv_cache else RecomputeBatch(lm.device)
        )
        self.running: dict[str, DecodeSequence] = {}
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self.last_step: StepStats | None = None

    def busy(self) -> bool:
        return bool(self.running)

    @property
    def active(self) -> int:
        """Sequences waiting or running (the "active sequences" gauge)."""
        return len(self.running) + len(self.waiting)

    def cancel(self, request_id: str) -> None:
        """Thread-safe: drop the sequence at the next step and free its KV (client gone, deadline passed)."""
        with self._cancel_lock:
            self._cancelled.add(request_id)
        with self.lock:
            self.lock.notify_all()

    def _apply_cancellations(self) -> None:
        with self._cancel_lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        with self.lock:
            self.waiting = type(self.waiting)(s for s in self.waiting if s.request_id not in cancelled)
        for request_id in cancelled & self.running.keys():
            self._leave(request_id)

    def _admit(self) -> int:
        joined = 0
        with self.lock:
            while self.waiting and len(self.running) < self.policy.max_batch_size:
                seq = self.waiting.popleft()
                seq.admitted_at = time.monotonic()
                last = seq.output.tokens[-1]
                if self.kv_cache:
                    self.batch.add(seq.request_id, seq.kv, last)
                else:
                    self.batch.add(seq.request_id, seq.context, last)
                seq.kv = None  # the batch holds the only copy now
                seq.kv_loaded_at = time.monotonic()
                self.running[seq.request_id] = seq
                joined += 1
        return joined

    def _leave(self, request_id: str) -> None:
        self.batch.remove(request_id)  # first: a sequence that no longer counts as active holds no KV
        self.running.pop(request_id, None)

    def run_once(self) -> None:
        self._apply_cancellations()
        joined = self._admit()
        if not self.running:
            return
        started = time.perf_counter()
        try:
            logits = self.batch.step(self.lm.model)
        except Exception as exc:
            for seq_id in list(self.running):
                self.running[seq_id].deliver(exc)
                self._leave(seq_id)
            raise
        seqs = [self.running[seq_id] for seq_id in self.batch.seq_ids]
        tokens = sample_batch(logits, [s.output.params for s in seqs], [len(s.output.tokens) for s in seqs])
        self.batch.set_last_tokens(tokens)
        logprobs = batch_logprobs(logits, tokens, [s.output.params for s in seqs], self.lm.tokenizer)
        finished = []
        for seq, token, token_logprobs in zip(seqs, tokens, logprobs):
            text = seq.output.append(token)
            seq.batch_sizes.append(len(seqs))
            seq.last_token_at = time.monotonic()
            seq.deliver(TokenEvent(token, text, seq.output.finish_reason, token_logprobs))
            if seq.output.finish_reason is not None:
                finished.append(seq.request_id)
        for request_id in finished:
            self._leave(request_id)
        self.last_step = StepStats(len(seqs), joined, len(finished), time.perf_counter() - started)
