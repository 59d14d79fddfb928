"""Checks every field of the public GenerateRequest before any worker is involved."""

from __future__ import annotations

import math
import secrets
import uuid

from disagg.config import GatewayConfig
from disagg.errors import InvalidRequest
from disagg.model.grammar import JSON_SCHEMA, check_grammar, json_schema_spec
from disagg.model.logprobs import MAX_TOP_LOGPROBS
from disagg.pb.disagg.v1 import gateway_pb2, worker_pb2
from disagg.rpc.convert import grammar_from_pb, grammar_to_pb

MAX_REQUEST_ID_CHARS = 128
MAX_STOP_CHARS = 256
MAX_N = 16  # sequences forked from one prompt
CHAT_ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})


def to_prefill_request(request: gateway_pb2.GenerateRequest, config: GatewayConfig) -> worker_pb2.PrefillRequest:
    """The worker request for a valid public request; InvalidRequest naming the field otherwise.

    Limits that need the tokenizer (prompt + max_new_tokens within the context) are checked by the prefill
    worker, before its forward pass.
    """
    _check_prompt(request, config)
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
    if not 0 <= request.n <= MAX_N:
        raise InvalidRequest(f"n must be in 1..{MAX_N} (0 = 1), got {request.n}")
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {request.top_logprobs}")
    if request.top_logprobs and not request.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs")
    if request.HasField("prompt_logprobs") and not 0 <= request.prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"prompt_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {request.prompt_logprobs}")
    seed = request.seed if request.HasField("seed") else secrets.randbits(63)
    sampling = worker_pb2.SamplingParams(
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k,
        seed=seed,
        stop=request.stop,
        ignore_eos=request.ignore_eos,
        n=max(1, request.n),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        priority=request.priority,
    )
    if request.HasField("grammar"):
        sampling.grammar.CopyFrom(checked_grammar(request.grammar))
    if request.HasField("prompt_logprobs"):
        sampling.prompt_logprobs = request.prompt_logprobs
    return worker_pb2.PrefillRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt=request.prompt,
        messages=request.messages,
        prompt_token_ids=request.prompt_token_ids,
        sampling=sampling,
        apply_chat_template=request.apply_chat_template,
        default_max_new_tokens=config.default_max_new_tokens,
    )


def checked_grammar(grammar: gateway_pb2.Grammar) -> gateway_pb2.Grammar:
    """The request's grammar, compiled once here without the model's tokenizer (the workers compile it again with
    theirs), a JSON schema in its compact form (one compiled grammar per schema on the workers); InvalidRequest
    naming what is wrong."""
    spec = grammar_from_pb(grammar)
    if spec is None:
        raise InvalidRequest("grammar: set one of json_schema, json_object, regex and lark")
    if grammar.WhichOneof("kind") == "json_object" and not grammar.json_object:
        raise InvalidRequest("grammar: json_object must be true when set")
    if spec.kind == JSON_SCHEMA:
        spec = json_schema_spec(spec.source)
    check_grammar(spec)
    return grammar_to_pb(spec)


def _check_prompt(request: gateway_pb2.GenerateRequest, config: GatewayConfig) -> None:
    """A prompt, chat messages or token ids, one of them; within the size limit (the worker checks the ids
    against its vocabulary)."""
    if request.prompt_token_ids:
        if request.prompt or request.messages:
            raise InvalidRequest("give one of prompt, messages and prompt_token_ids")
        if request.apply_chat_template:
            raise InvalidRequest("apply_chat_template needs a text prompt, not prompt_token_ids")
        if len(request.prompt_token_ids) > config.max_prompt_chars:
            raise InvalidRequest(
                f"prompt_token_ids has {len(request.prompt_token_ids)} ids, the limit is {config.max_prompt_chars}"
            )
        if (low := min(request.prompt_token_ids)) < 0:
            raise InvalidRequest(f"prompt_token_ids must be >= 0, got {low}")
        return
    if request.messages:
        if request.prompt:
            raise InvalidRequest("give prompt or messages, not both")
        for i, message in enumerate(request.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {message.role!r}")
        chars = sum(len(m.content) for m in request.messages)
        if chars > config.max_prompt_chars:
            raise InvalidRequest(f"messages have {chars} characters, the limit is {config.max_prompt_chars}")
        return
    if not request.prompt:
        raise InvalidRequest("prompt must not be empty")
    if len(request.prompt) > config.max_prompt_chars:
        raise InvalidRequest(f"prompt has {len(request.prompt)} characters, the limit is {config.max_prompt_chars}")
