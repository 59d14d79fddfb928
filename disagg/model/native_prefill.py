"""Prefill with the native forward pass (disagg/model/native.py): the same results as disagg/model/prefill.py's,
from one unpadded pass over every prompt's tokens (no left padding to the longest prompt) with the native model's
matmuls (oneDNN-prepacked weights).

The prompts' KV is written into a paged pool: the caller's (`placed`: the prefix cache's, whose tables start with
the cached blocks, read where they are) or a scratch pool of the call's own (a known prefix copied in first). Each
prompt's KV is also copied out as KvLayers, as HF's cache is by `prefill`: the handoff and the decode batch take KV
in that form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from disagg.model.block_pool import BlockPool, BlockTable
from disagg.model.kv_layers import KvLayers
from disagg.model.lm_head import ExactGreedyHead, LmHead
from disagg.model.native import NativeModel
from disagg.model.paged_kv import PagedKvStorage
from disagg.model.prefill import PrefillOutput, prefill, prefill_after_prefix

_BLOCK_TOKENS = 16


@torch.inference_mode()
def native_prefill(
    native: NativeModel,
    head: LmHead,
    prompts: list[list[int]],
    *,
    prefixes: Sequence[KvLayers | None] = (),
    want_kv: bool = True,
    on_layer: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    all_positions: Sequence[bool] = (),
    placed: tuple[PagedKvStorage, list[BlockTable]] | None = None,
) -> list[PrefillOutput]:
    """`prefill`'s results for `prompts`, prompt i after its known KV `prefixes[i]` (each [1, kv_heads, P,
    head_dim]; None or missing: nothing known) as `prefill_after_prefix` takes it, or with `placed` (a pool and one
    table per prompt, holding its known tokens' KV and room for the rest) in that pool, advancing the tables.
    `head`: the split head the first tokens come from (an ExactGreedyHead screens greedy ones; a plain LmHead gives
    the logits on first use).

    `on_layer(row, layer, keys, values)`, if given, receives each prompt's whole K and V of each layer (its known
    prefix included) while the forward pass continues. The prompts marked in `all_positions` keep every computed
    position's hidden state (PrefillOutput.position_logits), for their prompt logprobs.
    """
    s = native.shape
    if placed is not None:
        storage, tables = placed
    else:
        storage, tables = _scratch(native, prompts, prefixes)
    known = [table.num_tokens for table in tables]
    if any(not 0 <= k < len(ids) for k, ids in zip(known, prompts)):
        raise ValueError("a known prefix must leave at least one token of its prompt to compute")
    slots = [storage.slots(table, 0, len(ids)) for table, ids in zip(tables, prompts)]

    def report(layer: int) -> None:
        assert on_layer is not None
        keys = storage.keys[layer].view(s.kv_heads, -1, s.head_dim)
        values = storage.values[layer].view(s.kv_heads, -1, s.head_dim)
        for row, row_slots in enumerate(slots):
            on_layer(row, layer, keys.index_select(1, row_slots)[None], values.index_select(1, row_slots)[None])

    every = any(all_positions)
    hidden = native.prefill(prompts, tables, storage, report if want_kv and on_layer else None, every)
    computed = [len(ids) - count for ids, count in zip(prompts, known)]
    ends = torch.tensor(computed).cumsum(0)
    lasts = hidden[ends - 1] if every else hidden
    greedy = head.greedy(lasts) if isinstance(head, ExactGreedyHead) else [None] * len(prompts)
    results = []
    for row, table in enumerate(tables):
        BlockPool.advance(table, computed[row])
        kv = storage.read_sequence(table) if want_kv else None
        result = PrefillOutput(kv, None, lasts[row], head, greedy[row])
        if every and row < len(all_positions) and all_positions[row]:
            result.positions, result.positions_head = hidden[int(ends[row]) - computed[row] : int(ends[row])], head
        results.append(result)
    return results


def _scratch(
    native: NativeModel, prompts: list[list[int]], prefixes: Sequence[KvLayers | None]
) -> tuple[PagedKvStorage, list[BlockTable]]:
    """A pool of the call's own with room for every prompt, each one's known prefix copied in."""
    s = native.shape
    pool = BlockPool(sum(-(-len(ids) // _BLOCK_TOKENS) for ids in prompts), _BLOCK_TOKENS)
    device, dtype = native.embed.device, native.embed.dtype
    storage = PagedKvStorage(s.layers, s.kv_heads, s.head_dim, _BLOCK_TOKENS, pool.num_blocks, dtype, device, False)
    tables: list[BlockTable] = []
    for ids, prefix in zip(prompts, [*prefixes, *[None] * (len(prompts) - len(prefixes))]):
        table = pool.new_table()
        pool.reserve(table, len(ids))
        if prefix is not None and prefix[0][0].shape[2]:
            if not prefix[0][0].shape[2] < len(ids):
                raise ValueError("a known prefix must leave at least one token of its prompt to compute")
            storage.write_sequence(table, prefix, 0)
            pool.advance(table, prefix[0][0].shape[2])
        tables.append(table)
    return storage, tables


class Prefiller:
    """The prefill an engine runs: the native forward pass where the model has one (`native`), else HF's."""

    def __init__(self, model: PreTrainedModel, head: LmHead | None, native: NativeModel | None):
        """`head`: the engine's split head (None: the model's own forward pass for HF's, a plain head for the
        native one, which has no other)."""
        self.model, self.head, self.native = model, head, native
        self._native_head = head if head is not None else (LmHead(model) if native is not None else None)

    def batch(
        self,
        prompts: list[list[int]],
        *,
        want_kv: bool = True,
        on_layer: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        all_positions: Sequence[bool] = (),
        placed: tuple[PagedKvStorage, list[BlockTable]] | None = None,
    ) -> list[PrefillOutput]:
        """`prefill(model, prompts, ...)`'s results; `placed`: in that pool (`native_prefill`), native only."""
        if self.native is None:
            assert placed is None, "HF's forward pass keeps its own cache"
            return prefill(
                self.model, prompts, want_kv=want_kv, on_layer=on_layer, head=self.head, all_positions=all_positions
            )
        assert self._native_head is not None
        return native_prefill(
            self.native,
            self._native_head,
            prompts,
            want_kv=want_kv,
            on_layer=on_layer,
            all_positions=all_positions,
            placed=placed,
        )

    def after_prefix(
        self,
        tokens: list[int],
        prefix: KvLayers,
        *,
        on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> PrefillOutput:
        """`prefill_after_prefix(model, tokens, prefix, ...)`'s result."""
        if self.native is None:
            return prefill_after_prefix(self.model, tokens, prefix, on_layer=on_layer, head=self.head)
        assert self._native_head is not None
        sink = on_layer
        rows = None if sink is None else (lambda row, layer, keys, values: sink(layer, keys, values))
        return native_prefill(self.native, self._native_head, [tokens], prefixes=[prefix], on_layer=rows)[0]
