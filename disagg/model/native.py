"""A forward pass the project owns, for the GPT-2 and Llama families, over the paged KV pool.

HF's modules run a decode step as a dozen small eager ops per layer and, for grouped-query attention, `repeat_kv`
copies every layer's K/V to the query heads' count each step. Here the same math runs as few, larger ops:
- projections fused where it pays (Llama's q/k/v as one matmul and gate/up as one; GPT-2's `c_attn` is fused
  already) and prepacked for oneDNN's matmul (disagg/model/native_weights.py);
- RoPE from cos/sin tables computed once, indexed by position once per forward pass (HF recomputes them every
  step), applied to q and k in one go, with `rotate_half(x) * sin` as `roll(x) * sin_signed` (the same floats);
- attention with native GQA over the pool's layout (disagg/model/paged_kv.py): the query heads of a group are the
  rows of one matmul against their KV head's keys, nothing repeated.

Every function returns the final hidden states (after the final norm), so the existing head applies
(disagg/model/lm_head.py: the exact bf16 greedy screen). HF's forward stays the fallback for other architectures
and the reference in tests (tests/test_native_runner.py: logits and greedy tokens against HF's).

Decode (`decode`, one token per row) is a pure function of tensors so that `torch.compile` can take it whole
(disagg/model/compiled.py); prefill (`prefill`, any number of tokens per sequence, causal) runs eagerly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from disagg.model import paged_attention
from disagg.model.block_pool import BlockTable
from disagg.model.loading import attention_heads
from disagg.model.native_weights import LayerWeights, can_pack, take_weights
from disagg.model.paged_kv import PagedKvStorage

_FAMILIES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
ATTENTION_KINDS = ("kernel", "matmul", "sdpa")
Rope = tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin_signed) [tokens, 1, D] of one pass's positions; None: GPT-2
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> [tokens, heads * D]
# (tokens, positions, block_tables, keys, values) -> hidden: `NativeModel.decode`, eager or compiled
DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


def native_family(model: PreTrainedModel) -> str | None:
    """ "gpt2" or "llama" when the native forward pass can run `model` exactly as HF does, else None."""
    family = _FAMILIES.get(type(model).__name__)
    cfg = model.config
    if family == "gpt2":
        plain = not cfg.scale_attn_by_inverse_layer_idx and not cfg.reorder_and_upcast_attn and cfg.scale_attn_weights
        act = cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        return family if plain and act and not cfg.add_cross_attention else None
    if family == "llama":
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        plain = not cfg.attention_bias and not cfg.mlp_bias and cfg.hidden_act == "silu"
        return family if plain and rope == "default" and getattr(cfg, "pretraining_tp", 1) == 1 else None
    return None


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float


@dataclass
class _DecodeStep:
    """What every layer's attention of one decode step shares."""

    slots: torch.Tensor  # [rows]: where each row's new K/V goes (block * block_size + offset)
    block_tables: torch.Tensor  # [rows, blocks]
    positions: torch.Tensor  # [rows]
    mask: torch.Tensor | None  # [rows, blocks * block_size] additive, for the gathering attentions; None: kernel


@dataclass
class _PrefillPlan:
    """Where a prefill's tokens go and what each attends to, the same for every layer."""

    slots: torch.Tensor  # [tokens]: each new token's slot in the pool
    cold_index: torch.Tensor  # [sequences, longest]: the sequences with nothing before them, right-padded (token rows)
    cold_valid: torch.Tensor  # [sequences, longest]: which entries of cold_index are real tokens
    cold_tokens: torch.Tensor  # [their tokens]: the rows they fill, in cold_valid's order
    after_prefix: list[tuple[int, int, int, torch.Tensor]]  # (first row, tokens, first position, context slots)
    uniform: int | None = None  # the number of sequences when all are cold and of one length (rows as they are)

    @classmethod
    def of(
        cls,
        storage: PagedKvStorage,
        tables: list[BlockTable],
        starts: list[int],
        lengths: list[int],
        slots: torch.Tensor,
    ) -> _PrefillPlan:
        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        cold = [(offset, n) for offset, n, start in zip(offsets, lengths, starts) if start == 0]
        longest = max((n for _, n in cold), default=0)
        steps = torch.arange(longest)
        index = torch.stack([offset + steps.clamp(max=n - 1) for offset, n in cold]) if cold else steps[None]
        valid = torch.stack([steps < n for _, n in cold]) if cold else steps[None] < 0
        after = [
            (offset, n, start, storage.slots(table, 0, start + n))
            for offset, n, start, table in zip(offsets, lengths, starts, tables)
            if start > 0
        ]
        device = slots.device
        uniform = len(cold) if not after and len(set(lengths)) == 1 else None
        return cls(slots, index.to(device), valid.to(device), index[valid].to(device), after, uniform)


class NativeModel:
    """The native forward pass of a GPT-2 or Llama HF model, sharing its weights."""

    def __init__(self, model: PreTrainedModel, attention: str = "kernel", pack_weights: bool = True):
        """`attention` (decode): "kernel" reads the pool in place (disagg/model/paged_attention.py; "matmul" where
        it cannot be built or the device is not a CPU), "matmul" and "sdpa" gather each row's blocks first.
        `pack_weights`: matmuls with oneDNN-prepacked copies of the projection weights (CPU with oneDNN only; one
        more copy of them in memory), else HF's own weights and calls."""
        family = native_family(model)
        if family is None:
            raise ValueError(f"no native forward pass for {type(model).__name__}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        device = next(model.parameters()).device
        if attention == "kernel" and (device.type != "cpu" or not paged_attention.load()):
            attention = "matmul"
        self.family, self.attention = family, attention
        cfg = model.config
        heads, kv_heads, head_dim = attention_heads(cfg)
        eps = cfg.layer_norm_epsilon if family == "gpt2" else cfg.rms_norm_eps
        self.shape = Shape(cfg.num_hidden_layers, cfg.hidden_size, heads, kv_heads, head_dim, eps)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.packed = pack_weights and device.type == "cpu" and can_pack(next(model.parameters()).dtype)
        weights = take_weights(model, family, self.packed)
        self.embed, self.positions, self.cos, self.sin = weights.embed, weights.positions, weights.cos, weights.sin
        self.norm_w, self.norm_b, self.layers = weights.norm_w, weights.norm_b, weights.layers
        self.sin_signed = None if self.sin is None else _signed_sin(self.sin)

    # -- the pieces of a block -----------------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.family == "gpt2":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.shape.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)  # LlamaRMSNorm, in float32 like HF's
        return weight * (x.float() * torch.rsqrt(variance + self.shape.eps)).to(x.dtype)

    def _rope(self, positions: torch.Tensor) -> Rope:
        """The RoPE tables' rows for `positions` [T], shared by every layer of one forward pass."""
        if self.cos is None or self.sin_signed is None:
            return None
        return self.cos[positions][:, None], self.sin_signed[positions][:, None]

    def _qkv(self, layer: LayerWeights, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, heads, D], k and v [T, kv_heads, D] of tokens `x` [T, hidden], RoPE applied (`rope`: their rows)."""
        s = self.shape
        qkv = layer.qkv(x)
        q_width, kv_width = s.heads * s.head_dim, s.kv_heads * s.head_dim
        v = qkv[:, q_width + kv_width :].view(-1, s.kv_heads, s.head_dim)
        if rope is None:
            return qkv[:, :q_width].view(-1, s.heads, s.head_dim), qkv[:, q_width : q_width + kv_width].view_as(v), v
        cos, sin_signed = rope  # q's heads and k's turned together
        qk = qkv[:, : q_width + kv_width].view(-1, s.heads + s.kv_heads, s.head_dim)
        qk = qk * cos + qk.roll(s.head_dim // 2, dims=-1) * sin_signed  # HF: q * cos + rotate_half(q) * sin
        return qk[:, : s.heads], qk[:, s.heads :], v

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            return layer.down(layer.up(x, gelu_tanh=True))
        gate, up = layer.up(x).chunk(2, dim=-1)
        return layer.down(F.silu(gate) * up)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = F.embedding(tokens, self.embed)
        if self.positions is not None:
            hidden = hidden + F.embedding(positions, self.positions)
        return hidden

    def _block(self, layer: LayerWeights, hidden: torch.Tensor, rope: Rope, attend: Attend) -> torch.Tensor:
        """One pre-norm block: attention (`attend(q, k, v)` -> [T, heads * D]) and MLP, each with its residual."""
        q, k, v = self._qkv(layer, self._norm(hidden, layer.norm1_w, layer.norm1_b), rope)
        hidden = hidden + layer.o(attend(q, k, v))
        return hidden + self._mlp(layer, self._norm(hidden, layer.norm2_w, layer.norm2_b))

    # -- decode: one token per row, attention over the pool ------------------------------------------------------

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        block_tables: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        """One decode step: hidden states [rows, hidden] after the final norm.

        `tokens`, `positions` [rows]: each row's newest token and its position (the tokens before it have KV in
        the pool); `block_tables` [rows, blocks] (int64): each row's blocks, padded with any valid block id (masked
        out by position); `keys`/`values`: the pool's tensors (PagedKvStorage), written in place at each row's
        slot for its new token.
        """
        block_size = keys[0].shape[2]
        slots = block_tables.gather(1, (positions // block_size)[:, None])[:, 0] * block_size + positions % block_size
        step = _DecodeStep(slots, block_tables, positions, None)
        if self.attention != "kernel":
            span = torch.arange(block_tables.shape[1] * block_size, device=tokens.device)
            hidden_span = span[None, :] > positions[:, None]  # [rows, span]: the slots each row must not see
            mask = torch.zeros(hidden_span.shape, dtype=keys[0].dtype, device=tokens.device)
            step = _DecodeStep(slots, block_tables, positions, mask.masked_fill(hidden_span, -torch.inf))
        hidden, rope = self._embed(tokens, positions), self._rope(positions)
        for key_cache, value_cache, layer in zip(keys, values, self.layers):
            attend = functools.partial(self._paged_attention, step, key_cache, value_cache)
            hidden = self._block(layer, hidden, rope, attend)
        return self._norm(hidden, self.norm_w, self.norm_b)

    def _paged_attention(
        self,
        step: _DecodeStep,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> torch.Tensor:
        """Store the rows' new K/V in their slots, then attend over each row's blocks: [rows, heads * D]."""
        s = self.shape
        rows = q.shape[0]
        key_cache.view(s.kv_heads, -1, s.head_dim).index_copy_(1, step.slots, k.transpose(0, 1))
        value_cache.view(s.kv_heads, -1, s.head_dim).index_copy_(1, step.slots, v.transpose(0, 1))
        if step.mask is None:  # the kernel reads the blocks in place
            out = paged_attention.paged_decode_attention(
                q, key_cache, value_cache, step.block_tables, step.positions + 1, self.scale
            )
            return out.view(rows, s.heads * s.head_dim)
        flat_tables = step.block_tables.reshape(-1)
        span_keys = key_cache.index_select(1, flat_tables).view(s.kv_heads, rows, -1, s.head_dim)
        span_values = value_cache.index_select(1, flat_tables).view(s.kv_heads, rows, -1, s.head_dim)
        return self._decode_attention(q, span_keys, span_values, step.mask)

    def _decode_attention(
        self, q: torch.Tensor, span_keys: torch.Tensor, span_values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q [rows, heads, D] against K/V [kv_heads, rows, span, D] (a group's query heads are the rows of its KV
        head's matmul); returns [rows, heads * D]."""
        s = self.shape
        rows = q.shape[0]
        group = s.heads // s.kv_heads
        grouped = q.view(rows, s.kv_heads, group, s.head_dim).transpose(0, 1)  # [kv_heads, rows, group, D]
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(grouped, span_keys, span_values, attn_mask=mask[None, :, None, :])
        else:
            scores = torch.matmul(grouped, span_keys.transpose(-1, -2)) * self.scale + mask[None, :, None, :]
            out = torch.matmul(torch.softmax(scores, dim=-1), span_values)
        return out.transpose(0, 1).reshape(rows, s.heads * s.head_dim)

    # -- prefill: many tokens per sequence, causal ---------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        sequences: list[list[int]],
        tables: list[BlockTable],
        storage: PagedKvStorage,
        after_layer: Callable[[int], object] | None = None,
        every_position: bool = False,
    ) -> torch.Tensor:
        """The tokens of each sequence after the `table.num_tokens` whose KV the pool already holds (a prefix-cache
        hit, or none), in one forward pass of all their tokens, unpadded: their KV written into the pool at their
        tables' slots (room reserved by the caller), each attending causally to its own sequence. Returns the last
        token's hidden state of each sequence [sequences, hidden], or with `every_position` every computed token's
        [tokens, hidden] (the sequences' in order); advancing the tables is the caller's. `after_layer(i)` is called
        once layer i's K/V are in the pool (layer-wise streaming reads them there)."""
        device = storage.device
        starts = [table.num_tokens for table in tables]
        if any(not 0 <= start < len(seq) for start, seq in zip(starts, sequences)):
            raise ValueError("every sequence needs at least one token not in the pool")
        tokens = torch.tensor([t for seq, start in zip(sequences, starts) for t in seq[start:]], device=device)
        positions = torch.cat([torch.arange(start, len(seq)) for seq, start in zip(sequences, starts)]).to(device)
        slots = torch.cat(
            [storage.slots(table, start, len(seq)) for seq, table, start in zip(sequences, tables, starts)]
        )
        lengths = [len(seq) - start for seq, start in zip(sequences, starts)]
        plan = _PrefillPlan.of(storage, tables, starts, lengths, slots)
        hidden, rope = self._embed(tokens, positions), self._rope(positions)
        for i, layer in enumerate(self.layers):
            attend = functools.partial(self._prefill_attention, storage, i, plan)
            hidden = self._block(layer, hidden, rope, attend)
            if after_layer is not None:
                after_layer(i)
        if not every_position:
            hidden = hidden[torch.tensor(lengths, device=device).cumsum(0) - 1]
        return self._norm(hidden, self.norm_w, self.norm_b)

    def _prefill_attention(
        self, storage: PagedKvStorage, layer: int, plan: _PrefillPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Store the new tokens' K/V, then every sequence's causal attention: [tokens, heads * D]. The sequences with
        nothing before them in one call, right-padded to the longest (causal masking alone keeps a real query off
        the padding, and the padded queries' rows are dropped); each one after a known prefix alone, over its whole
        context read from the pool."""
        s = self.shape
        storage.write(layer, plan.slots, k.transpose(0, 1), v.transpose(0, 1))
        if plan.uniform is not None:  # sequences of one length, nothing before them: no padding to make
            pq, pk, pv = (t.view(plan.uniform, -1, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
            attended = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True, enable_gqa=True)
            return attended.transpose(1, 2).reshape(q.shape[0], s.heads * s.head_dim)
        out = q.new_empty(q.shape[0], s.heads * s.head_dim)
        if plan.cold_tokens.numel():
            pq, pk, pv = (t[plan.cold_index].transpose(1, 2) for t in (q, k, v))  # [sequences, heads, longest, D]
            attended = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True, enable_gqa=True)
            out[plan.cold_tokens] = attended.transpose(1, 2)[plan.cold_valid].reshape(-1, s.heads * s.head_dim)
        for offset, n, start, context in plan.after_prefix:
            seq_q = q[offset : offset + n].transpose(0, 1)[None]  # [1, heads, n, D]
            seq_k = storage.keys[layer].view(s.kv_heads, -1, s.head_dim).index_select(1, context)[None]
            seq_v = storage.values[layer].view(s.kv_heads, -1, s.head_dim).index_select(1, context)[None]
            query_positions = torch.arange(start, start + n, device=q.device)[:, None]
            allowed = torch.arange(start + n, device=q.device)[None, :] <= query_positions
            attended = F.scaled_dot_product_attention(seq_q, seq_k, seq_v, attn_mask=allowed, enable_gqa=True)
            out[offset : offset + n] = attended[0].transpose(0, 1).reshape(n, s.heads * s.head_dim)
        return out


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """`sin` [positions, D] with its first half negated: HF's `rotate_half(x) * sin` (x's halves swapped, the
    first negated) is then `x.roll(D // 2) * sin_signed`, float for float, since (-a) * b == a * (-b) exactly."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
