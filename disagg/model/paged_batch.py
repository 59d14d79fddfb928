"""The running decode batch on the paged KV pool, stepped by the native model (disagg/model/native.py).

The same interface as the slab (disagg/model/decode_batch.py: add_many, remove, row_kv, step_hidden, step,
set_last_tokens), but each row is a block table (disagg/model/block_pool.py) into one pool per worker:
- joining copies only the joiner's KV, into blocks of its own (the slab copied the whole running batch whenever a
  longer sequence joined or it ran out of room); n > 1 sequences handed the same KV in one join share its blocks;
- leaving returns block ids; nothing moves;
- a step reserves a block for a row only when it crosses a block boundary (copy-on-write first where a fork shares
  its partly filled last block), then runs every row in one forward pass.

The pool's tensors grow by doubling, up to `max_blocks` when the KV budget sets one, and go back to their initial
size when the batch empties; what the budget counts is the blocks promised to the rows (each row's blocks for its
final length, `kv_bytes`), so a promise is never broken by a later step.
"""

from __future__ import annotations

import torch

from disagg.model.block_pool import BlockPool, BlockTable
from disagg.model.kv_layers import KvLayers
from disagg.model.native import DecodeFn, NativeModel
from disagg.model.paged_kv import PagedKvStorage

DEFAULT_BLOCK_TOKENS = 16
_INITIAL_BLOCKS = 64


class PagedDecodeBatch:
    """Rows of running sequences, each a block table into the worker's pool.

    Ownership: `add_many` copies the given KV into the pool (the caller's tensors may be dropped); `remove` frees a
    row's blocks and moves the last row into its place, so row order is not stable: look rows up by id.
    """

    def __init__(
        self,
        native: NativeModel,
        dtype: torch.dtype,
        device: torch.device,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        max_blocks: int = 0,
        decode: DecodeFn | None = None,
    ):
        """`max_blocks`: the most blocks the pool may grow to (0: no limit); `decode`: the step function
        (default `native.decode`, eager; disagg/model/compiled.py compiles it)."""
        self.native, self.dtype, self.device = native, dtype, device
        self.decode: DecodeFn = decode or native.decode
        self.max_blocks = max_blocks
        initial = min(_INITIAL_BLOCKS, max_blocks) if max_blocks else _INITIAL_BLOCKS
        self._initial_blocks = initial
        self.pool = BlockPool(initial, block_tokens)
        self.storage = self._new_storage(initial)
        self.seq_ids: list[str] = []
        self.tables: list[BlockTable] = []
        self.final_tokens: list[int] = []  # each row's KV tokens at its last step (what the budget promised it)
        self._last: list[int] = []  # each row's newest token, the next step's input
        self._block_tables: torch.Tensor | None = None  # the step's [rows, blocks] tensor, rebuilt when tables change

    def __len__(self) -> int:
        return len(self.seq_ids)

    def _new_storage(self, num_blocks: int) -> PagedKvStorage:
        s = self.native.shape
        zeroed = self.native.attention != "kernel"  # (the gathering attentions read unwritten slots)
        return PagedKvStorage(
            s.layers, s.kv_heads, s.head_dim, self.block_tokens, num_blocks, self.dtype, self.device, zeroed
        )

    @property
    def block_tokens(self) -> int:
        return self.pool.block_size

    @property
    def bytes_per_block(self) -> int:
        return self.storage.bytes_per_block

    def blocks_for(self, final_tokens: list[int]) -> int:
        """Blocks promised to rows of these final lengths (each row's own: shared fork blocks counted per row)."""
        return sum(self.pool.blocks_for(tokens) for tokens in final_tokens)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the blocks promised to the running rows (the KV budget's count; 0 when empty)."""
        return self.blocks_for(self.final_tokens) * self.bytes_per_block

    @property
    def pool_bytes(self) -> int:
        """Bytes the pool's tensors hold (capacity)."""
        return self.storage.nbytes

    def _ensure_free(self, blocks: int) -> None:
        """Grow the pool (doubling, within `max_blocks`) until `blocks` are free."""
        if self.pool.can_allocate(blocks):
            return
        wanted = self.pool.num_blocks + blocks - self.pool.num_free
        grown = max(wanted, 2 * self.pool.num_blocks)
        if self.max_blocks:
            grown = min(grown, max(self.max_blocks, wanted))
        self.storage.grow(grown)
        self.pool.grow(grown)

    def add_many(self, joiners: list[tuple[str, KvLayers, int]], final_tokens: list[int] | None = None) -> None:
        """Join sequences (id, cache of every token before the last, last token); `final_tokens`: each one's KV
        length at its last step (default: its cache + 1). Joiners handed the same KV object (n > 1 forks of one
        prompt) share its blocks: copied once, then forked."""
        finals = final_tokens or [kv[0][0].shape[2] + 1 for _, kv, _ in joiners]
        distinct = {id(kv): kv[0][0].shape[2] for _, kv, _ in joiners}
        self._ensure_free(sum(self.pool.blocks_for(tokens) for tokens in distinct.values()))  # grown once for all
        first_of: dict[int, BlockTable] = {}
        for (seq_id, kv, last_token), final in zip(joiners, finals):
            tokens = kv[0][0].shape[2]
            sibling = first_of.get(id(kv))
            if sibling is not None:
                table = self.pool.fork(sibling)
            else:
                table = self.pool.new_table()
                self.pool.reserve(table, tokens)
                self.storage.write_sequence(table, kv, 0)
                self.pool.advance(table, tokens)
                first_of[id(kv)] = table
            self.seq_ids.append(seq_id)
            self.tables.append(table)
            self.final_tokens.append(max(final, tokens + 1))
            self._last.append(last_token)
        self._block_tables = None

    def row_kv(self, seq_id: str) -> KvLayers:
        """A row's KV (every token before its newest), each [1, kv_heads, tokens, head_dim], copied out of the pool."""
        return self.storage.read_sequence(self.tables[self.seq_ids.index(seq_id)])

    def remove(self, seq_id: str) -> None:
        """Leave the batch: the row's blocks go back to the pool (those a fork still holds stay)."""
        row, last = self.seq_ids.index(seq_id), len(self.seq_ids) - 1
        self.pool.free(self.tables[row])
        self.seq_ids[row], self.tables[row] = self.seq_ids[last], self.tables[last]
        self.final_tokens[row], self._last[row] = self.final_tokens[last], self._last[last]
        del self.seq_ids[last], self.tables[last], self.final_tokens[last], self._last[last]
        self._block_tables = None
        if not self.seq_ids and self.pool.num_blocks > self._initial_blocks:  # idle: memory back, as the slab did
            self.pool = BlockPool(self._initial_blocks, self.block_tokens)
            self.storage = self._new_storage(self._initial_blocks)

    def _prepare_step(self) -> torch.Tensor:
        """Room for every row's next token (a new block at a block boundary, copy-on-write of a shared tail);
        returns the [rows, blocks] block tables."""
        for table in self.tables:
            needed = self.pool.blocks_needed(table, 1)
            if needed:
                self._ensure_free(needed)
                self.storage.copy_blocks(self.pool.reserve(table, 1))
                self._block_tables = None
        if self._block_tables is None:
            width = max(len(table.ids) for table in self.tables)
            rows = [table.ids + [0] * (width - len(table.ids)) for table in self.tables]
            self._block_tables = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self._block_tables

    @torch.inference_mode()
    def step_hidden(self, model: object = None) -> torch.Tensor:
        """One decode step of every row: the head's input [rows, hidden] (`model` unused: the batch's native model
        runs; the argument keeps the slab's interface)."""
        block_tables = self._prepare_step()
        tokens = torch.tensor(self._last, dtype=torch.long, device=self.device)
        positions = torch.tensor([table.num_tokens for table in self.tables], dtype=torch.long, device=self.device)
        hidden = self.decode(tokens, positions, block_tables, self.storage.keys, self.storage.values)
        for table in self.tables:
            table.num_tokens += 1
        return hidden

    @torch.inference_mode()
    def step(self, model: torch.nn.Module) -> torch.Tensor:
        """One decode step of every row; returns logits [rows, vocab] (float32) from the model's own head."""
        head = model.get_output_embeddings()  # type: ignore[operator]
        return head(self.step_hidden()).float()

    def set_last_tokens(self, tokens: list[int]) -> None:
        self._last = list(tokens)
