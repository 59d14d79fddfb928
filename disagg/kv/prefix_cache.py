"""The prefill worker's prefix cache: the KV of computed prompts in fixed-size blocks, found again by a chain hash.

A block holds the keys and values of `block_tokens` consecutive prompt tokens for every layer, one tensor
`[layers, 2 (K, V), kv_heads, block_tokens, head_dim]`. Its key is `blake2b(parent key, fingerprint, token ids)`,
so a key names the whole prefix up to the block's end, for one model: the same tokens give the same keys in every
process and after every restart (Python's `hash()` is salted per process and would not). Only full blocks are
kept, and a prompt always computes at least its last token (its logits choose the first output token).

Blocks live in one LRU under a byte budget; a block a running prefill uses is pinned (reference counted) and never
evicted. When a chain is touched its blocks are refreshed leaf first, so under pressure a prefix loses its tail
before its head (a lost head makes the rest of the chain unreachable).

Observers (`watch`) hear of every key stored and removed, for the worker's WatchKvEvents stream (a router's exact
index, disagg/kv/events.py): once per change, with the cache's lock held, on the thread that changed it.

Thread-safe (one lock): the prefill engine thread uses it, metrics read it at scrape time.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from disagg.model.kv_layers import KvLayers

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
class _Block:
    key: bytes
    tokens: tuple[int, ...]  # checked on use: a hash collision gives a miss, never wrong KV
    kv: torch.Tensor  # [layers, 2, kv_heads, block_tokens, head_dim]
    pins: int = 0

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class PrefixHit:
    """The cached blocks a prefill may use (pinned until `PrefixCache.release`) and how many tokens they give.

    `tokens` <= len(blocks) * block_tokens: a prompt equal to a cached one uses all but its last token.
    """

    blocks: list[_Block] = field(default_factory=list)
    tokens: int = 0
    eligible_blocks: int = 0  # the prompt's full blocks (hits + misses)

    def kv(self) -> KvLayers:
        """The prefix's KV, one (keys, values) pair per layer, each [1, kv_heads, tokens, head_dim]."""
        stacked = torch.cat([b.kv for b in self.blocks], dim=3)[:, :, :, : self.tokens]
        return [(layer[0].unsqueeze(0).contiguous(), layer[1].unsqueeze(0).contiguous()) for layer in stacked]

    def joined(self, suffix: KvLayers) -> KvLayers:
        """The prefix's KV followed by `suffix`'s (the KV of the tokens after it), one copy per tensor: a handoff
        that left out the blocks its receiver holds, made whole."""
        if self.tokens != len(self.blocks) * self.blocks[0].kv.shape[3]:
            raise ValueError("only a prefix of whole blocks joins a handed-over suffix")

        def cat(layer: int, kind: int, tail: torch.Tensor) -> torch.Tensor:
            return torch.cat([*(b.kv[layer, kind] for b in self.blocks), tail[0]], dim=1).unsqueeze(0)

        return [(cat(layer, 0, keys), cat(layer, 1, values)) for layer, (keys, values) in enumerate(suffix)]


class PrefixCache:
    """Blocks of prompt KV under a byte budget, LRU, pinned while in use."""

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
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._observers: list[CacheObserver] = []
        self.bytes_held = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        return block_keys(tokens, self.fingerprint, self.block_tokens)

    def watch(self, observer: CacheObserver) -> list[bytes]:
        """Tell `observer` of every later change; returns the keys held now. One lock makes the two atomic: the
        observer's view (these keys, then its changes in order) is always the cache's."""
        with self._lock:
            self._observers.append(observer)
            return list(self._blocks)

    def unwatch(self, observer: CacheObserver) -> None:
        with self._lock:
            self._observers.remove(observer)

    def _notify(self, stored: list[bytes], removed: list[bytes]) -> None:
        if stored or removed:
            for observer in self._observers:
                observer(stored, removed)

    def _matched(self, tokens: Sequence[int], keys: list[bytes]) -> list[_Block]:
        blocks = []
        for i, key in enumerate(keys):
            block = self._blocks.get(key)
            bt = self.block_tokens
            if block is None or block.tokens != tuple(tokens[i * bt : (i + 1) * bt]):
                break
            blocks.append(block)
        return blocks

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
            for block in blocks:
                block.pins += 1
            self._touch(blocks)
        return PrefixHit(blocks, used if blocks else 0, len(keys))

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
            blocks = self._matched(tokens, list(keys))
            if len(blocks) < len(keys) or not keys:
                return None
            for block in blocks:
                block.pins += 1
            self._touch(blocks)
        return PrefixHit(blocks, len(blocks) * self.block_tokens, len(keys))

    def release(self, hit: PrefixHit) -> None:
        with self._lock:
            for block in hit.blocks:
                block.pins -= 1
            hit.blocks = []

    def insert(self, tokens: Sequence[int], kv: KvLayers) -> int:
        """Keep the full blocks of a prefilled prompt (`kv`: its whole KV) that are not cached yet; returns how many.

        Stops at the first block that does not fit the budget after evicting every unpinned block it may.
        """
        if not self.enabled:
            return 0
        keys, bt = self.keys(tokens), self.block_tokens
        stored: list[bytes] = []
        removed: list[bytes] = []
        with self._lock:
            chain: list[_Block] = []  # pinned while the rest of it goes in: never evicted for its own tail
            try:
                for i, key in enumerate(keys):
                    block = self._blocks.get(key)
                    if block is None or block.tokens != tuple(tokens[i * bt : (i + 1) * bt]):
                        if block is not None:  # (a hash collision: keep the cached one, stop the chain here)
                            break
                        start, end = i * bt, (i + 1) * bt
                        data = torch.stack([torch.stack((k[0, :, start:end], v[0, :, start:end])) for k, v in kv])
                        block = _Block(key, tuple(tokens[start:end]), data)
                        if not self._make_room(block.nbytes, removed):
                            break
                        self._blocks[key] = block
                        self.bytes_held += block.nbytes
                        stored.append(key)
                    block.pins += 1
                    chain.append(block)
            finally:
                for block in chain:
                    block.pins -= 1
            self._touch(chain)
            # (a key evicted, then stored again within this insert, is reported stored: the net change)
            self._notify(stored, [k for k in removed if k not in self._blocks])
        return len(stored)

    def _touch(self, chain: list[_Block]) -> None:
        """Most recently used: the chain's head last, so eviction takes a prefix's tail before its head."""
        for block in reversed(chain):
            if block.key in self._blocks:
                self._blocks.move_to_end(block.key)

    def _make_room(self, size: int, removed: list[bytes]) -> bool:
        """Evict unpinned blocks, least recently used first, until `size` more bytes fit; appends their keys."""
        if size > self.budget_bytes:
            return False
        evicted = 0
        if self.bytes_held + size > self.budget_bytes:
            for key in [k for k, b in self._blocks.items() if b.pins == 0]:
                block = self._blocks.pop(key)
                self.bytes_held -= block.nbytes
                removed.append(key)
                evicted += 1
                if self.bytes_held + size <= self.budget_bytes:
                    break
        if evicted:
            self.evictions += evicted
            if self.on_evict is not None:
                self.on_evict(evicted)
        return self.bytes_held + size <= self.budget_bytes

    def clear(self) -> int:
        """Drop every unpinned block; returns how many."""
        with self._lock:
            dropped = [k for k, b in self._blocks.items() if b.pins == 0]
            for key in dropped:
                self.bytes_held -= self._blocks.pop(key).nbytes
            self._notify([], dropped)
        return len(dropped)
