"""Pure pieces without a server: sampling, the output stream (detokenization, stops), the KV codec."""

from __future__ import annotations

import zlib

import pytest
import torch

from disagg.errors import KvIntegrityError
from disagg.kv.codec import Chunk, KvAssembler, KvLayout, encode_kv
from disagg.model.loading import gpt2_tokenizer
from disagg.model.output_stream import OutputStream
from disagg.model.sampling import SamplingParams, filter_logits, sample_batch, sample_token


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def test_gpt2_tokenizer_matches_reference_ids(tokenizer):
    prompt = "Q: Explain why batching improves GPU utilization.\nA:"
    assert tokenizer.encode(prompt) == [48, 25, 48605, 1521, 15458, 278, 19575, 11362, 32121, 13, 198, 32, 25]


# --- sampling -------------------------------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample_token(logits, SamplingParams(max_new_tokens=1), step=0) == 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    best = int(torch.argmax(logits))
    for step in range(20):
        assert sample_token(logits, SamplingParams(1, temperature=1.5, top_k=1, seed=step), step) == best
        assert sample_token(logits, SamplingParams(1, temperature=1.5, top_p=1e-6, seed=step), step) == best


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.8))
    assert kept.tolist() == [True, True, False, False]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    params = SamplingParams(1, temperature=1.0, seed=7)
    draws = [sample_token(torch.log(probs), params, step) for step in range(3000)]
    assert draws == [sample_token(torch.log(probs), params, step) for step in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.04)


def test_batch_sampling_mixes_greedy_and_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 0.0], [9.0, 0.0, 0.0]])
    out = sample_batch(logits, [SamplingParams(1), SamplingParams(1, temperature=0.5, top_k=1, seed=3)], [0, 0])
    assert out == [1, 0]


# --- output stream --------------------------------------------------------------------------------------------
def stream(tokenizer, **kw) -> OutputStream:
    return OutputStream(tokenizer, SamplingParams(**{"max_new_tokens": 100, **kw}), frozenset({50256}))


def test_multibyte_characters_are_never_split(tokenizer):
    text = "Café ☕ 日本語 🎉!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    out = stream(tokenizer)
    pieces = [out.append(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_tokens_is_held_back_and_not_returned(tokenizer):
    out = stream(tokenizer, stop=("END HERE",))
    pieces = []
    for token in tokenizer.encode("some text END HERE and more"):
        pieces.append(out.append(token))
        if out.finish_reason:
            break
    assert out.finish_reason == "stop"
    assert "".join(pieces) == "some text "
    assert all("END" not in p for p in pieces)


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tokenizer):
    out = stream(tokenizer, stop=("ENDING",), max_new_tokens=len(tokenizer.encode("a END b")))
    text = "".join(out.append(t) for t in tokenizer.encode("a END b"))
    assert text == "a END b" and out.finish_reason == "length"


def test_eos_finishes_and_adds_no_text(tokenizer):
    out = stream(tokenizer)
    assert out.append(tokenizer.encode("Hi")[0]) == "Hi"
    assert out.append(50256) == "" and out.finish_reason == "eos"


def test_ignore_eos_keeps_going(tokenizer):
    out = stream(tokenizer, ignore_eos=True)
    out.append(50256)
    assert out.finish_reason is None


def test_replay_restores_state_exactly(tokenizer):
    ids = tokenizer.encode("héllo wörld, a longer sentence")
    whole = stream(tokenizer)
    sent = [whole.append(t) for t in ids]
    resumed = stream(tokenizer)
    resumed.replay(ids[:5])
    assert "".join(sent[:5]) + "".join(resumed.append(t) for t in ids[5:]) == "".join(sent)


# --- KV codec -------------------------------------------------------------------------------------------------
def kv(layers=2, heads=3, seq=50, dim=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(1, heads, seq, dim, generator=g).to(dtype), torch.randn(1, heads, seq, dim, generator=g).to(dtype))
        for _ in range(layers)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codec_round_trip_is_exact(dtype):
    layers = kv(dtype=dtype)
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    layout = KvLayout(name, 2, 3, 50, 8, "fp")
    chunks = list(encode_kv(layers, chunk_bytes=1000))
    assert all(len(c.data) <= 1000 for c in chunks)
    assembler = KvAssembler(layout, expected_fingerprint="fp")
    for chunk in reversed(chunks):  # any order
        assembler.add(chunk)
    assert assembler.complete
    for (k, v), (k2, v2) in zip(layers, assembler.layers()):
        assert torch.equal(k, k2) and torch.equal(v, v2) and k2.dtype == dtype


def test_codec_refuses_corruption():
    layout = KvLayout("float32", 2, 3, 50, 8, "fp")
    chunk = next(encode_kv(kv(), chunk_bytes=1000))
    flipped = bytearray(chunk.data)
    flipped[5] ^= 1
    with pytest.raises(KvIntegrityError, match="checksum"):
        KvAssembler(layout).add(Chunk(chunk.tensor_index, chunk.offset, bytes(flipped), chunk.crc32))
    with pytest.raises(KvIntegrityError, match="outside"):
        KvAssembler(layout).add(Chunk(0, 10**9, b"x", zlib.crc32(b"x")))
    with pytest.raises(KvIntegrityError, match="tensor 99"):
        KvAssembler(layout).add(Chunk(99, 0, b"x", zlib.crc32(b"x")))
    assembler = KvAssembler(layout)
    assembler.add(chunk)
    with pytest.raises(KvIntegrityError, match="twice"):
        assembler.add(chunk)
    with pytest.raises(KvIntegrityError, match="incomplete"):
        assembler.layers()
    with pytest.raises(KvIntegrityError, match="made by model"):
        KvAssembler(layout, expected_fingerprint="another")
