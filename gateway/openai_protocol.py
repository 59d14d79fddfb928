"""The OpenAI wire format's requests and errors: request bodies to GenerateRequest (checked field by field), the
pipeline's statuses to OpenAI error envelopes (the responses are gateway.openai_responses').

Pure functions, no I/O: gateway.openai_api serves them. Everything semantic (limits, defaults, routing) stays in
the gateway's shared pipeline (gateway.validation, GatewayServicer.Generate); this module only translates, and
refuses what it cannot translate with the name of the field (`param`), as the OpenAI API does.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from disagg.errors import InvalidRequest
from disagg.model.logprobs import MAX_TOP_LOGPROBS
from disagg.pb.disagg.v1 import gateway_pb2
from gateway.validation import checked_grammar

COMPLETIONS, CHAT = "text_completion", "chat.completion"
MAX_COMPLETION_LOGPROBS = 5  # the completions API's integer `logprobs`

# One table from the project's gRPC statuses (disagg.errors, UpstreamError codes) to HTTP: (status, type, code).
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", None),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "no_worker_available"),
    grpc.StatusCode.ABORTED: (503, "service_unavailable", None),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
    grpc.StatusCode.DATA_LOSS: (500, "server_error", "kv_integrity"),
    grpc.StatusCode.FAILED_PRECONDITION: (500, "server_error", None),
    grpc.StatusCode.INTERNAL: (500, "server_error", None),
    grpc.StatusCode.UNKNOWN: (500, "server_error", None),
}
# Field names of the shared validation's messages, as the OpenAI API names them.
PARAM_NAMES = {
    "prompt": "prompt",
    "prompt_token_ids": "prompt",
    "messages": "messages",
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "stop": "stop",
    "n": "n",
    "top_logprobs": "top_logprobs",
    "prompt_logprobs": "prompt_logprobs",
    "priority": "priority",
    "grammar": "response_format",
    "request_id": "user",
}
INT32 = (-(2**31), 2**31 - 1)


class HttpError(Exception):
    """An error answered in the OpenAI envelope before any generation started."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def param_of(message: str) -> str | None:
    """The request field an error message names (its first word), in the OpenAI API's spelling."""
    if "max_new_tokens" in message:  # also the prefill worker's "prompt (...) + max_new_tokens (...) exceeds"
        return "max_tokens"
    found = re.match(r"(?:.*?: )?([a-z_]+)", message)
    return PARAM_NAMES.get(found.group(1)) if found else None


def from_status(code: grpc.StatusCode, message: str) -> HttpError:
    status, type_, error_code = HTTP_STATUS.get(code, (500, "server_error", None))
    param = param_of(message) if status == 400 else None
    return HttpError(status, message, type_, param, error_code)


def bad(param: str, message: str) -> HttpError:
    return HttpError(400, f"{param}: {message}", param=param)


# --- request fields -------------------------------------------------------------------------------------------


def _int(body: dict[str, Any], name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise bad(name, f"must be {bounds}, got {value}")
    return value


def _float(body: dict[str, Any], name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(name, f"must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        raise bad(name, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"must be a boolean, got {type(value).__name__}")
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise bad("stop", "must be a string or a list of strings")


def _unsupported(body: dict[str, Any]) -> None:
    """Refuse what this server would otherwise silently ignore and so answer wrongly."""
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(name, "is not supported (only 0)")
    if body.get("logit_bias"):
        raise bad("logit_bias", "is not supported")
    if body.get("suffix"):
        raise bad("suffix", "is not supported")
    if body.get("tools") or body.get("functions"):
        raise bad("tools", "tool calling is not supported")
    if body.get("best_of") not in (None, 1) and body.get("best_of") != body.get("n"):
        raise bad("best_of", "is not supported (only equal to n)")


@dataclass
class ParsedRequest:
    """A validated OpenAI request: the gateway's GenerateRequest plus what shapes the HTTP answer."""

    kind: str  # COMPLETIONS or CHAT
    model: str
    request: gateway_pb2.GenerateRequest
    stream: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    echo: bool = False  # completions: the prompt before each choice's text (and its logprobs before the text's)
    vllm_prompt_logprobs: bool = False  # vLLM's `prompt_logprobs` extra: its own key in the answer
    # The prompt's logprobs, from the pipeline's first message (with echo + logprobs, or prompt_logprobs)
    prompt_logprobs: list[gateway_pb2.TokenLogprob] = field(default_factory=list)

    def note_prompt_logprobs(self, response: gateway_pb2.GenerateResponse) -> None:
        if response.prompt_logprobs:
            self.prompt_logprobs = list(response.prompt_logprobs)


def _model(body: dict[str, Any], served: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "is required (a string)")
    if served and model != served:
        raise HttpError(
            404,
            f"The model '{model}' does not exist (this server serves '{served}')",
            param="model",
            code="model_not_found",
        )
    return model


def _common(body: dict[str, Any], request: gateway_pb2.GenerateRequest) -> None:
    if (temperature := _float(body, "temperature", 0.0, 2.0)) is not None:
        request.temperature = temperature
    if (top_p := _float(body, "top_p", 0.0, 1.0, low_open=True)) is not None:
        request.top_p = top_p
    if (top_k := _int(body, "top_k", -1)) is not None:  # vLLM's extra; -1 (like 0) disables it
        request.top_k = max(0, top_k)
    if (seed := _int(body, "seed", 0, 2**63 - 1)) is not None:
        request.seed = seed
    request.n = _int(body, "n", 1) or 1  # the upper limit is the gateway's (gateway.validation.MAX_N)
    request.stop.extend(_stop(body))
    request.ignore_eos = _bool(body, "ignore_eos")
    request.priority = _int(body, "priority", *INT32) or 0  # vLLM's extra: lower is served earlier
    if (grammar := _response_format(body)) is not None:
        request.grammar.CopyFrom(grammar)
    if (prompt_logprobs := _int(body, "prompt_logprobs", 0, MAX_TOP_LOGPROBS)) is not None:  # vLLM's extra
        request.prompt_logprobs = prompt_logprobs
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "must be a string")


def _response_format(body: dict[str, Any]) -> gateway_pb2.Grammar | None:
    """`response_format` as a grammar: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name":
    ..., "schema": {...}, "strict": ...}} (the schema is enforced whether strict or not); "text" is none."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format", 'must be an object whose type is "text", "json_object" or "json_schema"')
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        grammar = gateway_pb2.Grammar(json_object=True)
    else:
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("response_format", 'json_schema must be an object with a "schema" object')
        if "strict" in spec and not isinstance(spec["strict"], bool | None):
            raise bad("response_format", "json_schema.strict must be a boolean")
        grammar = gateway_pb2.Grammar(json_schema=json.dumps(spec.get("schema", {})))
    try:
        return checked_grammar(grammar)
    except InvalidRequest as error:
        raise bad("response_format", str(error)) from error


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    if not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    return _bool(options, "include_usage")


def parse_completion(body: Any, served_model: str) -> ParsedRequest:
    """POST /v1/completions."""
    body = _object(body)
    model = _model(body, served_model)
    _unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt)  # token ids (checked by the pipeline)
    elif isinstance(prompt, str):
        request = gateway_pb2.GenerateRequest(prompt=prompt)
    else:
        raise bad("prompt", "must be a string or token ids (or a list of one of them)")
    request.max_new_tokens = _int(body, "max_tokens", 1) or 0
    _common(body, request)
    if (logprobs := _int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)) is not None:
        request.logprobs, request.top_logprobs = True, logprobs
    vllm_prompt_logprobs = request.HasField("prompt_logprobs")
    echo = _bool(body, "echo")
    if echo and not request.prompt:
        raise bad("echo", "needs a text prompt")
    if echo and request.logprobs:  # OpenAI's echo: the prompt tokens' logprobs too
        request.prompt_logprobs = max(request.prompt_logprobs, request.top_logprobs)
    stream = _bool(body, "stream")
    parsed = ParsedRequest(COMPLETIONS, model, request, stream, _stream_options(body, stream), echo=echo)
    parsed.vllm_prompt_logprobs = vllm_prompt_logprobs
    return parsed


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content", "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content", "must be a string or a list of text parts")


def parse_chat(body: Any, served_model: str) -> ParsedRequest:
    """POST /v1/chat/completions."""
    body = _object(body)
    model = _model(body, served_model)
    _unsupported(body)
    if body.get("echo"):
        raise bad("echo", "is supported on /v1/completions only")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list")
    request = gateway_pb2.GenerateRequest()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}]", "must be an object with a string role")
        request.messages.add(role=message["role"], content=_content(message, i))
    max_tokens = _int(body, "max_completion_tokens", 1)
    request.max_new_tokens = (max_tokens if max_tokens is not None else _int(body, "max_tokens", 1)) or 0
    _common(body, request)
    request.logprobs = _bool(body, "logprobs")
    request.top_logprobs = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if request.top_logprobs and not request.logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    stream = _bool(body, "stream")
    parsed = ParsedRequest(CHAT, model, request, stream, _stream_options(body, stream))
    parsed.vllm_prompt_logprobs = request.HasField("prompt_logprobs")
    return parsed


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return body
