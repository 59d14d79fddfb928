"""The native forward pass's weights (disagg/model/native.py), taken from an HF model: its own tensors, Llama's
q/k/v and gate/up fused into one matmul each (the HF modules' weights made views of the fused rows, so both forward
passes share the memory), and each projection prepacked for oneDNN where that pays and the CPU can.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel


class Projection:
    """x @ W^T + b of one weight: as HF's module computes it (GPT-2's Conv1D weight [in, out] through `addmm`,
    Llama's Linear [out, in] through `linear`), or with a copy of the weight prepacked for oneDNN's matmul, which on
    this project's CPUs runs a decode step's small-M matmuls faster than `linear` (record: benchmarks/
    engine_step.py) and can apply an activation in the same call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool, pack: bool):
        self.weight, self.bias, self.conv1d = weight, bias, conv1d
        self.packed: torch.Tensor | None = None
        if pack:
            linear_weight = (weight.t() if conv1d else weight).contiguous()
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear_weight, None)

    def __call__(self, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
        """x [tokens, in] -> [tokens, out]; `gelu_tanh`: the tanh GELU of the result (GPT-2's MLP)."""
        if self.packed is not None:
            attr, algorithm = ("gelu", "tanh") if gelu_tanh else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, attr, [], algorithm)
        if self.conv1d:
            assert self.bias is not None
            out = torch.addmm(self.bias, x, self.weight)
        else:
            out = F.linear(x, self.weight, self.bias)
        return F.gelu(out, approximate="tanh") if gelu_tanh else out


@dataclass
class LayerWeights:
    """One transformer block: norms (the HF model's tensors) and projections (its weights, or views of its fused
    rows, possibly prepacked)."""

    norm1_w: torch.Tensor
    norm1_b: torch.Tensor | None
    qkv: Projection
    o: Projection
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor | None
    up: Projection  # GPT-2: c_fc; Llama: gate and up fused
    down: Projection


@dataclass
class Weights:
    """Everything the native forward pass reads: embeddings, final norm, RoPE tables (Llama), blocks."""

    embed: torch.Tensor
    positions: torch.Tensor | None  # GPT-2's learned position embeddings
    cos: torch.Tensor | None  # Llama's RoPE tables [positions, head_dim]
    sin: torch.Tensor | None
    norm_w: torch.Tensor
    norm_b: torch.Tensor | None
    layers: list[LayerWeights]


def take_weights(model: PreTrainedModel, family: str, pack: bool) -> Weights:
    """`model`'s weights for the native pass of `family` ("gpt2" or "llama"); `pack`: prepacked projections."""
    with torch.no_grad():
        return _gpt2(model, pack) if family == "gpt2" else _llama(model, pack)


def fuse_rows(*linears: nn.Linear) -> torch.Tensor:
    """One [sum(out), in] weight for several Linear layers, each layer's weight made a view of its rows (no second
    copy of the weights; HF's forward computes exactly what it did)."""
    weights = [linear.weight.detach() for linear in linears]
    rows, columns = sum(w.shape[0] for w in weights), weights[0].shape[1]
    first = weights[0]
    offsets = [first.storage_offset() + sum(w.shape[0] for w in weights[:i]) * columns for i in range(len(weights))]
    if all(
        w.is_contiguous()
        and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and w.storage_offset() == offset
        for w, offset in zip(weights, offsets)
    ):  # fused before (another NativeModel of this model): the same tensor again
        return torch.as_strided(first, (rows, columns), (columns, 1), first.storage_offset())
    fused = torch.cat(weights)
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def _gpt2(model: PreTrainedModel, pack: bool) -> Weights:
    body: Any = model.transformer  # (HF's modules, typed loosely)

    def conv1d(module: Any) -> Projection:
        return Projection(module.weight.detach(), module.bias.detach(), conv1d=True, pack=pack)

    layers = [
        LayerWeights(
            norm1_w=block.ln_1.weight.detach(),
            norm1_b=block.ln_1.bias.detach(),
            qkv=conv1d(block.attn.c_attn),
            o=conv1d(block.attn.c_proj),
            norm2_w=block.ln_2.weight.detach(),
            norm2_b=block.ln_2.bias.detach(),
            up=conv1d(block.mlp.c_fc),
            down=conv1d(block.mlp.c_proj),
        )
        for block in body.h
    ]
    embed, norm = body.wte.weight.detach(), body.ln_f
    return Weights(embed, body.wpe.weight.detach(), None, None, norm.weight.detach(), norm.bias.detach(), layers)


def _llama(model: PreTrainedModel, pack: bool) -> Weights:
    body: Any = model.model
    cfg = model.config
    embed = body.embed_tokens.weight.detach()
    theta = cfg.rope_parameters["rope_theta"]
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # As LlamaRotaryEmbedding computes them (float32), once for every position instead of every step
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = torch.arange(cfg.max_position_embeddings, dtype=torch.float)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).to(embed.device)
    cos, sin = emb.cos().to(embed.dtype), emb.sin().to(embed.dtype)

    def linear(weight: torch.Tensor) -> Projection:
        return Projection(weight, None, conv1d=False, pack=pack)

    layers = []
    for block in body.layers:
        attn, mlp = block.self_attn, block.mlp
        layers.append(
            LayerWeights(
                norm1_w=block.input_layernorm.weight.detach(),
                norm1_b=None,
                qkv=linear(fuse_rows(attn.q_proj, attn.k_proj, attn.v_proj)),
                o=linear(attn.o_proj.weight.detach()),
                norm2_w=block.post_attention_layernorm.weight.detach(),
                norm2_b=None,
                up=linear(fuse_rows(mlp.gate_proj, mlp.up_proj)),
                down=linear(mlp.down_proj.weight.detach()),
            )
        )
    return Weights(embed, None, cos, sin, body.norm.weight.detach(), None, layers)


@functools.cache
def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacks `dtype` weights on this CPU (float16 needs AVX512-FP16 or AVX-NE-CONVERT)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), None)
    except RuntimeError:
        return False
    return True
