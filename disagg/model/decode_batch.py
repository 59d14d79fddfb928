"""The running decode batch: every sequence's KV cache in one preallocated, left-padded slab.

Row i of the slab belongs to `seq_ids[i]`. A step writes each row's new K/V in place at the same column (no
per-step concatenation, unlike `generate()`'s DynamicCache), so the cost of a step is the attention itself.
Sequences join and leave between steps; a finished sequence's row is reused at once and the slab is released when
the batch empties. With the KV cache off, `RecomputeBatch` keeps the same interface and recomputes everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from transformers.cache_utils import Cache, DynamicLayer

from disagg.model.kv_layers import KvLayers
from disagg.model.lm_head import body_hidden
from disagg.model.prefill import left_padded

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.cache_utils import CacheLayerMixin, DummyLayer, LinearAttentionCacheLayerMixin

_GROW_COLUMNS = 64
# Every step's attention reads all `length` columns of every row, so columns that are padding in every row are
# dropped as soon as they are worth one copy of the slab (an eighth of it), not left until they are half of it.
_MIN_TRIM_COLUMNS = 16


class _SlabLayer(DynamicLayer):
    """A cache layer that appends into a preallocated [rows, heads, columns, head_dim] buffer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, length: int):
        super().__init__()
        self._slab_keys, self._slab_values, self._rows, self._length = keys, values, rows, length
        self.keys, self.values = keys[:rows, :, :length], values[:rows, :, :length]
        self.device, self.is_initialized = keys.device, True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        self._slab_keys[: self._rows, :, self._length : end] = key_states
        self._slab_values[: self._rows, :, self._length : end] = value_states
        self._length = end
        self.keys, self.values = self._slab_keys[: self._rows, :, :end], self._slab_values[: self._rows, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length


class _SlabCache(Cache):
    def __init__(self, layers: list[_SlabLayer]):
        # (list is invariant: Cache takes a list of the union of its layer kinds, which a list[_SlabLayer] is not)
        super().__init__(layers=cast("list[CacheLayerMixin | LinearAttentionCacheLayerMixin | DummyLayer]", layers))


class DecodeBatch:
    """Left-padded KV slab of the running sequences.

    Ownership: `add` copies the given KV into the slab (the caller's tensors may be dropped); `remove` frees rows
    by moving the last row into the hole, so row order is not stable: look rows up by id.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.seq_ids: list[str] = []
        self.length = 0  # columns in use; every row ends at column `length`
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._pad = torch.zeros(0, dtype=torch.long)  # left padding of each row
        self._last = torch.zeros(0, dtype=torch.long)  # each row's newest token, the next step's input

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def kv_bytes(self) -> int:
        """Bytes held by the slab (capacity, not just use)."""
        return sum(t.numel() * t.element_size() for t in self._keys + self._values)

    def kv_shape(self) -> tuple[int, int, int, int]:
        """[batch, heads, seq_len, head_dim] of each layer's keys (and values) in use, not the slab's capacity."""
        return len(self.seq_ids), self.kv_heads, self.length, self.head_dim

    def _capacity(self) -> tuple[int, int]:
        return (self._keys[0].shape[0], self._keys[0].shape[2]) if self._keys else (0, 0)

    def bytes_for(self, rows: int, columns: int) -> int:
        """Bytes of a slab of `rows` x `columns` (K and V of every layer)."""
        return 2 * self.num_layers * rows * self.kv_heads * columns * self.head_dim * self.dtype.itemsize

    def plan(self, seq_lens: list[int], steps: int) -> tuple[int, int]:
        """(rows, columns) a slab needs for the rows it has plus joiners of `seq_lens` tokens, for `steps` more
        steps: sized so, it takes no more memory until a sequence joins again."""
        return len(self.seq_ids) + len(seq_lens), max([self.length, *seq_lens]) + steps

    @torch.inference_mode(False)  # normal tensors even when step() grows it: add/remove write into them later
    def _reallocate(self, rows: int, columns: int, shift: int) -> None:
        """A slab of exactly `rows` x `columns`, existing rows moved right by `shift` columns (a longer row joined).

        Layer by layer, K then V: each old tensor is dropped as soon as it is copied, so the old and the new slab
        overlap by one tensor, not a whole slab. Only padding needs zeros (attention weighs it 0, but 0 x NaN from
        uninitialised memory would poison the output), so the rest is left to be written.
        """
        used, first = len(self.seq_ids), not self._keys
        for slabs in (self._keys, self._values):
            for i in range(self.num_layers):
                new = torch.empty((rows, self.kv_heads, columns, self.head_dim), dtype=self.dtype, device=self.device)
                if not first:
                    new[:used, :, :shift] = 0
                    new[:used, :, shift : shift + self.length] = slabs[i][:used, :, : self.length]
                    slabs[i] = new
                else:
                    slabs.append(new)
        self._pad = self._pad + shift
        self.length += shift

    def add(self, seq_id: str, kv: KvLayers, last_token: int) -> None:
        """Join a sequence whose cache holds every token before `last_token`."""
        self.add_many([(seq_id, kv, last_token)])

    def add_many(self, joiners: list[tuple[str, KvLayers, int]], columns: int = 0) -> None:
        """Join sequences (id, cache of every token before the last, last token), reallocating at most once: to
        `columns` (from `plan`) or, when 0, with room to grow by a few columns."""
        seq_lens = [kv[0][0].shape[2] for _, kv, _ in joiners]
        length = max([self.length, *seq_lens])
        rows, (have_rows, have_columns) = len(self.seq_ids) + len(joiners), self._capacity()
        columns = max(columns or length + 1 + _GROW_COLUMNS, length + 1)
        if rows > have_rows or length + 1 > have_columns or length > self.length:
            self._reallocate(rows, max(columns, length + 1), length - self.length)
        for (seq_id, kv, last_token), seq_len in zip(joiners, seq_lens):
            row, start = len(self.seq_ids), self.length - seq_len
            for i, (key, value) in enumerate(kv):
                self._keys[i][row, :, :start] = 0
                self._values[i][row, :, :start] = 0
                self._keys[i][row, :, start : self.length] = key[0].to(self.device, self.dtype)
                self._values[i][row, :, start : self.length] = value[0].to(self.device, self.dtype)
            self.seq_ids.append(seq_id)
            self._pad = torch.cat([self._pad, torch.tensor([start])])
            self._last = torch.cat([self._last, torch.tensor([last_token])])

    def row_kv(self, seq_id: str) -> KvLayers:
        """A row's KV (every token before its newest), each [1, kv_heads, tokens, head_dim]: views of the slab,
        valid until the batch next changes (copy what must outlive that)."""
        row = self.seq_ids.index(seq_id)
        start = int(self._pad[row])
        return [
            (k[row : row + 1, :, start : self.length], v[row : row + 1, :, start : self.length])
            for k, v in zip(self._keys, self._values)
        ]

    def remove(self, seq_id: str) -> None:
        """Leave the batch; the slab is released when the last sequence leaves."""
        row, last = self.seq_ids.index(seq_id), len(self.seq_ids) - 1
        if row != last:
            for slab in self._keys + self._values:
                slab[row, :, : self.length] = slab[last, :, : self.length]
            self._pad[row], self._last[row] = self._pad[last], self._last[last]
            self.seq_ids[row] = self.seq_ids[last]
        self.seq_ids.pop()
        self._pad, self._last = self._pad[:last], self._last[:last]
        if not self.seq_ids:
            self._keys, self._values, self.length = [], [], 0
        elif (trim := int(self._pad.min())) >= max(_MIN_TRIM_COLUMNS, self.length // 8):
            self._trim_left(trim)

    def _trim_left(self, columns: int) -> None:
        """Drop leading columns that are padding in every row (long sequences left)."""
        rows = len(self.seq_ids)
        for slab in self._keys + self._values:
            slab[:rows, :, : self.length - columns] = slab[:rows, :, columns : self.length].clone()
        self.length -= columns
        self._pad -= columns

    def _step_inputs(self) -> dict[str, Any]:
        """The forward pass's inputs for one step of every row (the slab grown first if it has no free column)."""
        rows, (have_rows, have_columns) = len(self.seq_ids), self._capacity()
        if self.length + 1 > have_columns:  # not planned for this many steps: grow (the engine plans, others may not)
            self._reallocate(have_rows, self.length + 1 + _GROW_COLUMNS, 0)
        columns = torch.arange(self.length + 1)
        return {
            "input_ids": self._last[:, None].to(self.device),
            "attention_mask": (columns[None, :] >= self._pad[:, None]).long().to(self.device),
            "position_ids": (self.length - self._pad)[:, None].to(self.device),
            "cache": _SlabCache([_SlabLayer(k, v, rows, self.length) for k, v in zip(self._keys, self._values)]),
            "use_cache": True,
        }

    @torch.inference_mode()
    def step(self, model: torch.nn.Module) -> torch.Tensor:
        """One forward step for every row; returns logits [rows, vocab] (float32)."""
        out = model(**self._step_inputs())
        self.length += 1
        return out.logits[:, -1, :].float()

    @torch.inference_mode()
    def step_hidden(self, model: PreTrainedModel) -> torch.Tensor:
        """One forward step of the model's body for every row: the head's input [rows, hidden] (disagg.model.lm_head;
        only for models it can split)."""
        hidden = body_hidden(model, **self._step_inputs())
        self.length += 1
        return hidden

    def set_last_tokens(self, tokens: list[int]) -> None:
        self._last = torch.tensor(tokens, dtype=torch.long)


class RecomputeBatch:
    """KV cache off: each step runs the whole sequence again (the "why a KV cache matters" baseline)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seq_ids: list[str] = []
        self._tokens: list[list[int]] = []
        self.kv_bytes = 0

    def __len__(self) -> int:
        return len(self.seq_ids)

    def add(self, seq_id: str, tokens: list[int], last_token: int) -> None:
        self.seq_ids.append(seq_id)
        self._tokens.append([*tokens, last_token])

    def remove(self, seq_id: str) -> None:
        row = self.seq_ids.index(seq_id)
        del self.seq_ids[row], self._tokens[row]

    @torch.inference_mode()
    def step(self, model: torch.nn.Module) -> torch.Tensor:
        input_ids, mask, positions = left_padded(self._tokens, self.device)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    @torch.inference_mode()
    def step_hidden(self, model: PreTrainedModel) -> torch.Tensor:
        input_ids, mask, positions = left_padded(self._tokens, self.device)
        return body_hidden(model, input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)

    def set_last_tokens(self, tokens: list[int]) -> None:
        for row, token in zip(self._tokens, tokens):
            row.append(token)
