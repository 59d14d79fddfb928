"""The OpenAI wire format's responses: the pipeline's messages to completions and chat answers and chunks, with
usage, logprobs in both APIs' formats (and vLLM's prompt_logprobs), and the request's metrics.

Pure functions, no I/O: gateway.openai_api serves them; the request they answer is gateway.openai_protocol's
ParsedRequest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from disagg.pb.disagg.v1 import gateway_pb2
from disagg.rpc.convert import metrics_to_dict
from gateway.openai_protocol import CHAT, COMPLETIONS, ParsedRequest

# The request's phases (gateway.proto RequestMetrics): this key in the answer and the final chunk (an extra key the
# OpenAI SDK keeps in `model_extra`), and one `x-disagg-<field>` header per field on non-streaming answers.
METRICS_KEY = "disagg_metrics"
METRICS_HEADER_PREFIX = "x-disagg-"
# The project's finish reasons to OpenAI's (the end-of-sequence token is a natural stop there).
FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}


def usage_of(usage: gateway_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        # there is no prefix cache yet: nothing is ever served from one
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def metrics_headers(metrics: dict[str, Any]) -> dict[str, str]:
    """The metrics as response headers: `x-disagg-prefill-ms: 41.207`, ... (names are the fields', dashed)."""
    return {METRICS_HEADER_PREFIX + name.replace("_", "-"): str(value) for name, value in metrics.items()}


def with_metrics(body: dict[str, Any], metrics: gateway_pb2.RequestMetrics | None) -> dict[str, Any]:
    """`body` with the request's metrics beside `usage` (when the pipeline gave them: its last message)."""
    if metrics is not None:
        body[METRICS_KEY] = metrics_to_dict(metrics)
    return body


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(logprobs: list[gateway_pb2.TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": _token_bytes(lp.token),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": _token_bytes(t.token)} for t in lp.top_logprobs
                ],
            }
            for lp in logprobs
        ]
    }


def _predicted(lp: gateway_pb2.TokenLogprob) -> bool:
    """False for the prompt's first token, which nothing predicts (a NaN logprob: null in OpenAI's formats)."""
    return not math.isnan(lp.logprob)


def completion_logprobs(
    logprobs: Sequence[gateway_pb2.TokenLogprob], text_offset: int, prompt: Sequence[gateway_pb2.TokenLogprob] = ()
) -> dict[str, Any]:
    """The completions format; `prompt` (echo): the prompt tokens' entries before the generated ones."""
    entries = [*prompt, *logprobs]
    offsets, at = [], text_offset
    for lp in entries:
        offsets.append(at)
        at += len(lp.token)
    return {
        "tokens": [lp.token for lp in entries],
        "token_logprobs": [lp.logprob if _predicted(lp) else None for lp in entries],
        "top_logprobs": [{t.token: t.logprob for t in lp.top_logprobs} if _predicted(lp) else None for lp in entries],
        "text_offset": offsets,
    }


def vllm_prompt_logprobs(prompt: Sequence[gateway_pb2.TokenLogprob]) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, decoded_token}} for the
    token and the most likely alternatives."""
    result: list[dict[str, Any] | None] = []
    for lp in prompt:
        if not _predicted(lp):
            result.append(None)
            continue
        entry = {str(t.token_id): {"logprob": t.logprob, "decoded_token": t.token} for t in lp.top_logprobs}
        entry[str(lp.token_id)] = {"logprob": lp.logprob, "decoded_token": lp.token}
        result.append(entry)
    return result


@dataclass
class Choice:
    """One of the n sequences as it accumulates (non-streaming answers, and text offsets of streamed logprobs)."""

    text: str = ""
    logprobs: list[gateway_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    chars_of_logprob_tokens: int = 0


def response_id(parsed: ParsedRequest, request_id: str) -> str:
    return ("chatcmpl-" if parsed.kind == CHAT else "cmpl-") + request_id


def chunk(
    parsed: ParsedRequest, request_id: str, response: gateway_pb2.GenerateResponse, choice: Choice, first: bool
) -> dict[str, Any]:
    """A streamed message of one sequence as an OpenAI chunk; a sequence's first one carries the echoed prompt and
    the prompt's logprobs where asked."""
    parsed.note_prompt_logprobs(response)
    finish = FINISH_REASONS.get(response.finish_reason) if response.finish_reason else None
    entry: dict[str, Any] = {"index": response.index, "logprobs": None, "finish_reason": finish}
    if parsed.kind == CHAT:
        entry["delta"] = {"role": "assistant", "content": response.text} if first else {"content": response.text}
        if parsed.request.logprobs:
            entry["logprobs"] = chat_logprobs(list(response.logprobs))
    else:
        echoed = parsed.echo and first
        entry["text"] = parsed.request.prompt + response.text if echoed else response.text
        if parsed.request.logprobs:
            prompt = parsed.prompt_logprobs if echoed else []
            logprobs = list(response.logprobs)
            entry["logprobs"] = completion_logprobs(logprobs, choice.chars_of_logprob_tokens, prompt)
            choice.chars_of_logprob_tokens += sum(len(lp.token) for lp in [*prompt, *logprobs])
        if parsed.vllm_prompt_logprobs and first:
            entry["prompt_logprobs"] = vllm_prompt_logprobs(parsed.prompt_logprobs)
    body = _envelope(parsed, request_id, [entry], streamed=True)
    if parsed.kind == CHAT and parsed.vllm_prompt_logprobs and first and response.index == 0:
        body["prompt_logprobs"] = vllm_prompt_logprobs(parsed.prompt_logprobs)
    if parsed.include_usage:
        body["usage"] = None
    return body


def usage_chunk(parsed: ParsedRequest, request_id: str, usage: gateway_pb2.Usage) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage: no choices, the request's usage."""
    body = _envelope(parsed, request_id, [], streamed=True)
    body["usage"] = usage_of(usage)
    return body


def whole(parsed: ParsedRequest, request_id: str, choices: list[Choice], usage: gateway_pb2.Usage) -> dict[str, Any]:
    """The non-streaming answer (the pipeline's messages went through `parsed.note_prompt_logprobs`)."""
    entries = []
    prompt = parsed.prompt_logprobs if parsed.echo else []
    for index, choice in enumerate(choices):
        finish = FINISH_REASONS.get(choice.finish_reason or "", choice.finish_reason)
        if parsed.kind == CHAT:
            logprobs = chat_logprobs(choice.logprobs) if parsed.request.logprobs else None
            message = {"role": "assistant", "content": choice.text}
            entries.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
        else:
            logprobs = completion_logprobs(choice.logprobs, 0, prompt) if parsed.request.logprobs else None
            text = parsed.request.prompt + choice.text if parsed.echo else choice.text
            entries.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            if parsed.vllm_prompt_logprobs:
                entries[-1]["prompt_logprobs"] = vllm_prompt_logprobs(parsed.prompt_logprobs)
    body = _envelope(parsed, request_id, entries, streamed=False)
    if parsed.kind == CHAT and parsed.vllm_prompt_logprobs:
        body["prompt_logprobs"] = vllm_prompt_logprobs(parsed.prompt_logprobs)
    body["usage"] = usage_of(usage)
    return body


def _envelope(parsed: ParsedRequest, request_id: str, choices: list[dict[str, Any]], streamed: bool) -> dict[str, Any]:
    kind = parsed.kind if parsed.kind == COMPLETIONS or not streamed else "chat.completion.chunk"
    return {
        "id": response_id(parsed, request_id),
        "object": kind,
        "created": parsed.created,
        "model": parsed.model,
        "choices": choices,
    }
