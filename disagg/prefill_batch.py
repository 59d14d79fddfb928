"""The prefill forward pass over a batch of prompts of different lengths (left-padded).

Only the last position's logits are computed (`logits_to_keep=1`: half the prefill time on a CPU); each prompt's
KV cache comes back unpadded, ready for the codec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KvLayers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PrefillOutput:
    """One prompt's result: the logits that choose its first token, and its KV cache (None when off)."""

    logits: torch.Tensor  # [vocab], float32
    kv: KvLayers | None


def left_padded(sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) for sequences left-padded to the longest one.

    Positions count real tokens only, so a padded row computes exactly what it would alone.
    """
    longest = max(len(s) for s in sequences)
    input_ids = torch.zeros((len(sequences), longest), dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        input_ids[row, longest - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, longest - len(tokens):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


@torch.inference_mode()
def prefill(model: torch.nn.Module, prompts: list[list[int]], *, want_kv: bool = True) -> list[PrefillOutput]:
    """Run the prompts through the model together; returns one PrefillOutput per prompt, in order."""
    device = next(model.parameters()).device
    input_ids, mask, positions = left_padded(prompts, device)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=want_kv,
                logits_to_keep=1)
    logits = out.logits[:, -1, :].float()
    results = []
    for row, tokens in enumerate(prompts):
        kv = None
        if want_kv:
            start = input_ids.shape[1] - len(tokens)
            kv = [(layer.keys[row:row + 1, :, start:].contiguous(), layer.values[row:row + 1, :, start:].contiguous())
                  for layer in out.cache.layers]
        results.append(PrefillOutput(logits=logits[row], kv=kv))
    return results
