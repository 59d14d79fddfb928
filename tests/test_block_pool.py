"""The paged KV pool's allocator (disagg/model/block_pool.py): joining, leaving, forking, copy-on-write, prefix hits
that share blocks, eviction under pressure and the budget in blocks; and its tensors (disagg/model/paged_kv.py):
a hit's KV is the cached sequence's own blocks, a copy-on-write copies exactly one block."""

from __future__ import annotations

import pytest
import torch

from disagg.kv.prefix_cache import block_keys
from disagg.model.block_pool import BlockPool, PoolExhausted
from disagg.model.paged_kv import PagedKvStorage

FINGERPRINT = "test-model"


def written(pool: BlockPool, tokens: int, table=None):
    """A table (new, or `table`) with `tokens` more tokens reserved and written."""
    table = table if table is not None else pool.new_table()
    assert pool.reserve(table, tokens) == []
    pool.advance(table, tokens)
    return table


def test_join_and_leave_move_block_ids():
    pool = BlockPool(8, 4)
    a = written(pool, 9)  # 3 blocks: 4 + 4 + 1
    b = written(pool, 4)
    assert len(a.ids) == 3 and len(b.ids) == 1 and not set(a.ids) & set(b.ids)
    assert pool.num_used == 4 and pool.num_free == 4
    assert all(pool.refcount[block] == 1 for block in a.ids + b.ids)
    held = list(a.ids)
    pool.free(a)
    assert a.ids == [] and pool.num_used == 1 and all(pool.refcount[block] == 0 for block in held)
    # decode steps: a block more only every block_size tokens
    assert pool.blocks_needed(b, 1) == 1 and pool.reserve(b, 1) == [] and len(b.ids) == 2
    pool.advance(b, 1)
    assert pool.blocks_needed(b, 3) == 0


def test_budget_is_counted_in_blocks_and_all_or_nothing():
    pool = BlockPool(4, 16)
    a = written(pool, 40)  # 3 blocks
    assert pool.can_allocate(1) and not pool.can_allocate(2)
    b = pool.new_table()
    with pytest.raises(PoolExhausted):
        pool.reserve(b, 17)  # 2 blocks: refused whole, nothing taken
    assert b.ids == [] and pool.num_free == 1
    pool.free(a)
    assert pool.num_free == 4 and len(written(pool, 64).ids) == 4 and pool.num_free == 0


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_tail():
    pool = BlockPool(16, 4)
    parent = written(pool, 6)  # block 0 full, block 1 holds 2 of 4
    child = pool.fork(parent)
    assert child.ids == parent.ids and all(pool.refcount[block] == 2 for block in parent.ids)
    assert pool.num_used == 2  # sharing takes no block
    # the child writes into the shared partial block: a private copy of it, the full block stays shared
    copies = pool.reserve(child, 1)
    assert len(copies) == 1 and copies[0][0] == parent.ids[1] and child.ids[1] == copies[0][1]
    assert child.ids[0] == parent.ids[0] and pool.refcount[parent.ids[0]] == 2
    assert pool.refcount[parent.ids[1]] == 1 and pool.refcount[child.ids[1]] == 1
    pool.advance(child, 1)
    # the parent is now the only holder of its tail: it writes in place
    assert pool.reserve(parent, 1) == []
    pool.advance(parent, 1)
    pool.free(parent)
    assert pool.refcount[child.ids[0]] == 1 and pool.num_used == 2
    pool.free(child)
    assert pool.num_used == 0


def test_fork_at_a_block_boundary_copies_nothing():
    pool = BlockPool(8, 4)
    parent = written(pool, 8)
    child = pool.fork(parent)
    assert pool.reserve(child, 1) == [] and child.ids[:2] == parent.ids and len(child.ids) == 3


def test_prefix_hit_shares_the_cached_blocks():
    pool = BlockPool(16, 4)
    tokens = list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    keys = block_keys(tokens, FINGERPRINT, 4)
    first = written(pool, len(tokens))
    assert pool.cache_blocks(first, keys, tokens) == keys[:2]
    prompt = [*tokens[:8], 7, 7, 7, 7, 7]  # the same first two blocks, then different
    hit = pool.cached_prefix(block_keys(prompt, FINGERPRINT, 4), prompt)
    assert hit == first.ids[:2]
    pool.acquire_cached(hit)
    second = pool.new_table(hit, 8)
    assert all(pool.refcount[block] == 2 for block in hit)  # shared, not copied
    assert pool.reserve(second, len(prompt) - 8) == []  # writes start in a new block
    pool.advance(second, len(prompt) - 8)
    assert second.ids[:2] == first.ids[:2] and not set(second.ids[2:]) & set(first.ids)


def test_a_hit_ending_inside_a_cached_block_copies_it_before_writing():
    """A prompt equal to a cached one computes its last token again: that write lands in a cached block, which a
    later hit still reads, so it gets a private copy."""
    pool = BlockPool(8, 4)
    tokens = list(range(8))
    first = written(pool, 8)
    pool.cache_blocks(first, block_keys(tokens, FINGERPRINT, 4), tokens)
    pool.free(first)  # cached blocks outlive their sequence
    hit = pool.cached_prefix(block_keys(tokens, FINGERPRINT, 4), tokens)
    assert len(hit) == 2 and pool.num_cached == 2
    pool.acquire_cached(hit)
    again = pool.new_table(hit, 7)
    copies = pool.reserve(again, 1)
    assert copies == [(hit[1], again.ids[1])] and again.ids[0] == hit[0]
    assert pool.is_cached(hit[1]) and not pool.is_cached(again.ids[1])


def test_collision_is_a_miss():
    pool = BlockPool(8, 4)
    tokens = [1, 2, 3, 4]
    keys = block_keys(tokens, FINGERPRINT, 4)
    pool.cache_blocks(written(pool, 4), keys, tokens)
    assert pool.cached_prefix(keys, [1, 2, 3, 5]) == []  # same key, other tokens


def test_eviction_under_pressure_takes_the_least_recently_used_tail_first():
    pool = BlockPool(6, 4)
    old_tokens, new_tokens = list(range(12)), list(range(50, 62))
    old = written(pool, 12)
    pool.cache_blocks(old, block_keys(old_tokens, FINGERPRINT, 4), old_tokens)
    new = written(pool, 12)
    pool.cache_blocks(new, block_keys(new_tokens, FINGERPRINT, 4), new_tokens)
    pool.free(old)
    pool.free(new)
    assert pool.num_free == 6 and pool.num_cached == 6  # all free, all still cached
    written(pool, 4)  # one block: the least recently used, the old chain's tail
    assert pool.evictions == 1
    assert len(pool.cached_prefix(block_keys(old_tokens, FINGERPRINT, 4), old_tokens)) == 2  # head survives
    assert len(pool.cached_prefix(block_keys(new_tokens, FINGERPRINT, 4), new_tokens)) == 3
    # a hit refreshes: taken out of the free list, it is not evicted while held
    hit = pool.cached_prefix(block_keys(new_tokens, FINGERPRINT, 4), new_tokens)
    pool.acquire_cached(hit)
    written(pool, 8)  # two more blocks: the old chain's rest
    assert pool.evictions == 3 and pool.cached_prefix(block_keys(old_tokens, FINGERPRINT, 4), old_tokens) == []
    with pytest.raises(PoolExhausted):
        written(pool, 4)  # nothing left: the held hit is never evicted
    assert all(pool.is_cached(block) for block in hit)


def test_growing_adds_free_blocks():
    pool = BlockPool(2, 4)
    a = written(pool, 8)
    pool.grow(5)
    assert pool.num_free == 3 and written(pool, 12).ids == [2, 3, 4]
    assert a.ids == [0, 1]


def _storage(pool: BlockPool) -> PagedKvStorage:
    return PagedKvStorage(2, 3, 8, pool.block_size, pool.num_blocks, torch.float32, torch.device("cpu"))


def _kv(tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(1, 3, tokens, 8, generator=generator), torch.randn(1, 3, tokens, 8, generator=generator))
        for _ in range(2)
    ]


def _stored(pool: BlockPool, storage: PagedKvStorage, kv):
    """A new sequence with `kv` written into its blocks."""
    table, tokens = pool.new_table(), kv[0][0].shape[2]
    pool.reserve(table, tokens)
    storage.write_sequence(table, kv, 0)
    pool.advance(table, tokens)
    return table


def test_storage_round_trips_a_sequence_through_its_blocks():
    pool = BlockPool(8, 4)
    storage = _storage(pool)
    kv = _kv(10, 0)
    back = storage.read_sequence(_stored(pool, storage, kv))
    assert all(torch.equal(a, b) for pair_a, pair_b in zip(kv, back) for a, b in zip(pair_a, pair_b))


def test_prefix_hit_reads_the_same_storage_and_copy_on_write_copies_one_block():
    pool = BlockPool(8, 4)
    storage = _storage(pool)
    kv = _kv(6, 1)
    first = _stored(pool, storage, kv)
    before = [t.clone() for t in storage.keys + storage.values]
    child = pool.fork(first)
    copies = pool.reserve(child, 1)
    storage.copy_blocks(copies)
    (source, destination) = copies[0]
    for now, then in zip(storage.keys + storage.values, before):
        assert torch.equal(now[:, destination], then[:, source])  # the copied block
        untouched = [b for b in range(8) if b != destination]
        assert torch.equal(now[:, untouched], then[:, untouched])  # and nothing else
    extra = _kv(1, 2)
    storage.write_sequence(child, extra, 6)
    pool.advance(child, 1)
    # the parent's KV is unchanged; the child's is the parent's plus its own token
    assert all(torch.equal(a, b) for pa, pb in zip(storage.read_sequence(first), kv) for a, b in zip(pa, pb))
    for (ck, cv), (pk, pv), (ek, ev) in zip(storage.read_sequence(child), kv, extra):
        assert torch.equal(ck, torch.cat([pk, ek], dim=2)) and torch.equal(cv, torch.cat([pv, ev], dim=2))
