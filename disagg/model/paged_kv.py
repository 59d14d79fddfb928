"""The paged KV pool's tensors: per layer, keys and values `[kv_heads, num_blocks, block_size, head_dim]`.

Block ids come from disagg/model/block_pool.py. The layout puts kv_heads first so that gathering a batch's blocks
(`index_select` over dim 1 with the block tables flattened) yields `[kv_heads, rows, blocks * block_size,
head_dim]` directly: the grouped-query attention in disagg/model/native.py runs one batched matmul per KV head over
it, with no repeat of K/V for the query heads of a group and no transpose copy.
"""

from __future__ import annotations

import torch

from disagg.model.block_pool import BlockTable, CopyPairs
from disagg.model.kv_layers import KvLayers


class PagedKvStorage:
    """Keys and values of every layer for `num_blocks` blocks; grows by reallocation (block ids stay valid)."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
        zeroed: bool = True,
    ):
        """`zeroed`: blocks start as zeros, for attentions that read slots nobody wrote (the gathering ones weigh
        them 0, and 0 x NaN from uninitialised memory would poison a row); the kernel reads only written slots,
        so without it a new block costs nothing until it is written (the OS maps the memory lazily)."""
        self.num_layers, self.kv_heads, self.head_dim, self.block_size = num_layers, kv_heads, head_dim, block_size
        self.dtype, self.device, self.zeroed = dtype, device, zeroed
        with torch.inference_mode(False):  # normal tensors: written in place by inference-mode steps and by copies
            self.keys = [self._new(num_blocks) for _ in range(num_layers)]
            self.values = [self._new(num_blocks) for _ in range(num_layers)]

    def _new(self, num_blocks: int) -> torch.Tensor:
        shape = (self.kv_heads, num_blocks, self.block_size, self.head_dim)
        make = torch.zeros if self.zeroed else torch.empty
        return make(shape, dtype=self.dtype, device=self.device)

    @property
    def num_blocks(self) -> int:
        return self.keys[0].shape[1]

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.block_size * self.head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @torch.inference_mode(False)
    def grow(self, num_blocks: int) -> None:
        """Reallocate to `num_blocks` blocks, layer by layer (old and new overlap by one tensor, not a pool)."""
        if num_blocks <= self.num_blocks:
            return
        old = self.num_blocks
        for tensors in (self.keys, self.values):
            for i, tensor in enumerate(tensors):
                grown = self._new(num_blocks)
                grown[:, :old] = tensor
                tensors[i] = grown

    def copy_blocks(self, pairs: CopyPairs) -> None:
        """Copy-on-write: each (source, destination) block's K and V, every layer."""
        if not pairs:
            return
        sources = torch.tensor([s for s, _ in pairs], device=self.device)
        destinations = torch.tensor([d for _, d in pairs], device=self.device)
        for tensor in self.keys + self.values:
            tensor.index_copy_(1, destinations, tensor.index_select(1, sources))

    def slots(self, table: BlockTable, start: int, end: int) -> torch.Tensor:
        """Flat slot indices (block * block_size + offset) of tokens start..end-1 of a sequence."""
        size = self.block_size
        return torch.tensor([table.ids[t // size] * size + t % size for t in range(start, end)], device=self.device)

    def write_sequence(self, table: BlockTable, kv: KvLayers, start: int) -> None:
        """Write a sequence's KV (each [1, kv_heads, tokens, head_dim]) at token `start` of its table (the handoff
        into the pool: the received tensors are copied once, into their blocks)."""
        tokens = kv[0][0].shape[2]
        slots = self.slots(table, start, start + tokens)
        for i, (key, value) in enumerate(kv):
            self.write(i, slots, key[0].to(self.device, self.dtype), value[0].to(self.device, self.dtype))

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store K and V `[kv_heads, tokens, head_dim]` of one layer at `slots`."""
        self.keys[layer].view(self.kv_heads, -1, self.head_dim).index_copy_(1, slots, keys)
        self.values[layer].view(self.kv_heads, -1, self.head_dim).index_copy_(1, slots, values)

    def read_sequence(self, table: BlockTable, end: int | None = None) -> KvLayers:
        """A sequence's first `end` tokens (default: all written) as KvLayers, copied out of the pool."""
        end = table.num_tokens if end is None else end
        slots = self.slots(table, 0, end)
        return [
            (
                k.view(self.kv_heads, -1, self.head_dim).index_select(1, slots)[None],
                v.view(self.kv_heads, -1, self.head_dim).index_select(1, slots)[None],
            )
            for k, v in zip(self.keys, self.values)
        ]
