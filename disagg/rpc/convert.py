"""Conversions between the worker protocol's messages (disagg.v1 worker.proto) and the domain types."""

from __future__ import annotations

from disagg.kv.codec import KvLayout
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
    )


def sampling_to_pb(params: SamplingParams) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(
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
    )


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
