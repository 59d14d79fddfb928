"""Prompt logprobs, grammars and priority across the prefill/decode handoff, through real processes and the real
`openai` SDK: json_schema and json_object outputs that validate (greedy and sampled, both routes, distilgpt2 shapes
and SmolLM2), the first token constrained by the prefill worker, a sequence migrated mid-stream still valid, echo +
logprobs equal to HF's own log-softmax with and without a cached prefix, vLLM's prompt_logprobs, bad grammars
refused naming the problem, and the gateway's admission in priority order."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator

import jsonschema
import openai
import pytest
import torch

from disagg.model.loading import LoadedModel
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import channel, complete
from disagg.tools.cluster import stop
from tests.conftest import GPT2_ARGS, HttpGateway, RunningCluster, start_cluster, start_http_gateway
from tests.test_failover import busy_decode_worker, revive
from tests.test_openai_api import sync_client

# Every string bounded, every number bounded, every array bounded: a finite language, so even a model with random
# weights sampling at temperature 1 ends it (an unbounded string rarely closes when every token is about as likely).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "verified"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
SEEDS = (1, 2, 3)
PROMPT = "Q: Explain why batching improves GPU utilization.\nA:"


@pytest.fixture(scope="module")
def structured_cluster() -> Iterator[RunningCluster]:
    """distilgpt2 shapes (seeded dummy weights), two decode workers (one may be killed), fast health checks."""
    running = start_cluster(GPT2_ARGS, ["--health-interval-seconds", "0.5"], decode_workers=2)
    yield running
    running.cluster.stop()


@pytest.fixture(scope="module")
def gpt2_front(structured_cluster) -> Iterator[HttpGateway]:
    gateway = start_http_gateway(structured_cluster, "distilgpt2")
    yield gateway
    stop([gateway.child])


def sampling_cases() -> list[dict]:
    return [{"temperature": 0}, *({"temperature": 1.0, "seed": seed} for seed in SEEDS)]


FRONTS = {"distilgpt2": "gpt2_front", "smollm2-135m-instruct": "llama_http"}


@pytest.mark.parametrize("model", FRONTS)
def test_json_schema_outputs_validate_greedy_and_sampled_on_both_routes(request, model):
    """Strict json_schema on chat (SmolLM2) and completions, greedy and three seeds at temperature 1 (n = 2 once:
    each fork under its own matcher): every output parses and validates and ends at the schema's end (stop)."""
    client = sync_client(request.getfixturevalue(FRONTS[model]))
    question = "Describe a person as JSON with name, age, pets and verified."
    for case in sampling_cases():
        chats = []
        if model != "distilgpt2":  # (it has no chat template)
            chats = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=150,
                response_format=JSON_SCHEMA_FORMAT,
                **case,
            ).choices
        completion = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=150,
            n=2 if case.get("seed") == SEEDS[0] else 1,
            extra_body={"response_format": JSON_SCHEMA_FORMAT},
            **case,
        )
        texts = [c.message.content for c in chats] + [c.text for c in completion.choices]
        reasons = [c.finish_reason for c in [*chats, *completion.choices]]
        assert reasons == ["stop"] * len(texts), (case, texts)
        for text in texts:
            jsonschema.validate(json.loads(text), PERSON)


def test_json_object_outputs_are_json_objects(llama_http):
    """json_object on SmolLM2 (real weights: an unbounded grammar that a model with random weights rarely closes),
    greedy and sampled, both routes."""
    client = sync_client(llama_http)
    model = "smollm2-135m-instruct"
    ask = "Give the capital of France as a JSON object with a single key capital."
    for case in sampling_cases():
        chat = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": ask}],
            max_tokens=200,
            response_format={"type": "json_object"},
            **case,
        )
        choice = chat.choices[0]
        assert choice.finish_reason == "stop", (case, choice.message.content)
        assert isinstance(json.loads(choice.message.content), dict)
    completion = client.completions.create(
        model=model,
        prompt=ask + "\n",
        max_tokens=200,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(completion.choices[0].text), dict)


async def generate_all(address: str, **fields) -> list[gateway_pb2.GenerateResponse]:
    async with channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        return [r async for r in stub.Generate(gateway_pb2.GenerateRequest(**fields), timeout=120)]


async def test_the_prefill_worker_constrains_the_first_token(structured_cluster):
    """The model's own first token here is not "{"; with a JSON schema it is, and it was picked by a prefill worker
    (the design card's path: the first token comes from prefill, the rest from a decode worker)."""
    address = structured_cluster.address
    free = await generate_all(address, prompt=PROMPT, max_new_tokens=1, temperature=0)
    assert not free[0].text.startswith("{")
    schema = gateway_pb2.Grammar(json_schema=json.dumps(PERSON))
    constrained = await generate_all(address, prompt=PROMPT, max_new_tokens=150, temperature=0, grammar=schema)
    assert constrained[0].text.startswith("{")
    metrics = constrained[-1].metrics
    assert metrics.prefill_worker in [c.address for c in structured_cluster.cluster.prefill]
    assert metrics.decode_worker in [c.address for c in structured_cluster.cluster.decode]
    jsonschema.validate(json.loads("".join(r.text for r in constrained)), PERSON)


async def all_decode_workers_healthy(gateway: HttpGateway, count: int, timeout: float = 60) -> None:
    """Until the gateway's readiness lists `count` healthy decode workers (a revived one is seen at its next check)."""
    url = gateway.base_url.removesuffix("/v1") + "/health"
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        except urllib.error.HTTPError as unavailable:  # 503 while a kind has no healthy worker
            body = json.loads(unavailable.read())
        if len(body["healthy_workers"].get("decode", [])) >= count:
            return
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("case", [{"temperature": 0}, {"temperature": 1.0, "seed": 4}])
async def test_a_sequence_migrated_mid_stream_still_matches_its_grammar(structured_cluster, gpt2_front, case):
    """The decode worker streaming a regex-constrained sequence is killed: the gateway resumes it elsewhere (the
    new prefill replays the tokens sent, which rebuilds the matcher's state) and the whole output still matches."""
    await all_decode_workers_healthy(gpt2_front, 2)  # (a worker killed by the case before is back in its pool)
    pattern = r'\{"digits": "[0-9]{240}"\}'
    request = gateway_pb2.GenerateRequest(
        prompt=PROMPT, max_new_tokens=200, grammar=gateway_pb2.Grammar(regex=pattern), **case
    )
    texts, killed = [], None
    async with channel(gpt2_front.grpc_address) as ch:
        async for response in gateway_pb2_grpc.GatewayStub(ch).Generate(request, timeout=300):
            texts.append(response.text)
            if len(texts) >= 5 and killed is None:
                killed = await busy_decode_worker(structured_cluster)
                killed.process.send_signal(signal.SIGKILL)
            final = response
    assert killed is not None
    await revive(structured_cluster, killed)
    assert re.fullmatch(pattern, "".join(texts)), "".join(texts)
    assert final.finish_reason == "eos" and final.metrics.attempts > 1


def hf_log_softmax(lm: LoadedModel, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(lm.model(torch.tensor([tokens])).logits[0].float(), dim=-1)


def test_echo_logprobs_equal_hf_with_and_without_a_cached_prefix(gpt2_front, gpt2_model: LoadedModel):
    """Completions echo + logprobs: the prompt's tokens, the first with a null logprob, every other within 1e-4 of
    log-softmax of HF's logits; the same when the prefill worker's cache holds the prompt's first blocks (it is
    bypassed for this request: no cached tokens reported), which it keeps serving the next plain request from."""
    client = sync_client(gpt2_front)
    prompt = "The decode worker keeps every running sequence in one batch of keys and values. " * 3
    tokens = gpt2_model.tokenizer.encode(prompt)
    reference = hf_log_softmax(gpt2_model, tokens)
    warm = client.completions.create(model="distilgpt2", prompt=prompt[: len(prompt) * 2 // 3], max_tokens=1)
    assert warm.usage.completion_tokens == 1
    for attempt in ("cold or cached", "cached"):
        reply = client.completions.create(
            model="distilgpt2", prompt=prompt, max_tokens=3, echo=True, logprobs=2, temperature=0
        )
        choice = reply.choices[0]
        assert choice.text.startswith(prompt), attempt
        lp = choice.logprobs
        assert len(lp.tokens) == len(tokens) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for position in range(1, len(tokens)):
            expected = float(reference[position - 1, tokens[position]])
            assert abs(lp.token_logprobs[position] - expected) < 1e-4, (attempt, position)
            assert len(lp.top_logprobs[position]) == 2
        assert "".join(lp.tokens[: len(tokens)]) == prompt
        assert reply.usage.prompt_tokens_details.cached_tokens == 0  # computed whole: no cached logits
    plain = client.completions.create(model="distilgpt2", prompt=prompt, max_tokens=1)
    assert plain.usage.prompt_tokens_details.cached_tokens > 0


def test_vllm_prompt_logprobs_extra(gpt2_front, gpt2_model: LoadedModel):
    prompt = "Batching improves utilization because"
    tokens = gpt2_model.tokenizer.encode(prompt)
    reference = hf_log_softmax(gpt2_model, tokens)
    reply = sync_client(gpt2_front).completions.create(
        model="distilgpt2", prompt=prompt, max_tokens=2, extra_body={"prompt_logprobs": 1}
    )
    entries = reply.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(tokens) and entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        got = entry[str(tokens[position])]
        assert abs(got["logprob"] - float(reference[position - 1, tokens[position]])) < 1e-4
        assert len(entry) in (1, 2)  # the prompt token and the most likely one (the same token, or another)


def scrape(gateway: HttpGateway, name: str) -> float:
    """The sum of a metric's samples (every label set) on the gateway's /metrics (its HTTP port)."""
    url = gateway.base_url.removesuffix("/v1") + "/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def test_the_gateways_admission_serves_higher_priority_first_fifo_among_equals(structured_cluster):
    """One place in flight, a queue behind it: while a long request holds the place, requests of several priorities
    queue up (each seen waiting before the next is sent); they then run one at a time, lowest value first, and in
    arrival order within a value."""
    gateway = start_http_gateway(structured_cluster, "distilgpt2", "--max-inflight", "1", "--admission-queue", "8")
    try:
        done = asyncio.run(admitted_in_order(gateway))
        assert done == ["holder", "high", "normal-1", "normal-2", "normal-3", "low"]
        assert scrape(gateway, "disagg_admission_wait_seconds_count") == 6
    finally:
        stop([gateway.child])


async def admitted_in_order(gateway: HttpGateway) -> list[str]:
    """The order in which a holder and five queued requests finish (each queued one seen waiting first)."""
    done: list[str] = []
    async with channel(gateway.grpc_address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def run(name: str, priority: int, tokens: int = 2) -> None:
            request = gateway_pb2.GenerateRequest(
                prompt=PROMPT, max_new_tokens=tokens, ignore_eos=True, priority=priority
            )
            await complete(stub, request, timeout=300)
            done.append(name)

        holder = asyncio.create_task(run("holder", 0, tokens=200))
        while not scrape(gateway, "gen_ai_server_time_to_first_token_seconds_count"):
            await asyncio.sleep(0.05)  # the holder streams: it has the place
        queued = []
        for name, priority in [("low", 3), ("normal-1", 0), ("high", -2), ("normal-2", 0), ("normal-3", 0)]:
            queued.append(asyncio.create_task(run(name, priority)))
            while scrape(gateway, "disagg_admission_waiting") < len(queued):
                await asyncio.sleep(0.02)
        await asyncio.gather(holder, *queued)
    return done


async def test_bad_grammar_is_invalid_argument_and_http_400(structured_cluster, gpt2_front):
    async with channel(structured_cluster.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        request = gateway_pb2.GenerateRequest(prompt="Hi", grammar=gateway_pb2.Grammar(regex="(unclosed"))
        with pytest.raises(Exception) as refused:
            await complete(stub, request, timeout=60)
    assert "INVALID_ARGUMENT" in str(refused.value) and "regex" in str(refused.value)
    with pytest.raises(openai.BadRequestError) as bad:
        sync_client(gpt2_front).completions.create(
            model="distilgpt2",
            prompt="Hi",
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nah"}}}},
        )
    assert bad.value.body["param"] == "response_format" and "Invalid type: nah" in bad.value.body["message"]
