"""Greedy-token agreement of a changed serving path with the reference, on the bundled real model and a fixed set
of chat prompts: a KV cache that crossed a lossy wire format (`disagg bench handoff`) or a lower-precision model
(`disagg bench dtype`). After the first different token the two continuations are different texts, so an entry
counts matching positions, identical sequences and the first divergence per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from disagg.model.kv_layers import KvLayers
    from disagg.model.loading import LoadedModel

AGREEMENT_PROMPTS = (
    "Why does batching help GPU utilization?",
    "Explain the difference between a process and a thread.",
    "Write a haiku about the ocean.",
    "What is the capital of France, and why is it famous?",
    "Give three tips for writing clean Python code.",
    "How does a hash table work?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the benefits of regular exercise?",
)


@torch.inference_mode()
def measure_wire_agreement(
    formats: Sequence[str] = ("float16", "bfloat16", "int8"),
    new_tokens: int = 32,
    model: str | None = None,
    prompts: Sequence[str] = AGREEMENT_PROMPTS,
) -> dict:
    """Greedy tokens after a cache that crossed each wire format vs the lossless cache, on the real bundled model."""
    from transformers import DynamicCache

    from disagg.kv.codec import KvAssembler, KvLayout, encode_kv
    from disagg.model.dtypes import DTYPE_NAMES
    from disagg.model.loading import BUNDLED_MODEL, load_model
    from disagg.model.prefill import prefill

    lm = load_model(model or BUNDLED_MODEL)
    layers, heads, head_dim = lm.kv_shape()

    def continuation(first: int, kv: KvLayers) -> list[int]:
        cache = DynamicCache(config=lm.model.config)
        for i, (k, v) in enumerate(kv):
            cache.update(k.clone(), v.clone(), i)
        tokens = [first]
        for _ in range(new_tokens - 1):
            out = lm.model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            cache = out.cache
            tokens.append(int(out.logits[0, -1].argmax()))
        return tokens

    def through_wire(kv: KvLayers, wire: str | None) -> KvLayers:
        layout = KvLayout(DTYPE_NAMES[lm.dtype], layers, heads, kv[0][0].shape[2], head_dim, lm.fingerprint, wire or "")
        assembler = KvAssembler(layout, lm.fingerprint)
        for chunk in encode_kv(kv, wire=wire):
            assembler.add(chunk)
        return assembler.layers()

    result: dict[str, dict[str, Any]] = {wire: empty_tally() for wire in formats}
    for prompt in prompts:
        out = prefill(lm.model, [chat_ids(lm, prompt)])[0]
        assert out.kv is not None  # prefill keeps the KV cache unless told not to
        first = int(out.logits.argmax())
        reference = continuation(first, through_wire(out.kv, None))
        for wire in formats:
            tally(result[wire], reference, continuation(first, through_wire(out.kv, wire)))
    return dict(model=lm.name, prompts=len(prompts), new_tokens=new_tokens, formats=result)


def chat_ids(lm: LoadedModel, prompt: str) -> list[int]:
    """The token ids of `prompt` as one user turn of the model's chat template, ready for the assistant's reply."""
    from disagg.rpc.prompt import chat_token_ids

    return chat_token_ids(lm.tokenizer, lm.name, [{"role": "user", "content": prompt}])


def empty_tally() -> dict[str, Any]:
    """An agreement entry before any prompt: see `tally`."""
    return dict(matching=0, total=0, identical_sequences=0, first_divergence=[], agreement=0.0)


def tally(entry: dict[str, Any], reference: list[int], got: list[int]) -> None:
    """Add one prompt's greedy tokens to an agreement entry (matching positions, identical, first divergence, and
    the share of matching positions so far)."""
    entry["matching"] += sum(a == b for a, b in zip(reference, got, strict=True))
    entry["total"] += len(reference)
    entry["identical_sequences"] += got == reference
    entry["first_divergence"].append(next((i for i, (a, b) in enumerate(zip(reference, got)) if a != b), None))
    entry["agreement"] = entry["matching"] / entry["total"]
