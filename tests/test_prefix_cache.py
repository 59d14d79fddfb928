"""The prefill worker's prefix cache: deterministic chain keys, LRU under a byte budget with pinned blocks, and
output identical with the cache on and off and to generate(), in process; one request pair through a cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from disagg.config import BatchPolicy
from disagg.engine.prefill import PrefillEngine, PrefillJob, PrefillResult
from disagg.kv.prefix_cache import PrefixCache, block_keys
from disagg.model.decode_batch import DecodeBatch
from disagg.model.loading import LoadedModel
from disagg.model.output_stream import OutputStream
from disagg.model.prefill import prefill, prefill_after_prefix
from disagg.model.sampling import SamplingParams
from disagg.pb.disagg.v1 import gateway_pb2, gateway_pb2_grpc
from disagg.tools.client import channel, complete
from tests.test_metrics import scrape, value

TOKENS = list(range(1000, 1100))
FINGERPRINT = "0123456789abcdef01234567"


# --- keys --------------------------------------------------------------------------------------------------------


def test_keys_are_identical_in_another_process():
    code = (
        "import json; from disagg.kv.prefix_cache import block_keys; "
        f"print(json.dumps([k.hex() for k in block_keys({TOKENS!r}, {FINGERPRINT!r}, 16)]))"
    )
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout)
    here = [k.hex() for k in block_keys(TOKENS, FINGERPRINT, 16)]
    assert other == here
    assert len(here) == 100 // 16  # full blocks only


def test_keys_chain_the_prefix_and_the_fingerprint():
    keys = block_keys(TOKENS, FINGERPRINT)
    assert len(set(keys)) == len(keys)
    assert not set(keys) & set(block_keys(TOKENS, FINGERPRINT[:-1] + "0"))  # another model: no key in common
    changed = TOKENS[:40] + [7] + TOKENS[41:]  # a token of block 2 changed: blocks 0-1 same, 2 on all differ
    other = block_keys(changed, FINGERPRINT)
    assert other[:2] == keys[:2]
    assert not set(other[2:]) & set(keys[2:])
    assert block_keys(TOKENS[:15], FINGERPRINT) == []
    assert block_keys(TOKENS[:16], FINGERPRINT) == keys[:1]
    assert block_keys(TOKENS, FINGERPRINT, 32) != keys[::2]  # (a block of 32 is not a block of 16)


# --- the store ---------------------------------------------------------------------------------------------------

LAYERS, HEADS, HEAD_DIM = 2, 2, 4
BLOCK_BYTES = LAYERS * 2 * HEADS * 16 * HEAD_DIM * 4  # fp32


def fake_kv(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, HEADS, n, HEAD_DIM, generator=g), torch.randn(1, HEADS, n, HEAD_DIM, generator=g))] * (
        LAYERS
    )


def test_lru_keeps_bytes_within_budget_under_ten_times_the_workload():
    evicted = []
    cache = PrefixCache(FINGERPRINT, 10 * BLOCK_BYTES, on_evict=evicted.append)
    for i in range(50):  # 50 prompts of 2 blocks = 10x the cache
        tokens = [i * 100 + t for t in range(33)]
        cache.insert(tokens, fake_kv(33, i))
        assert cache.bytes_held <= cache.budget_bytes
    assert cache.bytes_held == 10 * BLOCK_BYTES and len(cache) == 10
    assert cache.evictions == sum(evicted) == 90
    recent = [49 * 100 + t for t in range(33)]
    assert cache.lookup(recent) == 32  # the most recent prompts are the ones kept
    assert cache.lookup(list(range(33))) == 0


def test_hit_returns_the_inserted_kv_and_leaves_one_token_to_compute():
    cache = PrefixCache(FINGERPRINT, 100 * BLOCK_BYTES)
    kv = fake_kv(40)
    assert cache.insert(TOKENS[:40], kv) == 2
    assert cache.insert(TOKENS[:40], kv) == 0  # already cached
    hit = cache.acquire(TOKENS[:60])
    assert (hit.tokens, len(hit.blocks), hit.eligible_blocks) == (32, 2, 3)
    for (k, v), (ck, cv) in zip(kv, hit.kv()):
        assert torch.equal(ck, k[:, :, :32]) and torch.equal(cv, v[:, :, :32])
    cache.release(hit)
    equal = cache.acquire(TOKENS[:32])  # a prompt equal to the cached blocks: its last token is computed
    assert equal.tokens == 31 and equal.kv()[0][0].shape == (1, HEADS, 31, HEAD_DIM)
    cache.release(equal)
    assert cache.acquire(TOKENS[:10]).tokens == 0  # shorter than a block
    assert cache.acquire([5, *TOKENS[1:40]]).tokens == 0  # first block differs


def test_pinned_blocks_are_never_evicted():
    cache = PrefixCache(FINGERPRINT, 4 * BLOCK_BYTES)
    cache.insert(TOKENS[:33], fake_kv(33))
    hit = cache.acquire(TOKENS[:33])
    assert hit.tokens == 32
    for i in range(20):  # floods the cache: only the 2 unpinned slots turn over
        cache.insert([i * 100 + t for t in range(33)], fake_kv(33, i))
        assert cache.bytes_held <= cache.budget_bytes
    assert cache.lookup(TOKENS[:33]) == 32
    assert len(cache) == 4
    assert cache.clear() == 2  # pinned ones stay even through clear()
    cache.release(hit)
    assert cache.clear() == 2 and cache.bytes_held == 0


def test_a_prefix_loses_its_tail_before_its_head():
    cache = PrefixCache(FINGERPRINT, 4 * BLOCK_BYTES)
    cache.insert(TOKENS[:64], fake_kv(64))  # 4 blocks, full
    cache.insert([1] * 17, fake_kv(17))  # needs one: the chain's last block goes
    assert cache.lookup(TOKENS[:64]) == 48


def test_off_with_a_zero_budget():
    cache = PrefixCache(FINGERPRINT, 0)
    assert cache.insert(TOKENS[:40], fake_kv(40)) == 0
    assert cache.acquire(TOKENS[:40]).tokens == 0 and cache.bytes_held == 0


# --- identical output, in process --------------------------------------------------------------------------------

STEPS = 4


def greedy_after(lm: LoadedModel, first: int, kv) -> list[int]:
    """`first` and STEPS more greedy tokens decoded from a prompt's KV in the decode worker's batch."""
    layers, heads, head_dim = lm.kv_shape()
    batch = DecodeBatch(layers, heads, head_dim, lm.dtype, lm.device)
    batch.add("s", kv, first)
    tokens = [first]
    for _ in range(STEPS):
        tokens.append(int(torch.argmax(batch.step(lm.model)[0])))
        batch.set_last_tokens([tokens[-1]])
    return tokens


def generated(lm: LoadedModel, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = lm.model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=STEPS + 1, do_sample=False, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def run_engine(engine: PrefillEngine, lm: LoadedModel, prompts: list[list[int]]) -> list[PrefillResult]:
    """The prompts submitted together to the engine (its thread not started: run_once until the queue is empty;
    prompts of dissimilar lengths take passes of their own)."""
    results: dict[int, PrefillResult] = {}

    def job(i: int) -> PrefillJob:
        output = OutputStream(lm.tokenizer, SamplingParams(max_new_tokens=STEPS + 1, ignore_eos=True), frozenset())

        def deliver(result: PrefillResult | BaseException) -> None:
            assert not isinstance(result, BaseException), result
            results[i] = result

        return PrefillJob(f"p{i}", prompts[i], output, deliver)

    for i in range(len(prompts)):
        engine.submit(job(i))
    while engine.waiting:
        engine.run_once()
    assert sorted(results) == list(range(len(prompts)))
    return [results[i] for i in range(len(prompts))]


@pytest.fixture(params=["gpt2", "llama"])
def lm(request) -> LoadedModel:
    return request.getfixturevalue(f"{request.param}_model")


def test_output_identical_with_cache_on_and_off_and_to_generate(lm):
    torch.manual_seed(0)
    vocab = lm.config.get_text_config(decoder=True).vocab_size
    base = torch.randint(10, vocab, (64,)).tolist()
    cases = [  # (prompt, tokens the cache gives, in this order)
        ("shorter than a block", base[:10], 0),
        ("on a block boundary", base[:32], 0),
        ("equal to a cached one", base[:32], 31),
        ("extends a cached one", base[:48], 32),
        ("shares 37 tokens", base[:37] + base[50:53], 32),
    ]
    policy = BatchPolicy(max_batch_size=8)
    cache = PrefixCache(lm.fingerprint, 64 << 20)
    on, off = PrefillEngine(lm, policy, prefix_cache=cache), PrefillEngine(lm, policy)
    for name, prompt, cached in cases:
        [with_cache] = run_engine(on, lm, [prompt])
        [without] = run_engine(off, lm, [prompt])
        assert with_cache.cached_tokens == cached, name
        assert without.cached_tokens == 0
        for (k, v), (k0, v0) in zip(with_cache.kv, without.kv):
            assert k.shape == k0.shape == (1, *k.shape[1:2], len(prompt), k.shape[3])
            assert torch.allclose(k, k0, atol=1e-4) and torch.allclose(v, v0, atol=1e-4), name
        expected = generated(lm, prompt)
        got = greedy_after(lm, with_cache.first_token, with_cache.kv)
        assert got[: len(expected)] == expected, name
        assert greedy_after(lm, without.first_token, without.kv) == got, name
    # a batch mixing hits and misses: each prompt as alone
    mixed = [base[:48], base[:20], torch.randint(10, vocab, (40,)).tolist(), base[:33]]
    results = run_engine(on, lm, mixed)
    assert [r.cached_tokens for r in results] == [47, 16, 0, 32]
    assert [r.batch_size for r in results] == [1, 1, 1, 1]  # hits alone; the one miss alone too here
    for prompt, result in zip(mixed, results):
        expected = generated(lm, prompt)
        assert greedy_after(lm, result.first_token, result.kv)[: len(expected)] == expected
    assert cache.bytes_held > 0 and cache.pinned_blocks == 0


def test_a_block_evicted_after_lookup_is_computed_again(gpt2_model):
    lm = gpt2_model
    prompt = lm.tokenizer.encode("A cached block can go between the router's lookup and the forward pass. " * 3)
    cache = PrefixCache(lm.fingerprint, 64 << 20)
    engine = PrefillEngine(lm, BatchPolicy(), prefix_cache=cache)
    [first] = run_engine(engine, lm, [prompt])
    assert cache.lookup(prompt) == (len(prompt) // 16) * 16  # what a router would count on
    cache.clear()
    [again] = run_engine(engine, lm, [prompt])
    assert (first.cached_tokens, again.cached_tokens, again.cache_hit_blocks) == (0, 0, 0)
    assert again.cache_miss_blocks == len(prompt) // 16
    assert again.first_token == first.first_token
    assert greedy_after(lm, again.first_token, again.kv) == greedy_after(lm, first.first_token, first.kv)


def test_layerwise_sink_gets_the_whole_prompt_kv_on_a_hit(gpt2_model):
    lm = gpt2_model
    prompt = list(range(500, 540))
    known = prefill(lm.model, [prompt[:32]])[0].kv
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    out = prefill_after_prefix(lm.model, prompt, known, on_layer=lambda i, k, v: layers.__setitem__(i, (k, v)))
    assert sorted(layers) == list(range(len(out.kv)))
    for i, (k, v) in layers.items():
        assert torch.equal(k, out.kv[i][0]) and torch.equal(v, out.kv[i][1]) and k.shape[2] == len(prompt)
    with pytest.raises(ValueError):
        prefill_after_prefix(lm.model, prompt[:32], known)  # nothing left to compute


# --- through a cluster -------------------------------------------------------------------------------------------


async def test_shared_prefix_reports_cached_tokens_through_the_gateway(gpt2_cluster, gpt2_model):
    """The cache is on by default (--prefix-cache-mb 256): the session's cluster has it."""
    system = "You are a helpful assistant that answers questions about prefix caches in serving. " * 4
    prompts = [system + "Q: what is prefill?\nA:", system + "Q: what is decode?\nA:"]
    [prefill_worker] = gpt2_cluster.cluster.prefill
    before = scrape(prefill_worker.metrics_address)
    results = []
    async with channel(gpt2_cluster.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for prompt in prompts + prompts[:1]:
            request = gateway_pb2.GenerateRequest(prompt=prompt, max_new_tokens=6, ignore_eos=True)
            results.append(await complete(stub, request, timeout=120))
    shared = len(gpt2_model.tokenizer.encode(system)) // 16 * 16
    assert results[0].cached_prompt_tokens == 0
    assert results[1].cached_prompt_tokens >= shared - 16 > 0
    again = results[2].prompt_tokens
    assert results[2].cached_prompt_tokens == min(again // 16 * 16, again - 1)  # every full block of it
    assert results[2].token_ids == results[0].token_ids
    for prompt, result in zip(prompts, results):
        assert result.token_ids == generated_text_tokens(gpt2_model, prompt, 6)
    after = scrape(prefill_worker.metrics_address)

    def delta(name: str) -> float:
        return value(after, name) - value(before, name)

    assert delta("disagg_prefix_cache_cached_tokens_total") == sum(r.cached_prompt_tokens for r in results)
    hits = delta("disagg_prefix_cache_hit_blocks_total")
    assert hits == sum(-(-r.cached_prompt_tokens // 16) for r in results)
    assert delta("disagg_prefix_cache_miss_blocks_total") == sum(r.prompt_tokens // 16 for r in results) - hits
    assert 0 < value(after, "disagg_prefix_cache_bytes") <= 256 << 20


def generated_text_tokens(lm: LoadedModel, prompt: str, n: int) -> list[int]:
    x = torch.tensor([lm.tokenizer.encode(prompt)])
    out = lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, x.shape[1] :].tolist()
