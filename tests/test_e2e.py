"""End to end through real gateway, prefill and decode processes on loopback: output identical to generate()."""

from __future__ import annotations

import grpc
import pytest
import torch

from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import channel, complete

TEXT = (
    "Disaggregated serving splits the prompt's forward pass from token generation, so each phase can run on "
    "hardware sized for it. The prefill worker computes the key and value cache of the whole prompt; the "
    "decode worker receives that cache and produces one token at a time. "
)


def prompt_of(tokenizer, n_tokens: int) -> str:
    """A prompt text that tokenizes to about n_tokens tokens."""
    ids = tokenizer.encode(TEXT * (n_tokens // 20 + 2))[:n_tokens]
    return tokenizer.decode(ids)


def reference(lm, prompt: str, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    out = lm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=lm.tokenizer.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


async def generate(address: str, **fields):
    async with channel(address) as ch:
        return await complete(gateway_pb2_grpc.GatewayStub(ch), gateway_pb2.GenerateRequest(**fields), timeout=300)


@pytest.mark.parametrize("n_tokens", [1, 13, 200, 700])
async def test_gpt2_greedy_matches_generate(gpt2_cluster, gpt2_model, n_tokens):
    prompt = prompt_of(gpt2_model.tokenizer, n_tokens)
    expected = reference(gpt2_model, prompt, 12)
    got = await generate(gpt2_cluster.address, prompt=prompt, max_new_tokens=12, ignore_eos=True)
    assert got.token_ids == expected
    assert got.finish_reason == "length"
    assert got.prompt_tokens == len(gpt2_model.tokenizer.encode(prompt))
    assert got.completion_tokens == 12


@pytest.mark.parametrize("n_tokens", [1, 13, 200, 700])
async def test_llama_greedy_matches_generate(llama_cluster, llama_model, n_tokens):
    prompt = prompt_of(llama_model.tokenizer, n_tokens)
    expected = reference(llama_model, prompt, 16)
    got = await generate(llama_cluster.address, prompt=prompt, max_new_tokens=16)
    assert got.token_ids == expected
    assert got.text == llama_model.tokenizer.decode(expected, skip_special_tokens=True)
    assert got.finish_reason == ("eos" if expected[-1] == 2 else "length")


async def test_kv_handoff_larger_than_default_message_limit(gpt2_cluster, gpt2_model):
    """700 tokens of distilgpt2 KV is ~25 MB fp32, far over gRPC's 4 MiB default: it must stream in chunks."""
    prompt = prompt_of(gpt2_model.tokenizer, 700)
    n = len(gpt2_model.tokenizer.encode(prompt))
    assert 2 * 6 * n * 768 * 4 > 4 * 2**20
    got = await generate(gpt2_cluster.address, prompt=prompt, max_new_tokens=3, ignore_eos=True)
    assert len(got.token_ids) == 3


async def test_chat_template_gives_real_text(llama_cluster):
    got = await generate(
        llama_cluster.address, prompt="What is the capital of France?", max_new_tokens=24, apply_chat_template=True
    )
    assert "Paris" in got.text
    assert got.finish_reason in ("eos", "length")


async def test_stop_string_ends_generation_without_it(llama_cluster, llama_model):
    prompt = prompt_of(llama_model.tokenizer, 13)
    full = await generate(llama_cluster.address, prompt=prompt, max_new_tokens=16)
    stop = full.text[len(full.text) // 2 :][:4]
    assert stop.strip()
    got = await generate(llama_cluster.address, prompt=prompt, max_new_tokens=16, stop=[stop])
    assert got.finish_reason == "stop"
    assert got.text == full.text[: full.text.index(stop)]


async def test_seeded_sampling_is_reproducible(llama_cluster):
    fields = dict(prompt="Once upon a time", max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    first = await generate(llama_cluster.address, **fields)
    second = await generate(llama_cluster.address, **fields)
    other = await generate(llama_cluster.address, **{**fields, "seed": 99})
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids


async def test_max_new_tokens_one_finishes_at_prefill(gpt2_cluster):
    got = await generate(gpt2_cluster.address, prompt="Hello", max_new_tokens=1, ignore_eos=True)
    assert len(got.token_ids) == 1 and got.finish_reason == "length" and got.completion_tokens == 1


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="hi", max_new_tokens=-1), "max_new_tokens"),
        (dict(prompt="hi", temperature=-0.5), "temperature"),
        (dict(prompt="hi", top_p=0.0), "top_p"),
        (dict(prompt="hi", top_p=1.5), "top_p"),
        (dict(prompt="hi", top_k=-3), "top_k"),
        (dict(prompt="hi", max_new_tokens=5000), "context"),
        (dict(prompt="hi " * 1100), "context"),
        (dict(prompt="hi", request_id="¡"), "request_id"),  # printable, but not ASCII: cannot be gRPC metadata
        (dict(prompt="hi", request_id="a\nb"), "request_id"),
    ],
)
async def test_bad_input_is_invalid_argument_and_servers_keep_serving(gpt2_cluster, fields, words):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(gpt2_cluster.address, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in caught.value.details()
    ok = await generate(gpt2_cluster.address, prompt="still serving", max_new_tokens=2, ignore_eos=True)
    assert len(ok.token_ids) == 2
