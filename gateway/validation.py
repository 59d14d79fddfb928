"""Checks every field of the public GenerateRequest before any worker is involved."""

from __future__ import annotations

import math
import secrets
import uuid

from disagg.config import GatewayConfig
from disagg.errors import InvalidRequest
from disagg.pb.disagg.v1 import gateway_pb2, worker_pb2

MAX_REQUEST_ID_CHARS = 128
MAX_STOP_CHARS = 256


def to_prefill_request(request: gateway_pb2.GenerateRequest, config: GatewayConfig) -> worker_pb2.PrefillRequest:
    """The worker request for a valid public request; InvalidRequest naming the field otherwise.

    Limits that need the tokenizer (prompt + max_new_tokens within the context) are checked by the prefill
    worker, before its forward pass.
    """
    if not request.prompt:
        raise InvalidRequest("prompt must not be empty")
    if len(request.prompt) > config.max_prompt_chars:
        raise InvalidRequest(f"prompt has {len(request.prompt)} characters, the limit is {config.max_prompt_chars}")
    if request.max_new_tokens < 0:
        raise InvalidRequest(f"max_new_tokens must be >= 0 (0 = server default), got {request.max_new_tokens}")
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise InvalidRequest(f"temperature must be a finite number >= 0 (0 = greedy), got {request.temperature}")
    if request.HasField("top_p") and not (0 < request.top_p <= 1):
        raise InvalidRequest(f"top_p must be in (0, 1], got {request.top_p}")
    if request.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (0 = disabled), got {request.top_k}")
    if len(request.stop) > config.max_stop_strings:
        raise InvalidRequest(f"stop has {len(request.stop)} strings, the limit is {config.max_stop_strings}")
    for i, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop[{i}] must have 1 to {MAX_STOP_CHARS} characters")
    request_id = request.request_id  # it travels as gRPC metadata (x-request-id): printable ASCII only
    if len(request_id) > MAX_REQUEST_ID_CHARS or not (request_id.isascii() and request_id.isprintable()):
        raise InvalidRequest(f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters")
    seed = request.seed if request.HasField("seed") else secrets.randbits(63)
    sampling = worker_pb2.SamplingParams(
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k,
        seed=seed,
        stop=request.stop,
        ignore_eos=request.ignore_eos,
    )
    return worker_pb2.PrefillRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt=request.prompt,
        sampling=sampling,
        apply_chat_template=request.apply_chat_template,
        default_max_new_tokens=config.default_max_new_tokens,
    )
