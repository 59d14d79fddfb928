"""The paged KV pool's bookkeeping: fixed-size blocks by id, a free list, reference counts, block tables.

The tensors live elsewhere (disagg/model/paged_kv.py: per layer `[kv_heads, num_blocks, block_size, head_dim]`);
this module only decides which block ids a sequence's tokens occupy, so joining, leaving, forking and a prefix-cache
hit move ids, never KV. No torch here: the allocator is plain Python and tested as such.

- A sequence (`BlockTable`) owns one reference to each of its blocks; token t lives in block `ids[t // size]` at
  offset `t % size`.
- `fork` shares every block (n > 1: one prompt's KV, n sequences); a write into a block someone else also holds is
  copy-on-write (`reserve` hands back the (source, destination) pairs the storage must copy first).
- Prefix caching (vLLM's design, docs/design/prefix_caching.md): a full block may be *cached* under its chain key
  (disagg/kv/prefix_cache.py's `block_keys`, with its token ids, compared on use: a collision is a miss). A cached
  block keeps its key after its last holder leaves and waits in the free list as an eviction candidate; a hit takes
  it back out (refcount++). The free list is the LRU: freed blocks go to its tail, allocation takes its head, and a
  cached block taken that way is evicted then.
- The budget is counted in blocks: `num_blocks` is the whole pool; `num_free` what allocation may still take
  (free and evictable cached blocks).

Not thread-safe: one engine thread owns a pool.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from disagg.errors import Overloaded

CopyPairs = list[tuple[int, int]]  # (source block, destination block) the storage copies before a write


class PoolExhausted(Overloaded):
    """More blocks asked for than the pool has free (callers check `can_allocate` first to wait instead)."""


@dataclass
class BlockTable:
    """One sequence's blocks, in token order, and how many of its tokens have KV written."""

    ids: list[int] = field(default_factory=list)
    num_tokens: int = 0


@dataclass
class _CachedBlock:
    key: bytes
    tokens: tuple[int, ...]


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens; ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int, block_size: int, on_evict: Callable[[bytes], object] | None = None):
        """`on_evict(key)`: called when a cached block is reused for other KV (or cleared)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs blocks and tokens per block, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.on_evict = num_blocks, block_size, on_evict
        self.refcount = [0] * num_blocks
        # Free blocks in eviction order (head first): never-used and evicted ones, then cached ones by last use.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, _CachedBlock] = {}  # block id -> what it holds
        self._by_key: dict[bytes, int] = {}  # chain key -> block id
        self.evictions = 0  # cached blocks reused for other KV since start

    # -- capacity ------------------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks allocation can still take (free ones, and cached ones nobody holds)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds (the budget's used share)."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def grow(self, num_blocks: int) -> None:
        """Add blocks (ids from the current count on) to the free list's head: the storage grew to match."""
        if num_blocks < self.num_blocks:
            raise ValueError(f"a pool only grows: {num_blocks} < {self.num_blocks}")
        added = range(self.num_blocks, num_blocks)
        self.refcount.extend(0 for _ in added)
        for block in reversed(added):
            self._free[block] = None
            self._free.move_to_end(block, last=False)
        self.num_blocks = num_blocks

    # -- allocation ----------------------------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int]:
        """`num_blocks` blocks, each with one reference; evicts cached blocks from the LRU head as needed."""
        if num_blocks > len(self._free):
            raise PoolExhausted(f"KV pool: {num_blocks} blocks asked, {len(self._free)} of {self.num_blocks} free")
        taken = []
        for _ in range(num_blocks):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self.refcount[block] = 1
            taken.append(block)
        return taken

    def _evict(self, block: int) -> None:
        cached = self._cached.pop(block, None)
        if cached is not None:
            del self._by_key[cached.key]
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(cached.key)

    def _take(self, block: int) -> None:
        """One more reference to a block that exists (shared, or a cached one taken back from the free list)."""
        if self.refcount[block] == 0:
            del self._free[block]
        self.refcount[block] += 1

    def _drop(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free[block] = None  # the tail: the most recently used is evicted last

    # -- sequences -----------------------------------------------------------------------------------------------

    def new_table(self, shared_prefix: Sequence[int] = (), prefix_tokens: int = 0) -> BlockTable:
        """A sequence's table: empty, or starting with a prefix-cache hit's blocks (`shared_prefix`, referenced by
        `acquire_cached`: the table takes over those references) holding its first `prefix_tokens` tokens. Room
        for the tokens it writes next comes from `reserve`."""
        fits = (len(shared_prefix) - 1) * self.block_size < prefix_tokens <= len(shared_prefix) * self.block_size
        if (shared_prefix or prefix_tokens) and not fits:
            raise ValueError(f"{len(shared_prefix)} shared blocks hold {prefix_tokens} tokens")
        return BlockTable(list(shared_prefix), prefix_tokens)

    def _shared_tail(self, table: BlockTable, new_tokens: int) -> bool:
        """Whether the first of `new_tokens` lands in a partly filled block that is shared or cached (never written
        in place: another holder, or a later prefix hit, reads it)."""
        start = table.num_tokens
        if new_tokens <= 0 or start % self.block_size == 0:
            return False
        block = table.ids[start // self.block_size]
        return self.refcount[block] > 1 or block in self._cached

    def blocks_needed(self, table: BlockTable, new_tokens: int) -> int:
        """What `reserve(table, new_tokens)` takes from the free list."""
        grown = max(0, self.blocks_for(table.num_tokens + new_tokens) - len(table.ids))
        return grown + int(self._shared_tail(table, new_tokens))

    def reserve(self, table: BlockTable, new_tokens: int) -> CopyPairs:
        """Make room in `table` to write `new_tokens` more tokens at `num_tokens`: new blocks at the end and, when
        the first write lands in a partly filled block that is shared or cached, a private copy of it
        (copy-on-write: returned as (source, destination) for the storage to copy before writing). `num_tokens`
        is not advanced: `advance` does that once the KV is written. All or nothing: nothing changes when the
        pool is short."""
        needed = self.blocks_needed(table, new_tokens)
        if needed > len(self._free):
            raise PoolExhausted(f"KV pool: {needed} blocks asked, {len(self._free)} of {self.num_blocks} free")
        copies: CopyPairs = []
        if self._shared_tail(table, new_tokens):
            index = table.num_tokens // self.block_size
            shared = table.ids[index]
            (private,) = self.allocate(1)
            self._drop(shared)
            table.ids[index] = private
            copies.append((shared, private))
        table.ids.extend(self.allocate(max(0, self.blocks_for(table.num_tokens + new_tokens) - len(table.ids))))
        return copies

    @staticmethod
    def advance(table: BlockTable, new_tokens: int) -> None:
        table.num_tokens += new_tokens

    def fork(self, table: BlockTable) -> BlockTable:
        """A second table sharing every block of `table` (its n > 1 sibling): references, no KV copied."""
        for block in table.ids:
            self._take(block)
        return BlockTable(list(table.ids), table.num_tokens)

    def free(self, table: BlockTable) -> None:
        """The sequence leaves: one reference less on each block; those nobody holds go back to the free list, the
        table's tail first so that a cached chain loses its tail before its head."""
        for block in reversed(table.ids):
            self._drop(block)
        table.ids, table.num_tokens = [], 0

    # -- prefix caching ------------------------------------------------------------------------------------------

    def cache_blocks(self, table: BlockTable, keys: Sequence[bytes], tokens: Sequence[int]) -> list[bytes]:
        """Mark `table`'s full blocks as holding the prefix `keys` names (keys[i] for block i; `tokens` the
        sequence's token ids, at least len(keys) blocks of them). A key already held by another block stays
        there (this copy is not cached); returns the keys that became cached."""
        size, added = self.block_size, []
        full = min(len(keys), table.num_tokens // size, len(tokens) // size)
        for i in range(full):
            block, key = table.ids[i], keys[i]
            if block in self._cached or key in self._by_key:
                continue
            self._cached[block] = _CachedBlock(key, tuple(tokens[i * size : (i + 1) * size]))
            self._by_key[key] = block
            added.append(key)
        return added

    def cached_prefix(self, keys: Sequence[bytes], tokens: Sequence[int]) -> list[int]:
        """The blocks holding the longest run of leading `keys` whose token ids match (nothing referenced)."""
        size, found = self.block_size, []
        for i, key in enumerate(keys):
            block = self._by_key.get(key)
            if block is None or self._cached[block].tokens != tuple(tokens[i * size : (i + 1) * size]):
                break
            found.append(block)
        return found

    def acquire_cached(self, blocks: Sequence[int]) -> None:
        """One reference to each of `blocks` (from `cached_prefix`): a hit shares them, refcount++ and no copy."""
        for block in blocks:
            self._take(block)

    def is_cached(self, block: int) -> bool:
        return block in self._cached

    def cached_keys(self) -> list[bytes]:
        return list(self._by_key)

    def has_key(self, key: bytes) -> bool:
        return key in self._by_key

    @property
    def num_held_cached(self) -> int:
        """Cached blocks some sequence (or a pinned hit) holds now."""
        return sum(1 for block in self._cached if self.refcount[block])

    def key_of(self, block: int) -> bytes | None:
        cached = self._cached.get(block)
        return cached.key if cached is not None else None

    def clear_cache(self) -> int:
        """Forget every cached block nobody holds (they stay free); returns how many (`on_evict` hears each)."""
        idle = [block for block in self._cached if self.refcount[block] == 0]
        for block in idle:
            self._evict(block)
        self.evictions -= len(idle)  # (cleared, not evicted for other KV)
        return len(idle)
