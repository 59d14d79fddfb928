"""Issue 24's request fields at the gateway, before any worker: grammar (gRPC) and response_format (HTTP), prompt
logprobs and echo, priority; what reaches the workers (their SamplingParams), and bad input refused naming it."""

from __future__ import annotations

import json

import pytest

from disagg.config import GatewayConfig
from disagg.errors import InvalidRequest
from disagg.model.grammar import JSON_SCHEMA, GrammarSpec
from disagg.pb.disagg.v1 import gateway_pb2
from disagg.rpc.convert import sampling_from_pb, sampling_to_pb
from gateway import openai_protocol as oa
from gateway.validation import to_prefill_request

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}


def resolved(**fields):
    return sampling_from_pb(
        to_prefill_request(gateway_pb2.GenerateRequest(prompt="Hi", **fields), GatewayConfig()).sampling
    )


def test_grpc_fields_reach_the_workers_sampling_params():
    params = resolved(
        grammar=gateway_pb2.Grammar(json_schema=json.dumps(SCHEMA, indent=4)), prompt_logprobs=3, priority=-2
    )
    assert params.grammar == GrammarSpec(JSON_SCHEMA, json.dumps(SCHEMA, separators=(",", ":")))  # compact, in order
    assert params.prompt_logprobs == 3 and params.priority == -2
    assert sampling_from_pb(sampling_to_pb(params)) == params  # (SequenceStart carries them on unchanged)
    plain = resolved()
    assert plain.grammar is None and plain.prompt_logprobs is None and plain.priority == 0
    assert resolved(prompt_logprobs=0).prompt_logprobs == 0  # set to 0: the prompt tokens' logprobs alone
    for grammar in [gateway_pb2.Grammar(json_object=True), gateway_pb2.Grammar(regex="[0-9]+")]:
        assert sampling_from_pb(sampling_to_pb(resolved(grammar=grammar))).grammar is not None


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(grammar=gateway_pb2.Grammar(json_schema='{"type": "nope"}')), "json_schema: Invalid type: nope"),
        (dict(grammar=gateway_pb2.Grammar(json_schema="[1]")), "json_schema must be a JSON object"),
        (dict(grammar=gateway_pb2.Grammar(regex="(")), "regex: "),
        (dict(grammar=gateway_pb2.Grammar(lark="start: x")), 'lark: at 1(8): unknown name: "x"'),
        (dict(grammar=gateway_pb2.Grammar(json_object=False)), "json_object must be true"),
        (dict(grammar=gateway_pb2.Grammar()), "set one of json_schema, json_object, regex and lark"),
        (dict(prompt_logprobs=21), "prompt_logprobs must be in 0..20"),
    ],
)
def test_grpc_bad_fields_are_invalid_argument_naming_them(fields, named):
    with pytest.raises(InvalidRequest) as refused:
        resolved(**fields)
    assert named in str(refused.value)


def test_response_format_on_both_routes():
    body = {"model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}
    for parse, extra in [(oa.parse_completion, {"prompt": "Hi"}), (oa.parse_chat, {"messages": [{"role": "user"}]})]:
        parsed = parse({**body, **extra, "priority": 5}, "m")
        assert json.loads(parsed.request.grammar.json_schema) == SCHEMA and parsed.request.priority == 5
        plain = parse({**extra, "model": "m", "response_format": {"type": "json_object"}}, "m")
        assert plain.request.grammar.json_object
        text = parse({**extra, "model": "m", "response_format": {"type": "text"}}, "m")
        assert not text.request.HasField("grammar")


@pytest.mark.parametrize(
    "fields, param, named",
    [
        ({"response_format": {"type": "xml"}}, "response_format", "type"),
        ({"response_format": {"type": "json_schema"}}, "response_format", '"schema" object'),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}},
            "response_format",
            "Invalid type: wat",
        ),
        ({"priority": "high"}, "priority", "integer"),
        ({"prompt_logprobs": 21}, "prompt_logprobs", "0..20"),
        ({"echo": True, "prompt": [1, 2]}, "echo", "text prompt"),
    ],
)
def test_http_bad_fields_are_400_naming_them(fields, param, named):
    with pytest.raises(oa.HttpError) as refused:
        oa.parse_completion({"model": "m", "prompt": "Hi", **fields}, "m")
    assert refused.value.status == 400 and refused.value.param == param and named in refused.value.message


def test_echo_with_logprobs_asks_for_the_prompt_logprobs():
    parsed = oa.parse_completion({"model": "m", "prompt": "Hi", "echo": True, "logprobs": 2}, "m")
    assert parsed.echo and parsed.request.prompt_logprobs == 2 and not parsed.vllm_prompt_logprobs
    echo_only = oa.parse_completion({"model": "m", "prompt": "Hi", "echo": True}, "m")
    assert echo_only.echo and not echo_only.request.HasField("prompt_logprobs")
    vllm = oa.parse_completion({"model": "m", "prompt": "Hi", "prompt_logprobs": 0}, "m")
    assert vllm.vllm_prompt_logprobs and vllm.request.prompt_logprobs == 0
    with pytest.raises(oa.HttpError, match="completions only"):
        oa.parse_chat({"model": "m", "messages": [{"role": "user"}], "echo": True}, "m")
