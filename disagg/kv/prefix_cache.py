"""A worker's prefix cache: the KV of computed prompts in fixed-size blocks of a paged pool, found again by a chain
hash.

The blocks are those of disagg/model/block_pool.py and paged_kv.py (one pool per cache, `[kv_heads, blocks,
block_tokens, head_dim]` per layer and K/V, sized to the byte budget and mapped by the OS as blocks are first
written). A block's key is `blake2b(parent key, fingerprint, token ids)`, so a key names the whole prefix up to the
block's end, for one model: the same tokens give the same keys in every process and after every restart (Python's
`hash()` is salted per process and would not). Only full blocks are kept, and a prompt always computes at least its
last token (its logits choose the first output token).

A hit is block ids with one more reference each (pinned: never evicted while held), not a copy. The native prefill
runs in this pool (`place` / `keep`): a prompt's table starts with its hit's blocks, its attention reads them where
they are, its new KV is written once into blocks of its own, and keeping them is marking them cached. Prompts that
do not fit, and HF's forward pass, use `PrefixHit.kv()` and `insert` (copies). Free cached blocks are the LRU:
released chains go to its tail leaf first, so under pressure a prefix loses its tail before its head (a lost head
makes the rest of the chain unreachable).

Observers (`watch`) hear of every key stored and removed, for the worker's WatchKvEvents stream (a router's exact
index, disagg/kv/events.py): once per change, with the cache's lock held, on the thread that changed it.

Thread-safe (one lock) for the bookkeeping: the engine thread prefills and inserts, servicers pin held prefixes and
look up, metrics read it at scrape time. A block's KV is written only by the holder of its only reference.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from disagg.model.block_pool import BlockPool, BlockTable, PoolExhausted
from disagg.model.kv_layers import KvLayers
from disagg.model.paged_kv import PagedKvStorage

DEFAULT_BLOCK_TOKENS = 16
_ROOT = b""  # the parent key of a prompt's first block
# (stored, removed): the keys one change added and dropped, disjoint; called under the cache's lock, so it must
# only queue them (never block, never call back into the cache)
CacheObserver = Callable[[list[bytes], list[bytes]], object]


def block_keys(tokens: Sequence[int], fingerprint: str, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> list[bytes]:
    """The chain keys of every full block of `tokens` (deterministic across processes)."""
    keys, parent = [], _ROOT
    salt = fingerprint.encode()
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        h = hashlib.blake2b(digest_size=16)
        h.update(len(parent).to_bytes(1, "little") + parent)
        h.update(len(salt).to_bytes(2, "little") + salt)
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens[start : start + block_tokens]))
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass
class PrefixHit:
    """The cached blocks (ids in the cache's pool) a prefill may use, pinned until `PrefixCache.release`, and how
    many tokens they give.

    `tokens` <= len(blocks) * block_tokens: a prompt equal to a cached one uses all but its last token.
    """

    blocks: list[int] = field(default_factory=list)
    tokens: int = 0
    eligible_blocks: int = 0  # the prompt's full blocks (hits + misses)
    storage: PagedKvStorage | None = None  # where the blocks live

    def kv(self) -> KvLayers:
        """The prefix's KV, one (keys, values) pair per layer, each [1, kv_heads, tokens, head_dim] (a copy)."""
        assert self.storage is not None
        return self.storage.read_sequence(BlockTable(self.blocks, self.tokens))

    def joined(self, suffix: KvLayers) -> KvLayers:
        """The prefix's KV followed by `suffix`'s (the KV of the tokens after it): a handoff that left out the
        blocks its receiver holds, made whole."""
        assert self.storage is not None
        if self.tokens != len(self.blocks) * self.storage.block_size:
            raise ValueError("only a prefix of whole blocks joins a handed-over suffix")
        prefix = self.kv()
        return [
            (torch.cat([pk, sk.to(pk.dtype)], dim=2), torch.cat([pv, sv.to(pv.dtype)], dim=2))
            for (pk, pv), (sk, sv) in zip(prefix, suffix)
        ]


class PrefixCache:
    """Blocks of prompt KV in a paged pool of `budget_bytes`, LRU, pinned while in use."""

    def __init__(
        self,
        fingerprint: str,
        budget_bytes: int,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        on_evict: Callable[[int], object] | None = None,
    ):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.fingerprint, self.budget_bytes, self.block_tokens = fingerprint, budget_bytes, block_tokens
        self.on_evict = on_evict  # called with the number of blocks evicted (metrics)
        self._lock = threading.Lock()
        self._observers: list[CacheObserver] = []
        self.pool: BlockPool | None = None  # with the storage, on first use (`bind`: the KV's shape)
        self.storage: PagedKvStorage | None = None
        self._removed: list[bytes] = []  # keys evicted by the change in progress (the pool's on_evict)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def evictions(self) -> int:
        return self.pool.evictions if self.pool is not None else 0

    @property
    def bytes_held(self) -> int:
        """Bytes of the cached blocks (free or held); the pool's whole size is at most the budget."""
        with self._lock:
            if self.pool is None or self.storage is None:
                return 0
            return self.pool.num_cached * self.storage.bytes_per_block

    def __len__(self) -> int:
        return self.pool.num_cached if self.pool is not None else 0

    @property
    def pinned_blocks(self) -> int:
        """Cached blocks held by a hit or a prefill now."""
        with self._lock:
            return self.pool.num_held_cached if self.pool is not None else 0

    def bind(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Allocate the pool for KV of this shape, if not done yet (the first KV inserted does it otherwise);
        False when the budget holds no block of it."""
        with self._lock:
            return self._bind(layers, kv_heads, head_dim, dtype, device)

    def _bind(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
        if self.storage is not None:
            s = self.storage
            if (s.num_layers, s.kv_heads, s.head_dim, s.dtype) != (layers, kv_heads, head_dim, dtype):
                raise ValueError("a prefix cache holds the KV of one model")
            return True
        per_block = 2 * layers * kv_heads * self.block_tokens * head_dim * dtype.itemsize
        blocks = self.budget_bytes // per_block
        if not self.enabled or blocks < 1:
            return False
        self.storage = PagedKvStorage(
            layers, kv_heads, head_dim, self.block_tokens, blocks, dtype, device, zeroed=False
        )
        self.pool = BlockPool(blocks, self.block_tokens, on_evict=self._removed.append)
        return True

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        return block_keys(tokens, self.fingerprint, self.block_tokens)

    def watch(self, observer: CacheObserver) -> list[bytes]:
        """Tell `observer` of every later change; returns the keys held now. One lock makes the two atomic: the
        observer's view (these keys, then its changes in order) is always the cache's."""
        with self._lock:
            self._observers.append(observer)
            return self.pool.cached_keys() if self.pool is not None else []

    def unwatch(self, observer: CacheObserver) -> None:
        with self._lock:
            self._observers.remove(observer)

    def _changed(self, stored: list[bytes]) -> None:
        """Report a change (under the lock): the keys stored, and those the pool evicted meanwhile."""
        kept = set(stored)
        removed = [k for k in self._removed if k not in kept]
        self._removed.clear()
        if removed and self.on_evict is not None:
            self.on_evict(len(removed))
        if stored or removed:
            for observer in self._observers:
                observer(stored, removed)

    def _matched(self, tokens: Sequence[int], keys: Sequence[bytes]) -> list[int]:
        return self.pool.cached_prefix(keys, tokens) if self.pool is not None else []

    def lookup(self, tokens: Sequence[int]) -> int:
        """Tokens of `tokens` the cache could serve now (nothing pinned: what a router would ask)."""
        with self._lock:
            blocks = self._matched(tokens, self.keys(tokens))
        return min(len(blocks) * self.block_tokens, len(tokens) - 1) if blocks else 0

    def acquire(self, tokens: Sequence[int]) -> PrefixHit:
        """The longest cached prefix of `tokens`, pinned; leaves at least one token to compute."""
        keys = self.keys(tokens)
        if not self.enabled:
            return PrefixHit(eligible_blocks=len(keys))
        with self._lock:
            blocks = self._matched(tokens, keys)
            used = min(len(blocks) * self.block_tokens, len(tokens) - 1)
            blocks = blocks[: -(-used // self.block_tokens)] if used > 0 else []
            self._pin(blocks)
        return PrefixHit(blocks, used if blocks else 0, len(keys), self.storage)

    def _pin(self, blocks: list[int]) -> None:
        if blocks:
            assert self.pool is not None
            self.pool.acquire_cached(blocks)

    def held_prefix(self, tokens: Sequence[int]) -> int:
        """Leading tokens of `tokens` held in whole blocks, fewer than all of them (a sender may leave them out of
        a handoff to this cache's owner: the last token's KV always travels)."""
        with self._lock:
            blocks = len(self._matched(tokens, self.keys(tokens)))
        while blocks and blocks * self.block_tokens >= len(tokens):
            blocks -= 1
        return blocks * self.block_tokens

    def pin_blocks(self, tokens: Sequence[int], keys: Sequence[bytes]) -> PrefixHit | None:
        """Exactly the blocks `keys` (the first len(keys) blocks of `tokens`), pinned; None when any is not held."""
        with self._lock:
            blocks = self._matched(tokens, keys)
            if len(blocks) < len(keys) or not keys:
                return None
            self._pin(blocks)
        return PrefixHit(blocks, len(blocks) * self.block_tokens, len(keys), self.storage)

    def release(self, hit: PrefixHit) -> None:
        """Unpin; the blocks nobody else holds go to the LRU's tail, the chain's head last (evicted last)."""
        if hit.blocks:
            with self._lock:
                assert self.pool is not None
                self.pool.free(BlockTable(hit.blocks))
        hit.blocks = []

    # -- prefilling in the pool: nothing copied in or out of the cache ---------------------------------------------

    def place(self, prompts: Sequence[Sequence[int]], hits: Sequence[PrefixHit]) -> list[BlockTable] | None:
        """Block tables in this pool to prefill `prompts` in: each starts with its hit's blocks (shared: one more
        reference each, no copy; a partly used last block is copied before it is written) with room for the
        rest. None when the pool cannot hold them all now (the caller prefills elsewhere and `insert`s)."""
        with self._lock:
            pool, storage = self.pool, self.storage
            if pool is None or storage is None:
                return None
            tables: list[BlockTable] = []
            try:
                for tokens, hit in zip(prompts, hits):
                    pool.acquire_cached(hit.blocks)
                    table = pool.new_table(hit.blocks, hit.tokens)
                    tables.append(table)
                    storage.copy_blocks(pool.reserve(table, len(tokens) - hit.tokens))
            except PoolExhausted:
                for table in tables:
                    pool.free(table)
                tables = []
            self._changed([])
        return tables or None

    def keep(self, prompts: Sequence[Sequence[int]], tables: Sequence[BlockTable]) -> int:
        """After a prefill in `place`'s tables: their full blocks become cached (no copy) and the tables' references
        go; returns how many blocks were new to the cache."""
        with self._lock:
            assert self.pool is not None
            stored: list[bytes] = []
            for tokens, table in zip(prompts, tables):
                stored += self.pool.cache_blocks(table, self.keys(tokens), tokens)
                self.pool.free(table)
            self._changed(stored)
        return len(stored)

    def drop(self, tables: Sequence[BlockTable]) -> None:
        """`place`'s tables after a failed prefill: their references go, nothing is cached."""
        with self._lock:
            assert self.pool is not None
            for table in tables:
                self.pool.free(table)

    # -- copying KV in -----------------------------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], kv: KvLayers) -> int:
        """Keep the full blocks of a prefilled prompt (`kv`: its whole KV, computed elsewhere) that are not cached
        yet, copying each into a block; returns how many. Stops at the first block the pool has no room for after
        evicting every unpinned block it may, or at a hash collision (the cached block is kept)."""
        if not self.enabled:
            return 0
        keys, bt = self.keys(tokens), self.block_tokens
        k0 = kv[0][0]
        with self._lock:
            if not self._bind(len(kv), k0.shape[1], k0.shape[3], k0.dtype, k0.device):
                return 0
            pool, storage = self.pool, self.storage
            assert pool is not None and storage is not None
            chain = BlockTable()  # held while the rest of it goes in: never evicted for its own tail
            try:
                for i, key in enumerate(keys):
                    found = pool.cached_prefix([key], tokens[i * bt : (i + 1) * bt])
                    if found:
                        pool.acquire_cached(found)
                        block = found[0]
                    elif pool.has_key(key) or not pool.can_allocate(1):
                        break  # (a hash collision: the cached block stays, the chain stops here)
                    else:
                        [block] = pool.allocate(1)
                        part = [(k[:, :, i * bt : (i + 1) * bt], v[:, :, i * bt : (i + 1) * bt]) for k, v in kv]
                        storage.write_sequence(BlockTable([block], 0), part, 0)
                    chain.ids.append(block)
                    chain.num_tokens += bt
                stored = pool.cache_blocks(chain, keys[: len(chain.ids)], tokens)
            finally:
                pool.free(chain)
            self._changed(stored)
        return len(stored)

    def clear(self) -> int:
        """Drop every unpinned block; returns how many."""
        with self._lock:
            if self.pool is None:
                return 0
            cleared = self.pool.clear_cache()
            on_evict, self.on_evict = self.on_evict, None  # (cleared, not evicted: no eviction metric)
            try:
                self._changed([])
            finally:
                self.on_evict = on_evict
        return cleared
