"""Conversions between the worker protocol's messages (disagg.v1 worker.proto) and the domain types, and of the
workers' phase reports into the public RequestMetrics."""

from __future__ import annotations

from typing import Any

from disagg.kv.codec import KvLayout
from disagg.model.grammar import JSON_OBJECT, JSON_SCHEMA, LARK, REGEX, GrammarSpec
from disagg.model.logprobs import TokenLogprobs
from disagg.model.sampling import SamplingParams
from disagg.pb.disagg.v1 import gateway_pb2, worker_pb2


def sampling_from_pb(pb: worker_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=pb.max_new_tokens,
        temperature=pb.temperature,
        top_p=pb.top_p or 1.0,
        top_k=pb.top_k,
        seed=pb.seed,
        stop=tuple(pb.stop),
        ignore_eos=pb.ignore_eos,
        n=max(1, pb.n),
        logprobs=pb.logprobs,
        top_logprobs=pb.top_logprobs,
        grammar=grammar_from_pb(pb.grammar) if pb.HasField("grammar") else None,
        prompt_logprobs=pb.prompt_logprobs if pb.HasField("prompt_logprobs") else None,
        priority=pb.priority,
    )


def sampling_to_pb(params: SamplingParams) -> worker_pb2.SamplingParams:
    pb = worker_pb2.SamplingParams(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop=params.stop,
        ignore_eos=params.ignore_eos,
        n=params.n,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
        priority=params.priority,
    )
    if params.grammar is not None:
        pb.grammar.CopyFrom(grammar_to_pb(params.grammar))
    if params.prompt_logprobs is not None:
        pb.prompt_logprobs = params.prompt_logprobs
    return pb


_GRAMMAR_FIELDS = {JSON_SCHEMA: "json_schema", JSON_OBJECT: "json_object", REGEX: "regex", LARK: "lark"}


def grammar_from_pb(pb: gateway_pb2.Grammar) -> GrammarSpec | None:
    """The spec of a Grammar message (None when none of its kinds is set)."""
    kind = pb.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object":
        return GrammarSpec(JSON_OBJECT)
    return GrammarSpec(kind, getattr(pb, kind))


def grammar_to_pb(spec: GrammarSpec) -> gateway_pb2.Grammar:
    pb = gateway_pb2.Grammar()
    if spec.kind == JSON_OBJECT:
        pb.json_object = True
    else:
        setattr(pb, _GRAMMAR_FIELDS[spec.kind], spec.source)
    return pb


def prompt_logprobs_to_pb(logprobs: list[TokenLogprobs]) -> worker_pb2.PromptLogprobs:
    return worker_pb2.PromptLogprobs(logprobs=[logprob_to_pb(lp) for lp in logprobs])


def logprob_to_pb(lp: TokenLogprobs) -> gateway_pb2.TokenLogprob:
    return gateway_pb2.TokenLogprob(
        token_id=lp.token_id,
        token=lp.token,
        logprob=lp.logprob,
        top_logprobs=[gateway_pb2.TopLogprob(token_id=t, token=text, logprob=v) for t, text, v in lp.top],
    )


def layout_to_pb(layout: KvLayout, kv_included: bool) -> worker_pb2.KvLayout:
    return worker_pb2.KvLayout(
        dtype=layout.dtype,
        num_layers=layout.num_layers,
        kv_heads=layout.kv_heads,
        seq_len=layout.seq_len,
        head_dim=layout.head_dim,
        model_fingerprint=layout.model_fingerprint,
        total_bytes=layout.total_bytes if kv_included else 0,
        wire_dtype=layout.wire_dtype,
    )


def layout_from_pb(pb: worker_pb2.KvLayout) -> KvLayout:
    return KvLayout(
        dtype=pb.dtype,
        num_layers=pb.num_layers,
        kv_heads=pb.kv_heads,
        seq_len=pb.seq_len,
        head_dim=pb.head_dim,
        model_fingerprint=pb.model_fingerprint,
        wire_dtype=pb.wire_dtype,
    )


def add_prefill_phases(
    metrics: gateway_pb2.RequestMetrics,
    location: gateway_pb2.PrefillLocation,
    worker: str,
    phases: worker_pb2.PrefillPhases,
) -> None:
    """A worker's report of the request's prefill, into the public metrics (milliseconds)."""
    metrics.prefill_location, metrics.prefill_worker = location, worker
    metrics.prefill_tokens, metrics.prefill_cached_tokens = phases.tokens, phases.cached_tokens
    metrics.prefill_queue_ms = phases.queue_seconds * 1e3
    metrics.prefill_ms = phases.forward_seconds * 1e3
    metrics.prefill_batch_size = phases.batch_size


def add_decode_phases(metrics: gateway_pb2.RequestMetrics, worker: str, phases: worker_pb2.DecodePhases) -> None:
    """A decode worker's report of the request's handoff and decode loop, into the public metrics (milliseconds)."""
    metrics.decode_worker = worker
    metrics.kv_transport, metrics.kv_bytes = phases.kv_transport, phases.kv_bytes
    metrics.kv_held_prefix_tokens = phases.kv_held_prefix_tokens
    metrics.kv_transfer_ms = phases.kv_transfer_seconds * 1e3
    metrics.decode_queue_ms = phases.queue_seconds * 1e3
    metrics.kv_load_ms = phases.kv_load_seconds * 1e3
    metrics.decode_ms = phases.decode_seconds * 1e3
    metrics.decode_steps, metrics.decode_tokens = phases.steps, phases.tokens
    metrics.decode_tokens_per_second = phases.tokens / phases.decode_seconds if phases.decode_seconds > 0 else 0.0


def metrics_to_dict(metrics: gateway_pb2.RequestMetrics) -> dict[str, Any]:
    """The metrics as JSON for the HTTP front and `disagg generate --json`: every field by its proto name, the
    location as `remote` / `local` / `aggregated`, times rounded to the microsecond."""
    out: dict[str, Any] = {}
    for descriptor in metrics.DESCRIPTOR.fields:
        value = getattr(metrics, descriptor.name)
        if descriptor.name == "prefill_location":
            value = PREFILL_LOCATIONS.get(value, "")
        elif isinstance(value, float):
            value = round(value, 3)
        out[descriptor.name] = value
    return out


PREFILL_LOCATIONS = {
    gateway_pb2.PREFILL_LOCATION_REMOTE: "remote",
    gateway_pb2.PREFILL_LOCATION_LOCAL: "local",
    gateway_pb2.PREFILL_LOCATION_AGGREGATED: "aggregated",
}
