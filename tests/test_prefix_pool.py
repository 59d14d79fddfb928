"""A prefix-cache hit copies no KV: with the native runner the prefill runs in the cache's own block pool, the hit's
blocks are read where they are (the same block ids at the head of the prompt's table, one more reference each while
it runs), the prompt's new KV is written once into blocks of its own that the cache then keeps, and no KV is copied
into the pool by any other path; the output equals a prefill with nothing cached."""

from __future__ import annotations

import pytest
import torch

from disagg.config import BatchPolicy
from disagg.engine.prefill import PrefillEngine
from disagg.kv.prefix_cache import PrefixCache
from disagg.model.loading import LoadedModel
from disagg.model.paged_kv import PagedKvStorage
from tests.test_prefix_cache import run_engine

BLOCK = 16


class CopyCounter:
    """Counts the pool's two ways of copying KV in (a handoff's or insert's write, copy-on-write); the prefill's own
    per-layer writes of new tokens are neither."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.written_tokens = 0
        self.copied_blocks = 0
        write, copy = PagedKvStorage.write_sequence, PagedKvStorage.copy_blocks

        def counted_write(storage, table, kv, start):
            self.written_tokens += kv[0][0].shape[2]
            return write(storage, table, kv, start)

        def counted_copy(storage, pairs):
            self.copied_blocks += len(pairs)
            return copy(storage, pairs)

        monkeypatch.setattr(PagedKvStorage, "write_sequence", counted_write)
        monkeypatch.setattr(PagedKvStorage, "copy_blocks", counted_copy)


@pytest.fixture(params=["gpt2", "llama"])
def lm(request) -> LoadedModel:
    return request.getfixturevalue(f"{request.param}_model")


def test_a_hit_shares_the_cached_blocks_and_copies_no_kv(lm, monkeypatch):
    torch.manual_seed(1)
    vocab = lm.config.get_text_config(decoder=True).vocab_size
    shared = torch.randint(10, vocab, (3 * BLOCK,)).tolist()
    first, second = shared + [11, 12, 13], shared + torch.randint(10, vocab, (20,)).tolist()
    cache = PrefixCache(lm.fingerprint, 64 << 20, BLOCK)
    engine = PrefillEngine(lm, BatchPolicy(), prefix_cache=cache)
    cold = PrefillEngine(lm, BatchPolicy())
    pool = cache.pool
    assert pool is not None and cache.storage is not None  # bound at start: the pool is the cache's storage
    copies = CopyCounter(monkeypatch)

    [one] = run_engine(engine, lm, [first])
    held = pool.cached_prefix(cache.keys(first), first)
    assert len(held) == 3 and pool.num_used == 0  # kept as cached blocks, free to evict, nobody holds them
    assert (copies.written_tokens, copies.copied_blocks) == (0, 0)  # written once, by the forward pass

    seen = {}
    place = cache.place

    def place_and_look(prompts, hits):
        tables = place(prompts, hits)
        assert tables is not None
        seen["table"] = list(tables[0].ids)
        seen["refcounts"] = [pool.refcount[block] for block in held]
        seen["used"] = pool.num_used
        return tables

    monkeypatch.setattr(cache, "place", place_and_look)
    [two] = run_engine(engine, lm, [second])
    assert two.cached_tokens == 3 * BLOCK and two.cache_hit_blocks == 3
    assert seen["table"][:3] == held  # the prompt's table starts with the cached blocks themselves
    assert seen["refcounts"] == [2, 2, 2]  # the hit's pin and the prompt's table: shared, not copied
    assert seen["used"] == 3 + 2  # the shared three and two new blocks for its 20 + 0 tokens: nothing else
    assert (copies.written_tokens, copies.copied_blocks) == (0, 0)  # no KV copied into the pool by any path
    assert pool.cached_prefix(cache.keys(second), second)[:3] == held and len(cache) == 3 + 1
    assert pool.num_used == 0 and cache.pinned_blocks == 0

    [reference] = run_engine(cold, lm, [second])
    assert two.first_token == reference.first_token
    for (k, v), (k0, v0) in zip(two.kv, reference.kv):
        assert k.shape == k0.shape and torch.allclose(k, k0, atol=1e-4) and torch.allclose(v, v0, atol=1e-4)
    assert one.cached_tokens == 0


def test_a_prompt_equal_to_cached_blocks_copies_only_the_block_it_writes_into(gpt2_model, monkeypatch):
    """All its tokens cached: the last one is computed, into a private copy of the last shared block (copy-on-write,
    one block), and the cached block stays as it was."""
    lm = gpt2_model
    prompt = list(range(700, 700 + 2 * BLOCK))
    cache = PrefixCache(lm.fingerprint, 64 << 20, BLOCK)
    engine = PrefillEngine(lm, BatchPolicy(), prefix_cache=cache)
    run_engine(engine, lm, [prompt])
    assert cache.storage is not None and cache.pool is not None
    last = cache.pool.cached_prefix(cache.keys(prompt), prompt)[1]
    before = [layer[:, last].clone() for layer in cache.storage.keys]
    copies = CopyCounter(monkeypatch)
    [again] = run_engine(engine, lm, [prompt])
    assert again.cached_tokens == 2 * BLOCK - 1 and copies.copied_blocks == 1 and copies.written_tokens == 0
    assert all(torch.equal(layer[:, last], old) for layer, old in zip(cache.storage.keys, before))


def test_prompts_that_do_not_fit_the_pool_are_prefilled_elsewhere_and_copied_in(gpt2_model):
    """A pool of 4 blocks and a 100-token prompt: prefilled in a scratch pool, then as much as fits is inserted."""
    lm = gpt2_model
    layers, heads, head_dim = lm.kv_shape()
    block_bytes = 2 * layers * heads * BLOCK * head_dim * lm.dtype.itemsize
    cache = PrefixCache(lm.fingerprint, 4 * block_bytes, BLOCK)
    engine = PrefillEngine(lm, BatchPolicy(), prefix_cache=cache)
    prompt = list(range(900, 1000))
    [result] = run_engine(engine, lm, [prompt])
    assert result.kv[0][0].shape[2] == 100 and len(cache) == 4 and cache.lookup(prompt) == 4 * BLOCK
