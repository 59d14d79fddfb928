"""The OpenAI-compatible HTTP front, driven by the real `openai` SDK (sync and async) and by raw HTTP.

Each front under test is one extra gateway process with --http-port, over the workers of the session's clusters
(no extra model loads): the gRPC port of the same gateway gives the reference answers.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator

import httpx2
import openai
import pytest
import torch

from disagg.model.loading import LoadedModel, load_tokenizer
from disagg.model.logprobs import token_text
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from disagg.tools.client import channel
from disagg.tools.cluster import stop
from tests.conftest import HttpGateway, RunningCluster, start_http_gateway

PROMPT = "Q: Explain why batching improves GPU utilization.\nA:"


@pytest.fixture(scope="module")
def gpt2_http(gpt2_cluster) -> Iterator[HttpGateway]:
    gateway = start_http_gateway(gpt2_cluster, "distilgpt2")
    yield gateway
    stop([gateway.child])


def sync_client(gw: HttpGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=60)


def async_client(gw: HttpGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=60)


async def grpc_generate(gw: HttpGateway, **fields) -> list[gateway_pb2.GenerateResponse]:
    async with channel(gw.grpc_address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        return [r async for r in stub.Generate(gateway_pb2.GenerateRequest(**fields), timeout=60)]


def metric(address: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (all label sets) on a component's /metrics."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


async def loads(running: RunningCluster) -> list[worker_pb2.GetLoadResponse]:
    replies = []
    for child in running.cluster.prefill + running.cluster.decode:
        async with channel(child.address) as ch:
            replies.append(await worker_pb2_grpc.WorkerLoadServiceStub(ch).GetLoad(worker_pb2.GetLoadRequest()))
    return replies


async def wait_idle(running: RunningCluster, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        current = await loads(running)
        decode_kv = [r.kv_bytes for r in current[len(running.cluster.prefill) :]]
        if all(r.active_sequences == 0 for r in current) and not any(decode_kv):
            return
        assert time.monotonic() < deadline, f"workers still busy: {current}"
        await asyncio.sleep(0.1)


# --- agreement with the gRPC front ----------------------------------------------------------------------------


async def test_greedy_completion_equals_grpc_front_sync_and_streaming(gpt2_http):
    reference = await grpc_generate(gpt2_http, prompt=PROMPT, max_new_tokens=8, ignore_eos=True)
    ref_text = "".join(r.text for r in reference)
    ref_tokens = sum(len(r.token_ids) for r in reference)
    client = sync_client(gpt2_http)
    body = {"ignore_eos": True}
    whole = await asyncio.to_thread(
        client.completions.create, model="distilgpt2", prompt=PROMPT, max_tokens=8, temperature=0, extra_body=body
    )
    assert whole.choices[0].text == ref_text
    assert whole.usage.completion_tokens == ref_tokens == 8
    assert whole.usage.prompt_tokens == reference[-1].usage.prompt_tokens == 13
    assert whole.usage.prompt_tokens_details.cached_tokens == 0  # no prefix cache exists

    def streamed() -> tuple[str, list]:
        chunks = list(
            client.completions.create(
                model="distilgpt2", prompt=PROMPT, max_tokens=8, temperature=0, stream=True, extra_body=body
            )
        )
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks

    text, chunks = await asyncio.to_thread(streamed)
    assert text == ref_text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked

    ids = load_tokenizer("distilgpt2").encode(PROMPT)  # the workers' tokenizer
    for prompt in (ids, [ids]):  # token ids, and a batch of one: the same completion as the text
        by_ids = await asyncio.to_thread(
            client.completions.create, model="distilgpt2", prompt=prompt, max_tokens=8, temperature=0, extra_body=body
        )
        assert by_ids.choices[0].text == ref_text and by_ids.usage.prompt_tokens == 13


async def test_async_streaming_with_usage_chunk_and_max_tokens_one(gpt2_http):
    client = async_client(gpt2_http)
    stream = await client.completions.create(
        model="distilgpt2",
        prompt=PROMPT,
        max_tokens=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert [c.choices for c in chunks[-1:]] == [[]]  # the usage chunk: no choices
    assert chunks[-1].usage.completion_tokens == 1 and chunks[-1].usage.prompt_tokens == 13
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    whole = await client.completions.create(model="distilgpt2", prompt=PROMPT, max_tokens=1)
    assert whole.usage.completion_tokens == 1 and whole.choices[0].finish_reason == "length"
    await client.close()


async def test_chat_multi_turn_equals_grpc_messages_and_stops_at_eos(llama_http):
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is a GPU?"},
        {"role": "assistant", "content": "A processor for parallel work."},
        {"role": "user", "content": "Say hello."},
    ]
    reference = await grpc_generate(
        llama_http, messages=[gateway_pb2.ChatMessage(**m) for m in messages], max_new_tokens=40
    )
    client = async_client(llama_http)
    whole = await client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, max_completion_tokens=40, temperature=0
    )
    assert whole.choices[0].message.content == "".join(r.text for r in reference)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == sum(len(r.token_ids) for r in reference) < 40
    assert whole.choices[0].finish_reason == "stop"  # the model's end-of-turn token (EOS)
    stream = await client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, max_tokens=40, stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    await client.close()


async def test_stop_string_ends_text_before_it(gpt2_http):
    client = async_client(gpt2_http)
    free = await client.completions.create(
        model="distilgpt2", prompt=PROMPT, max_tokens=12, extra_body={"ignore_eos": True}
    )
    text = free.choices[0].text
    stop_word = text[len(text) // 2 :][:3]
    assert stop_word.strip(), text
    stopped = await client.completions.create(
        model="distilgpt2",
        prompt=PROMPT,
        max_tokens=12,
        stop=[stop_word, "never-there"],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop_word)]
    await client.close()


# --- n > 1 from one prefill -----------------------------------------------------------------------------------


async def test_n3_seeded_samples_are_reproducible_different_and_prefilled_once(gpt2_http):
    prefill_metrics = gpt2_http.running.cluster.prefill[0].metrics_address
    client = async_client(gpt2_http)
    args = dict(model="distilgpt2", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=1234, n=3)
    forwards = metric(prefill_metrics, "disagg_prefill_forward_seconds_count")
    prompt_tokens = metric(prefill_metrics, "disagg_prompt_tokens_total")
    first = await client.completions.create(**args, extra_body={"ignore_eos": True})
    assert metric(prefill_metrics, "disagg_prefill_forward_seconds_count") == forwards + 1  # one forward pass
    assert metric(prefill_metrics, "disagg_prompt_tokens_total") == prompt_tokens + 13  # the prompt counted once
    second = await client.completions.create(**args, extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3, texts
    assert first.usage.completion_tokens == 18 and first.usage.prompt_tokens == 13
    single = await client.completions.create(**{**args, "n": 1}, extra_body={"ignore_eos": True})
    assert single.choices[0].text == texts[0]  # sequence 0 is the request itself
    stream = await client.completions.create(**args, stream=True, extra_body={"ignore_eos": True})
    streamed = ["", "", ""]
    async for c in stream:
        for choice in c.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts
    await client.close()


# --- logprobs --------------------------------------------------------------------------------------------------


def reference_logprobs(lm: LoadedModel, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """log-softmax of the model's own logits at every position that chose a generated token."""
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt_ids + generated])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(generated)]


async def test_logprobs_equal_the_models_log_softmax_at_every_position(gpt2_http, gpt2_model):
    fields = dict(prompt=PROMPT, max_new_tokens=6, temperature=0.8, seed=7, ignore_eos=True)
    grpc_responses = await grpc_generate(gpt2_http, **fields, logprobs=True, top_logprobs=3)
    ids = [t for r in grpc_responses for t in r.token_ids]
    grpc_lps = [lp for r in grpc_responses for lp in r.logprobs]
    assert len(grpc_lps) == len(ids) == 6  # the first token's came from the prefill worker
    expected = reference_logprobs(gpt2_model, gpt2_model.tokenizer.encode(PROMPT), ids)
    for position, (token, lp) in enumerate(zip(ids, grpc_lps)):
        assert lp.token_id == token and lp.token == token_text(gpt2_model.tokenizer, token)
        assert abs(lp.logprob - expected[position, token].item()) < 1e-4, position
        top = torch.topk(expected[position], 3)
        assert [t.token_id for t in lp.top_logprobs] == top.indices.tolist()
        assert max(abs(t.logprob - v) for t, v in zip(lp.top_logprobs, top.values.tolist())) < 1e-4

    client = async_client(gpt2_http)
    whole = await client.completions.create(
        model="distilgpt2",
        prompt=PROMPT,
        max_tokens=6,
        temperature=0.8,
        seed=7,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    got = whole.choices[0].logprobs
    assert got.tokens == [lp.token for lp in grpc_lps]
    assert max(abs(a - b.logprob) for a, b in zip(got.token_logprobs, grpc_lps)) < 1e-6  # both fronts agree
    for position, alternatives in enumerate(got.top_logprobs):
        assert {t.token: pytest.approx(t.logprob, abs=1e-6) for t in grpc_lps[position].top_logprobs} == alternatives
    assert got.text_offset[0] == 0 and got.text_offset[1] == len(got.tokens[0])

    stream = await client.completions.create(
        model="distilgpt2",
        prompt=PROMPT,
        max_tokens=6,
        temperature=0.8,
        seed=7,
        logprobs=1,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    streamed = [v for c in [c async for c in stream] for choice in c.choices for v in choice.logprobs.token_logprobs]
    assert max(abs(a - b.logprob) for a, b in zip(streamed, grpc_lps)) < 1e-6 and len(streamed) == 6
    await client.close()


async def test_chat_logprobs_with_top_alternatives(llama_http):
    client = async_client(llama_http)
    whole = await client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content).startswith(whole.choices[0].message.content[:1])
    await client.close()


# --- bad input, disconnects -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": "distilgpt2", "prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
        ({"model": "distilgpt2", "prompt": 42}, 400, "prompt"),
        ({"model": "distilgpt2", "prompt": [1, "x"]}, 400, "prompt"),
        ({"model": "distilgpt2", "prompt": [1, 50257]}, 400, "prompt"),  # out of the vocabulary (the worker)
        ({"model": "distilgpt2", "prompt": [-1]}, 400, "prompt"),  # (the gateway)
        ({"model": "distilgpt2", "prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "distilgpt2", "prompt": PROMPT, "n": 0}, 400, "n"),
        ({"model": "distilgpt2", "prompt": PROMPT, "n": 17}, 400, "n"),
        ({"model": "distilgpt2", "prompt": PROMPT, "stream": "yes"}, 400, "stream"),
        ({"model": "distilgpt2", "prompt": PROMPT, "top_p": 0}, 400, "top_p"),
        (
            {"model": "distilgpt2", "prompt": PROMPT, "max_tokens": 5000},
            400,
            "max_tokens",
        ),  # over the context (prefill)
        ({"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
    ],
)
async def test_bad_input_gets_the_openai_error_envelope(gpt2_http, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx2.AsyncClient(base_url=gpt2_http.base_url, timeout=30) as http:
        reply = await http.post("/completions", content=content, headers={"content-type": "application/json"})
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param
        ok = await http.post("/completions", json={"model": "distilgpt2", "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


async def test_sdk_sees_typed_errors_and_oversize_body_is_413(gpt2_http):
    client = async_client(gpt2_http)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="distilgpt2", messages=[{"role": "user", "content": "x"}])
    assert "chat template" in info.value.message  # distilgpt2 has none: refused by the prefill worker, 400
    await client.close()
    async with httpx2.AsyncClient(base_url=gpt2_http.base_url, timeout=30) as http:
        big = {"model": "distilgpt2", "prompt": "x" * (2 << 20)}
        reply = await http.post("/completions", json=big)
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"
        assert (await http.get("/models")).json()["data"][0]["id"] == "distilgpt2"
        assert (await http.get("/nowhere")).status_code == 404
    async with httpx2.AsyncClient(base_url=gpt2_http.base_url.removesuffix("/v1"), timeout=30) as http:
        assert (await http.get("/live")).status_code == 200
        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ready"
        metrics = (await http.get("/metrics")).text
        assert "gen_ai_server_time_to_first_token_seconds" in metrics
        assert 'disagg_request_errors_total{code="NOT_FOUND"' not in metrics  # 404 above was refused before work


async def test_dropped_sse_stream_frees_kv_on_every_worker_and_server_keeps_serving(gpt2_http):
    body = {"model": "distilgpt2", "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True, "n": 2}
    async with httpx2.AsyncClient(base_url=gpt2_http.base_url, timeout=30) as http:
        async with http.stream("POST", "/completions", json=body) as reply:
            assert reply.status_code == 200
            seen = 0
            async for line in reply.aiter_lines():
                seen += line.startswith("data: {")
                if seen >= 4:
                    break
        busy = await loads(gpt2_http.running)
        assert any(r.active_sequences for r in busy) or seen >= 4
    await wait_idle(gpt2_http.running)  # the gateway cancelled both worker calls; decode freed the KV
    client = async_client(gpt2_http)
    after = await client.completions.create(model="distilgpt2", prompt=PROMPT, max_tokens=2)
    assert after.usage.completion_tokens >= 1
    await client.close()


async def test_bearer_token_on_the_http_port(gpt2_cluster):
    gateway = await asyncio.to_thread(start_http_gateway, gpt2_cluster, "distilgpt2", "--auth-token", "tok")
    try:
        bad = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.completions.create(model="distilgpt2", prompt="Hi", max_tokens=1)
        good = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="tok", max_retries=0)
        reply = await good.completions.create(model="distilgpt2", prompt="Hi", max_tokens=1)
        assert reply.usage.completion_tokens == 1
        await bad.close()
        await good.close()
    finally:
        await asyncio.to_thread(stop, [gateway.child])
